"""The ``dbsync dev`` command: development helpers, today ``dbsync dev apiserver``.

``dbsync dev apiserver`` runs the in-memory Kubernetes API emulator in the foreground and
writes a kubeconfig for kubectl, kopf or the operator, so the operator can be tried on a
machine without a cluster. State is lost when it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from dbsync.pipeline.errors import EXIT_OK, ConfigurationError

DEFAULT_KUBECONFIG = Path("dbsync-dev.kubeconfig")

logger = logging.getLogger("dbsync.testing.kubeapi")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``dev`` subcommand and its ``apiserver`` subcommand."""
    parser = subparsers.add_parser(
        "dev",
        help="development helpers (a local Kubernetes API emulator)",
        description="Helpers for trying dbsync without a Kubernetes cluster.",
    )
    commands = parser.add_subparsers(dest="dev_command", metavar="SUBCOMMAND", required=True)
    apiserver = commands.add_parser(
        "apiserver",
        help="run the in-memory Kubernetes API emulator until Ctrl-C",
        description="Run the in-memory Kubernetes API emulator on 127.0.0.1 in the foreground "
        "and write a kubeconfig for it. It is a test double: no authentication, no "
        "controllers, and all state is lost when it stops.",
    )
    apiserver.add_argument(
        "--port", type=port_number, default=0, metavar="N",
        help="TCP port to listen on, 0 to 65535 (default: 0, a free port chosen by the OS)")
    apiserver.add_argument(
        "--kubeconfig", type=Path, default=DEFAULT_KUBECONFIG, metavar="PATH",
        help=f"where to write the kubeconfig for clients (default: ./{DEFAULT_KUBECONFIG})")
    apiserver.add_argument(
        "--watch-history-size", type=int, default=1000, metavar="N",
        help="number of watch events kept for resuming watches; older resourceVersions get "
        "410 Gone (default: 1000)")
    apiserver.set_defaults(handler=run_apiserver)


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {value}: expected 0 to 65535")
    return value


def run_apiserver(args: argparse.Namespace) -> int:
    """Run the emulator until SIGINT or SIGTERM; return 0 after a clean stop."""
    # Why imported here: aiohttp and the emulator cost start-up time for other commands.
    from dbsync.testing.kubeapi import KubeApiServer

    if args.watch_history_size < 1:
        raise ConfigurationError(
            f"invalid --watch-history-size {args.watch_history_size}: expected at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = KubeApiServer(port=args.port, watch_history_size=args.watch_history_size)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        try:
            await server.start()
        except OSError as error:
            raise ConfigurationError(
                f"cannot listen on 127.0.0.1 port {args.port}: {error}; choose another "
                "--port or 0 for a free one") from error
        path = server.write_kubeconfig(args.kubeconfig.resolve())
        print(f"Kubernetes API emulator listening on {server.url}", flush=True)
        print(f"kubeconfig written to {path}; try: kubectl --kubeconfig {path} get ns",
              flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()
            for signal_number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signal_number)

    asyncio.run(serve())
    return EXIT_OK
