"""Exit codes, the exception classes (one root), what a failed request means."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Iterator, Optional

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_CHECKPOINT = 75        # sysexits' EX_TEMPFAIL: try again later
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class TciaDownloaderError(Exception):
    """The root of every exception this tool defines: `except TciaDownloaderError` catches what
    the tool raises on purpose, and nothing else."""


class UsageError(TciaDownloaderError):
    """Bad flags or input: one line for the user, exit code 2."""


class TransientError(TciaDownloaderError):
    """Worth another attempt: reset, stall, 5xx, 429, truncated zip, MD5 mismatch."""

    def __init__(self, reason: str, retry_after: Optional[float] = None,
                 immediate: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.immediate = immediate        # nothing to wait for (e.g. a renewed token)


class SeriesUnavailable(TciaDownloaderError):
    """The server refuses this series for good (400 "not granted"): no retry."""


class Md5ParameterRefused(TciaDownloaderError):
    """A server build older than 2025-11 answers IncludeMD5 with 400."""


class FatalRunError(TciaDownloaderError):
    """Stops the whole run: rejected credentials, a full disk, a broken journal."""

    def __init__(self, message: str, exit_code: int = EXIT_INCOMPLETE):
        super().__init__(message)
        self.exit_code = exit_code


class ApiError(FatalRunError):
    """A metadata request the server refuses (4xx): retrying will not help. 404 means the
    URL is not an NBIA v4 API: a mistake in --api-url (exit 2)."""

    def __init__(self, endpoint: str, status: int, body: str):
        if status == 404:
            super().__init__(f"{endpoint} answered HTTP 404 (not found): check --api-url, "
                             "which ends in /nbia-api/services/v4/", EXIT_USAGE)
        else:
            super().__init__(f"{endpoint} answered HTTP {status}: {body}")
        self.status = status


# getaddrinfo's answers for a name that does not exist (EAI_AGAIN, a resolver that did not
# answer, may pass: it is retried like an outage).
UNKNOWN_HOST = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA")
                if hasattr(socket, name)}


# OpenSSL's reasons for a handshake that can never succeed as configured (TLS spoken to a
# plain-HTTP port, no common protocol); a reset mid-handshake is an outage, not one of these.
TLS_MISMATCH = {"WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION",
                "NO_PROTOCOLS_AVAILABLE", "RECORD_LAYER_FAILURE"}


def misconfiguration(exc: BaseException, host: str, address_flag: str) -> Optional[str]:
    """What to fix when a request failed for a reason that waiting will not cure: a host
    name that does not exist, or TLS that fails (a site proxy inspecting TLS). None: retry."""
    for cause in exception_chain(exc):
        if isinstance(cause, socket.gaierror) and cause.errno in UNKNOWN_HOST:
            return (f"the host {host} does not exist (DNS): check {address_flag}; on a "
                    "compute node without internet, set --proxy (or HTTPS_PROXY)")
        if isinstance(cause, ssl.SSLCertVerificationError) or (
                isinstance(cause, ssl.SSLError) and cause.reason in TLS_MISMATCH):
            return (f"TLS with {host} failed ({cause.reason or cause}): a site proxy "
                    f"that inspects TLS needs --ca-bundle; check {address_flag} and --proxy")
    return None


@dataclass(frozen=True)
class RequestContext:
    """What request_failure needs to know of the request that failed."""
    host: str                              # the server's host name (DNS, TLS)
    server: str                            # its host[:port], as a failure names it
    address_flag: str                      # the flag that names it (--api-url, --idc-endpoint)
    timeouts: tuple[float, float]          # (connect, read) seconds
    cut: Optional[str] = None              # why the transfer watchdog cut it, if it did
    written: Optional[int] = None          # bytes of the body received (None: metadata)
    stopped: bool = False                  # a signal asked the run to stop


def request_failure(exc: BaseException, context: RequestContext) -> TciaDownloaderError:
    """What a failed HTTP request means, for every client of the tool (NBIA's metadata and
    images, IDC's listings and objects): the run was asked to stop (Interrupted); a
    misconfiguration that waiting cannot cure (FatalRunError, exit 2); else a failure worth
    another attempt (TransientError), said in words a user can act on."""
    if context.stopped:
        return Interrupted()
    misconfigured = misconfiguration(exc, context.host, context.address_flag)
    if misconfigured:
        return FatalRunError(misconfigured, EXIT_USAGE)
    return TransientError(describe_request_failure(exc, context))


def describe_request_failure(exc: BaseException, context: RequestContext) -> str:
    import requests                           # (errors is imported by --help, which needs none)
    host, written = context.server, context.written
    if written is None:                        # a metadata request: whom it failed with
        if context.cut:
            return f"{host}: {context.cut}"
        if isinstance(exc, requests.exceptions.Timeout):
            return f"{host} did not answer in time"
        if isinstance(exc, requests.exceptions.SSLError):
            return f"TLS with {host} failed (a proxy or an old CA bundle?)"
        if isinstance(exc, requests.exceptions.ConnectionError):
            return f"cannot connect to {host}"
        return f"{type(exc).__name__} from {host}"
    if context.cut:                            # a transfer: how far it came
        return f"{context.cut}, after {written} bytes"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return f"no connection within {context.timeouts[0]:.0f} s"
    # requests reports a read timeout inside a body as a ConnectionError.
    if isinstance(exc, requests.exceptions.ReadTimeout) or "timed out" in str(exc):
        return f"stalled: no byte for {context.timeouts[1]:.0f} s after {written} bytes"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return f"connection broke after {written} bytes"
    return f"connection failed after {written} bytes ({type(exc).__name__})"


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """exc and everything behind it: causes, contexts, and what requests and urllib3 wrap
    (MaxRetryError.reason, exceptions passed as arguments)."""
    seen: set[int] = set()
    stack: list[object] = [exc]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [current.__cause__, current.__context__, getattr(current, "reason", None),
                  *current.args]


class Interrupted(TciaDownloaderError):
    """A stop was requested (signal); the worker leaves without committing."""


class SeriesAttemptAbandoned(TciaDownloaderError):
    """Another object of the series failed for good: this one's download stops."""


class NotStreamable(TciaDownloaderError):
    """A zip that cannot be verified while it arrives (sources/zipstream.py): it is
    verified once it is complete, as every zip was before."""


class Md5TableMissing(TciaDownloaderError):
    """A readable zip without md5hashes.csv."""


class JournalUnusable(TciaDownloaderError):
    """A file at a journal's name that is not a readable journal of this tool: not sqlite,
    another program's tables, or a row that is not what this tool writes."""
