"""Request throughput of the Kubernetes API emulator, against a bare aiohttp server.

Runs, in the same process and run, the emulator (``running_apiserver``) and a baseline
aiohttp server that returns a stored JSON object for every request. The baseline is the
floor: what the HTTP stack, the event loop thread and the client cost. A single aiohttp client
session with keep-alive then times, sequentially:

- ``baseline-get``: GET on the baseline server,
- ``get``: GET of one custom resource,
- ``list-100``: LIST of 100 custom resources (one request),
- ``patch``: JSON merge patch of a custom resource's spec (validation, generation, watch
  event),
- ``status-patch``: merge patch of its /status,
- ``watch-latency``: time from a patch's reply to its event on an open watch.

Each line prints requests per second and the time per request as a ratio to
``baseline-get``. The emulator only needs to keep test suites fast (goal: a merge patch
within 5x a bare GET, so 100 patches cost well under a second).

Usage: ``python bench/bench_kubeapi.py [--requests 2000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from aiohttp import web

from dbsync.testing.kubeapi import running_apiserver

GROUP = "bench.dbsync.io"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"items.{GROUP}"},
    "spec": {
        "group": GROUP, "scope": "Namespaced",
        "names": {"plural": "items", "singular": "item", "kind": "Item"},
        "versions": [{
            "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "properties": {
                    "replicas": {"type": "integer", "minimum": 0, "maximum": 1000000},
                    "mode": {"type": "string", "enum": ["fast", "safe"], "default": "fast"},
                }},
                "status": {"type": "object", "properties": {
                    "observedGeneration": {"type": "integer"}}},
            }}},
        }],
    },
}
ITEMS = f"/apis/{GROUP}/v1/namespaces/default/items"
MERGE = {"Content-Type": "application/merge-patch+json"}


@contextmanager
def baseline_server(body: dict[str, Any]) -> Iterator[str]:
    """Run a bare aiohttp server in a thread that returns ``body`` for every GET."""
    text = json.dumps(body)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    address: list[str] = []

    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=text, content_type="application/json")

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        return runner

    runner_box: list[web.AppRunner] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner_box.append(loop.run_until_complete(start()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(timeout=10)
    try:
        yield address[0]
    finally:
        asyncio.run_coroutine_threadsafe(runner_box[0].cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


async def time_requests(count: int, send: Callable[[int], Awaitable[None]]) -> float:
    """Return the mean seconds per call of ``send`` over ``count`` sequential calls."""
    for index in range(min(50, count)):
        await send(index)
    started = time.perf_counter()
    for index in range(count):
        await send(index)
    return (time.perf_counter() - started) / count


async def measure(url: str, baseline_url: str, count: int) -> dict[str, float]:
    results: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            async with session.post(url + path, json=body) as response:
                assert response.status == 201, await response.text()
                result: dict[str, Any] = await response.json()
                return result

        await post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
        for index in range(100):
            await post(ITEMS, {"apiVersion": f"{GROUP}/v1", "kind": "Item",
                               "metadata": {"name": f"item-{index}"}, "spec": {"replicas": 1}})

        async def baseline_get(_: int) -> None:
            async with session.get(f"{baseline_url}{ITEMS}/item-0") as response:
                await response.read()

        async def get(_: int) -> None:
            async with session.get(f"{url}{ITEMS}/item-0") as response:
                await response.read()

        async def list_all(_: int) -> None:
            async with session.get(f"{url}{ITEMS}") as response:
                await response.read()

        async def patch(index: int) -> None:
            async with session.patch(f"{url}{ITEMS}/item-1", headers=MERGE,
                                     data=json.dumps({"spec": {"replicas": index}})) as reply:
                await reply.read()

        async def status_patch(index: int) -> None:
            body = json.dumps({"status": {"observedGeneration": index}})
            async with session.patch(f"{url}{ITEMS}/item-2/status", headers=MERGE,
                                     data=body) as reply:
                await reply.read()

        results["baseline-get"] = await time_requests(count, baseline_get)
        results["get"] = await time_requests(count, get)
        results["list-100"] = await time_requests(max(count // 10, 1), list_all)
        results["patch"] = await time_requests(count, patch)
        results["status-patch"] = await time_requests(count, status_patch)
        results["watch-latency"] = await watch_latency(session, url, max(count // 10, 1))
    return results


async def watch_latency(session: aiohttp.ClientSession, url: str, count: int) -> float:
    """Return the mean seconds from a patch's reply to its event arriving on a watch."""
    async with session.get(f"{url}{ITEMS}") as response:
        version = (await response.json())["metadata"]["resourceVersion"]
    total = 0.0
    async with session.get(f"{url}{ITEMS}?watch=true&resourceVersion={version}"
                           "&fieldSelector=metadata.name%3Ditem-3") as stream:
        for index in range(count):
            async with session.patch(f"{url}{ITEMS}/item-3", headers=MERGE,
                                     data=json.dumps({"spec": {"replicas": index + 2}})) as r:
                await r.read()
            replied = time.perf_counter()
            await stream.content.readline()
            total += time.perf_counter() - replied
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per measurement (default: 2000)")
    args = parser.parse_args()

    with running_apiserver() as server:
        sample = server.get_object("", "v1", "namespaces", None, "default")
        with baseline_server(sample or {}) as baseline_url:
            results = asyncio.run(measure(server.url, baseline_url, args.requests))

    floor = results["baseline-get"]
    print(f"{'measurement':<14} {'req/s':>9} {'ms/req':>8} {'x baseline':>10}")
    for name, seconds in results.items():
        print(f"{name:<14} {1 / seconds:>9.0f} {seconds * 1000:>8.3f} {seconds / floor:>10.2f}")


if __name__ == "__main__":
    main()
