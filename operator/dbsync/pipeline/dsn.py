"""Connection strings: validation, redaction and connecting with a bounded timeout.

A DSN may carry a password, so nothing outside this module formats a DSN for people:
use :func:`describe` (host, port and database only) or :func:`redact_text` on any
message that might quote one, such as a driver exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dbsync.pipeline.errors import ConfigurationError, ConnectionFailedError

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10
APPLICATION_NAME = "dbsync"

# Passwords inside URIs (scheme://user:secret@host) and key=value strings (password=secret).
_URI_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<tail>@)",
                           re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|\S+)",
                               re.IGNORECASE)


# libpq connection parameters: probe after 30 s idle, every 10 s, give up after 3 misses;
# tcp_user_timeout (ms) bounds how long sent data may stay unacknowledged.
_KEEPALIVE_PARAMETERS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}

# A double-quoted part of a libpq error message.
_QUOTED_FRAGMENT = re.compile(r'"[^"]*"')


def _mask_fragment(match: re.Match[str]) -> str:
    return match.group(0) if len(match.group(0)) <= 3 else '"***"'


@dataclass(frozen=True)
class DatabaseAddress:
    """Where a database lives, without credentials: safe to log, store and show."""

    host: str
    port: int
    database: str
    user: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"


def parse(dsn: str, *, role: str) -> dict[str, str]:
    """Parse ``dsn`` into libpq keywords, raising a ConfigurationError naming ``role``."""
    if not dsn or not dsn.strip():
        raise ConfigurationError(
            f"the {role} DSN is empty: pass a connection string such as "
            "postgresql://user@host:5432/dbname")
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as error:
        # libpq's parse errors quote the offending part of the string, which may be the
        # password itself (a space or a bad %-escape in it), so every quoted part longer
        # than libpq's own one-character punctuation ("=", "]") is masked.
        detail = _QUOTED_FRAGMENT.sub(_mask_fragment, " ".join(redact_text(str(error)).split()))
        raise ConfigurationError(
            f"the {role} DSN is invalid ({detail}): pass a connection string "
            "such as postgresql://user@host:5432/dbname") from None
    parsed = {key: str(value) for key, value in params.items() if value is not None}

    # libpq accepts a comma-separated port per host; each must be a number in range.
    for port in parsed.get("port", "").split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(
                f"the {role} DSN is invalid (port {port!r} is not a number from 1 to 65535): "
                "pass a connection string such as postgresql://user@host:5432/dbname")
    return parsed


def describe(dsn: str, *, role: str = "database") -> DatabaseAddress:
    """Return host, port, database and user of ``dsn``, never its password."""
    params = parse(dsn, role=role)
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return DatabaseAddress(
        host=host,
        port=int((params.get("port") or "5432").split(",")[0] or 5432),
        database=params.get("dbname") or params.get("user") or "",
        user=params.get("user", ""),
    )


def redact_text(text: str, *secrets: str) -> str:
    """Remove passwords of URIs and key=value DSNs, and each of ``secrets``, from ``text``."""
    cleaned = _URI_PASSWORD.sub(r"\g<head>***\g<tail>", text)
    cleaned = _KEYWORD_PASSWORD.sub(r"\g<head>***", cleaned)
    for secret in secrets:
        if secret:
            cleaned = cleaned.replace(secret, "***")
    return cleaned


def password_of(dsn: str) -> str:
    """Return the password in ``dsn`` or an empty string, for redaction lists."""
    try:
        return str(conninfo_to_dict(dsn).get("password") or "")
    except psycopg.ProgrammingError:
        return ""


def connect(
    dsn: str,
    *,
    role: str,
    autocommit: bool = False,
    connect_timeout_seconds: int = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    application_name: str = APPLICATION_NAME,
) -> psycopg.Connection[tuple[object, ...]]:
    """Open a connection to ``dsn``, turning every failure into a redacted, named error."""
    params = parse(dsn, role=role)
    # TCP keepalives end a connection whose peer has gone silent (a dead host or a network
    # partition) after about 60 s, where the OS default waits two hours; libpq ignores them
    # on Unix sockets. A DSN's own values win.
    keepalives = {key: value for key, value in _KEEPALIVE_PARAMETERS.items()
                  if key not in params}
    conninfo = make_conninfo(
        dsn, connect_timeout=str(connect_timeout_seconds), application_name=application_name,
        **keepalives)
    try:
        return psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as error:
        address = describe(dsn, role=role)
        detail = redact_text(str(error).strip().splitlines()[0] if str(error).strip() else
                             type(error).__name__, password_of(dsn))
        raise ConnectionFailedError(
            f"cannot connect to the {role} database {address}: {detail}; check the host, "
            "port, database name and credentials") from None
