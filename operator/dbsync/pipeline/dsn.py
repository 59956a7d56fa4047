"""Connection strings: validation, redaction and connecting with a bounded timeout.

A DSN may carry a password, so nothing outside this module formats a DSN for people:
use :func:`describe` (host, port and database only) or :func:`redact_text` on any
message that might quote one, such as a driver exception.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

from dbsync.pipeline.errors import ConfigurationError, ConnectionFailedError

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10
APPLICATION_NAME = "dbsync"
RV = TypeVar("RV")

# Passwords inside URIs (scheme://user:secret@host) and key=value strings (password=secret).
_URI_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^@\s]*)(?P<tail>@)",
                           re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'|\S+)",
                               re.IGNORECASE)


# A connection silent for this many connect timeouts checks its backend (WatchedConnection).
PROBE_AFTER_CONNECT_TIMEOUTS = 3
_WAIT_INTERVAL_SECONDS = 0.1

logger = logging.getLogger("dbsync.dsn")

# libpq connection parameters: probe after 30 s idle, every 10 s, and give up after 3 misses.
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
    """Database location without credentials, safe to log, store and show."""

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

    # libpq splits a URI at the first "@", so an unescaped "@" in the password leaves the
    # rest of the password in the host name.  Reject it before the host is printed or
    # looked up.
    if any("@" in parsed.get(key, "") for key in ("host", "hostaddr")):
        raise ConfigurationError(
            f"the {role} DSN is invalid (its host part contains '@', most likely from an "
            "unescaped '@' in the user name or password): percent-encode each '@' there as "
            "%40, for example postgresql://user:p%40ss@host:5432/dbname")

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
    # partition) after about 60 s, where the OS default waits two hours. libpq ignores them
    # on Unix sockets, and a DSN's own values win.
    keepalives = {key: value for key, value in _KEEPALIVE_PARAMETERS.items()
                  if key not in params}
    conninfo = make_conninfo(
        dsn, connect_timeout=str(connect_timeout_seconds), application_name=application_name,
        **keepalives)
    try:
        connection = WatchedConnection.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as error:
        address = describe(dsn, role=role)
        detail = redact_text(str(error).strip().splitlines()[0] if str(error).strip() else
                             type(error).__name__, password_of(dsn))
        raise ConnectionFailedError(
            f"cannot connect to the {role} database {address}: {detail}; check the host, "
            "port, database name and credentials") from None
    connection.watch(conninfo=conninfo, address=describe(dsn, role=role),
                     probe_after_seconds=PROBE_AFTER_CONNECT_TIMEOUTS * connect_timeout_seconds,
                     connect_timeout_seconds=connect_timeout_seconds)
    return connection


class WatchedConnection(psycopg.Connection[TupleRow]):
    """A connection that detects a server reply lost in the network.

    A statement may legitimately run for a long time without the server sending anything
    (up to its statement_timeout), and a peer that keeps TCP alive but forwards nothing (a
    stuck proxy or load balancer) looks the same to keepalives. So after
    ``probe_after_seconds`` without a byte from the server, the connection opens a second
    one and reads its own backend's state from ``pg_stat_activity``. A backend that is still
    active keeps the wait going. One that is idle or gone, or a server that cannot be
    reached within the connect timeout, ends the wait with an OperationalError, which the
    runner treats as transient.
    """

    _probe_conninfo: str = ""
    _address: DatabaseAddress | None = None
    _probe_after_seconds: float = 0.0
    _probe_connect_timeout_seconds: int = DEFAULT_CONNECT_TIMEOUT_SECONDS

    def watch(self, *, conninfo: str, address: DatabaseAddress, probe_after_seconds: float,
              connect_timeout_seconds: int) -> None:
        """Start probing after ``probe_after_seconds`` of silence (0 turns probing off)."""
        self._probe_conninfo = make_conninfo(conninfo, application_name="dbsync probe")
        self._address = address
        self._probe_after_seconds = probe_after_seconds
        self._probe_connect_timeout_seconds = connect_timeout_seconds

    def wait(self, gen: PQGen[RV], interval: float = _WAIT_INTERVAL_SECONDS,
             timeout: float | None = None) -> RV:
        watched = self._watched(gen) if self._probe_after_seconds > 0 else gen
        # psycopg 3.2's wait() has no timeout parameter, so pass it only when given.
        if timeout is None:
            return super().wait(watched, interval)
        return super().wait(watched, interval, timeout)

    def _watched(self, gen: PQGen[RV]) -> PQGen[RV]:
        # psycopg sends Ready.NONE to the generator each time its wait interval passes
        # without the socket becoming ready, so silence is measured between real events.
        try:
            state = next(gen)
            silent_since = time.monotonic()
            while True:
                ready = yield state
                now = time.monotonic()
                if ready:
                    silent_since = now
                elif now - silent_since >= self._probe_after_seconds:
                    self._probe(silent_seconds=now - silent_since)
                    silent_since = time.monotonic()
                state = gen.send(ready)
        except StopIteration as finished:
            result: RV = finished.value
            return result

    def _probe(self, *, silent_seconds: float) -> None:
        """Raise OperationalError unless this connection's backend is still working."""
        backend_pid = self.pgconn.backend_pid
        try:
            with psycopg.connect(self._probe_conninfo, autocommit=True,
                                 connect_timeout=self._probe_connect_timeout_seconds) as probe:
                row = probe.execute(
                    "SELECT state FROM pg_stat_activity WHERE pid = %s",
                    (backend_pid,)).fetchone()
        except psycopg.Error as error:
            lines = str(error).strip().splitlines()
            detail = redact_text(lines[0] if lines else type(error).__name__)
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no reply from {self._address} for {silent_seconds:.0f} s, and a new "
                f"connection failed ({detail}): the server or the network is not "
                "answering") from None
        if row is not None and row[0] == "active":
            logger.info("no reply from %s for %.0f s; its backend %d is still active",
                        self._address, silent_seconds, backend_pid)
            return
        self.pgconn.finish()
        state = "gone" if row is None else row[0]
        raise psycopg.OperationalError(
            f"no reply from {self._address} for {silent_seconds:.0f} s while its backend "
            f"{backend_pid} is {state}: the reply was lost in the network")
