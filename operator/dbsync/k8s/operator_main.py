"""Start the dbsync operator: kopf's runtime with dbsync's handlers and settings.

kopf is imported here and in the handler modules only, so ``dbsync`` commands other than
``dbsync operator`` never pay for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dbsync.pipeline.errors import ConfigurationError

logger = logging.getLogger("dbsync.k8s.operator")


@dataclass(frozen=True, kw_only=True)
class OperatorSettings:
    """Options of one ``dbsync operator`` process."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    max_concurrent_syncs: int = 2
    liveness_port: int | None = None
    metrics_port: int | None = None
    retry_base_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    prestart_children: bool = True
    verbose: bool = False
    executor: str = "process"
    job_image: str | None = None
    job_service_account: str = "dbsync-sync-runner"
    job_ttl_seconds: int = 3600
    job_cpu_limit: str = "1"
    job_memory_limit: str = "512Mi"

    def __post_init__(self) -> None:
        if self.all_namespaces and self.namespaces:
            raise ConfigurationError("pass either --namespace or --all-namespaces, not both")
        if not self.all_namespaces and not self.namespaces:
            raise ConfigurationError(
                "no namespace to watch: pass --namespace NS (repeatable) or --all-namespaces")
        if self.max_concurrent_syncs < 1:
            raise ConfigurationError(
                f"--max-concurrent-syncs is {self.max_concurrent_syncs}: pass 1 or more")
        if self.executor not in ("process", "job"):
            raise ConfigurationError(f"--executor is {self.executor!r}: pass process or job")
        if self.job_ttl_seconds < 0:
            raise ConfigurationError(
                f"--job-ttl-seconds is {self.job_ttl_seconds}: pass 0 or more")


def liveness_endpoint(port: int | None) -> str | None:
    """Return kopf's liveness endpoint URL for ``port``, or None when disabled."""
    if port is None:
        return None
    # The kubelet probes the pod IP, so the endpoint listens on every interface.
    return f"http://0.0.0.0:{port}/healthz"


def run_operator(settings: OperatorSettings, *, stop_flag: asyncio.Event | None = None) -> int:
    """Run the operator until it is stopped by a signal (or ``stop_flag``); return 0."""
    import kopf

    from dbsync.k8s import handlers
    from dbsync.k8s.job_manifest import JobSettings
    from dbsync.k8s.models import ExecutorKind

    job_settings = JobSettings(
        service_account=settings.job_service_account,
        ttl_seconds_after_finished=settings.job_ttl_seconds,
        cpu_limit=settings.job_cpu_limit,
        memory_limit=settings.job_memory_limit,
    )
    if settings.job_image:
        job_settings = dataclasses.replace(job_settings, image=settings.job_image)

    handlers.configure(handlers.OperatorOptions(
        max_concurrent_syncs=settings.max_concurrent_syncs,
        metrics_port=settings.metrics_port,
        retry_base_seconds=settings.retry_base_seconds,
        retry_max_seconds=settings.retry_max_seconds,
        prestart_children=settings.prestart_children,
        all_namespaces=settings.all_namespaces,
        executor=ExecutorKind(settings.executor),
        job_settings=job_settings,
    ))
    kopf.configure(verbose=settings.verbose, log_format=kopf.LogFormat.FULL)
    scope = "all namespaces" if settings.all_namespaces else ", ".join(settings.namespaces)
    logger.info("starting the dbsync operator for %s", scope)

    # One replica with the Recreate strategy is the supported deployment: standalone skips
    # kopf's peering, whose equal priorities can freeze every replica.
    kopf.run(
        standalone=True,
        clusterwide=settings.all_namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=liveness_endpoint(settings.liveness_port),
        stop_flag=stop_flag,
    )
    return 0


def namespaces_from(values: Sequence[str] | None) -> tuple[str, ...]:
    """Return the namespaces given, split on commas and without duplicates, in order."""
    seen: list[str] = []
    for value in values or ():
        for name in value.split(","):
            name = name.strip()
            if name and name not in seen:
                seen.append(name)
    return tuple(seen)
