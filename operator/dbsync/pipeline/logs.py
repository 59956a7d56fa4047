"""Logging setup: structlog with JSON lines in production and a console renderer on a terminal.

Every line carries the bound context (sync id, operation id) and passes through a redaction
processor, so a password that slips into an event or exception text is masked before output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

from dbsync.pipeline.dsn import redact_text
from dbsync.pipeline.errors import ConfigurationError

# Environment variable that sets the log level when no --log-level option is given.
LOG_LEVEL_VARIABLE = "DBSYNC_LOG_LEVEL"

# Level names accepted by --log-level and DBSYNC_LOG_LEVEL, from most to least verbose.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}

_extra_secrets: set[str] = set()


def register_secret(secret: str) -> None:
    """Mask ``secret`` in every log line from now on (passwords read from DSNs or Secrets)."""
    if secret:
        _extra_secrets.add(secret)


def _redact(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value, *_extra_secrets)
    if isinstance(value, dict):
        return {key: _redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(item) for item in value]
    return value


def redact_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor that masks passwords in every field of a log event."""
    for key in list(event_dict):
        event_dict[key] = _redact(event_dict[key])
    return event_dict


def level_from_name(name: str, *, origin: str) -> int:
    """Return the logging level for ``name`` (any letter case), such as ``logging.WARNING``.

    Raises ConfigurationError naming ``origin`` (an option or variable) for an unknown name.
    """
    level = LEVELS.get(name.strip().lower())
    if level is None:
        raise ConfigurationError(
            f"{origin} is {name!r}, which is not a log level: use one of "
            f"{', '.join(LEVELS)}")
    return level


def level_from_environment(environ: Mapping[str, str], *, default: int = logging.INFO) -> int:
    """Return the level that ``DBSYNC_LOG_LEVEL`` sets, or ``default`` when it is unset or empty."""
    name = environ.get(LOG_LEVEL_VARIABLE, "")
    if not name.strip():
        return default
    return level_from_name(name, origin=f"${LOG_LEVEL_VARIABLE}")


def configure(*, json_output: bool | None = None, level: int = logging.INFO,
              stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library root logger for the process.

    ``json_output=None`` picks JSON unless ``stream`` is a terminal.
    """
    output = stream or sys.stderr
    if json_output is None:
        json_output = not output.isatty()

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if json_output
                     else structlog.dev.ConsoleRenderer(colors=output.isatty()))

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=False,
    )

    # Route standard-library loggers (alembic, kopf, psycopg) through the same renderer.
    handler = logging.StreamHandler(output)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))
