"""HTTP: the retry policy, the transfer watchdog, watched sessions."""

from __future__ import annotations

import contextlib
import io
import math
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Optional, TYPE_CHECKING

import requests
import urllib3

if TYPE_CHECKING:
    from .settings import NetworkSettings


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 2.0
    max_delay: float = 300.0

    def delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        """Exponential backoff with jitter; a server's Retry-After wins when it says more."""
        backoff = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 32))
        jittered = backoff * random.uniform(0.5, 1.0)
        if retry_after is not None:
            return min(self.max_delay, max(retry_after, jittered))
        return jittered


def retry_policy(network: NetworkSettings) -> RetryPolicy:
    """--retries and --retry-wait, as the policy of a series' attempts (and NBIA's requests)."""
    return RetryPolicy(attempts=network.retries, base_delay=network.retry_wait)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in either of its forms (RFC 9110): delay-seconds or an HTTP-date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


STALL_FLOOR = 64 * 1024     # bytes a transfer must deliver in every --stall-timeout window


class WatchedSocket:
    """A connected socket that counts what it receives, for the watchdog. http.client reads
    a response through makefile(), so the file returned here reads through this object."""

    def __init__(self, sock: socket.socket, watchdog: "TransferWatchdog"):
        self._sock = sock
        self._watchdog = watchdog
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.readers = 0                    # threads blocked in recv on it right now
        self.reader: Optional[int] = None   # the thread that read last

    def __getattr__(self, name: str) -> object:     # the rest is the socket's own
        return getattr(self._sock, name)

    def sendall(self, data: bytes, *args: int) -> None:
        self.window_start, self.window_bytes = time.monotonic(), 0   # a request: a new window
        self._sock.sendall(data, *args)

    def recv_into(self, buffer: memoryview, *args: int) -> int:
        self.readers += 1
        self.reader = threading.get_ident()
        try:
            received = self._sock.recv_into(buffer, *args)
        finally:
            self.readers -= 1
        self.window_bytes += received
        return received

    def makefile(self, mode: str = "r", buffering: Optional[int] = None,
                 **kwargs: object) -> io.IOBase:
        if mode != "rb":
            return self._sock.makefile(mode, buffering, **kwargs)
        self._sock._io_refs += 1            # as socket.makefile does: close waits for the file
        return io.BufferedReader(socket.SocketIO(self, "rb"),  # type: ignore[arg-type]
                                 buffering or io.DEFAULT_BUFFER_SIZE)

    def _decref_socketios(self) -> None:
        self._sock._decref_socketios()
        if self._sock._closed and self._sock._io_refs <= 0:      # the last reader is gone
            self._watchdog.forget(self)

    def close(self) -> None:
        # http.client closes its socket as soon as it has read the headers of an answer that
        # ends the connection (HTTP/1.0, "Connection: close"), and reads the body through
        # makefile(): the socket is watched until that file is closed too, or a server that
        # says "close" could trickle a body unwatched.
        self._sock.close()
        if self._sock._io_refs <= 0:
            self._watchdog.forget(self)

    def cut(self) -> None:
        """End the transfer from another thread: its blocked read returns at once. The plain
        socket's shutdown, also under TLS, whose own shutdown would race the reader."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)


class TransferWatchdog:
    """One thread that watches every socket of the run. The read timeout only bounds the
    silence between two bytes, so a server trickling a byte a second would hold a worker
    forever: a transfer that delivers less than STALL_FLOOR bytes in a window of
    --stall-timeout seconds is cut (a real link of 1 kB/s delivers twice that in 120 s).
    When the run must stop, every socket is cut, so no signal waits for a slow server."""

    def __init__(self, window: float, stop: threading.Event):
        self.window = window
        self._stop = stop
        self._lock = threading.Lock()
        self._sockets: set[WatchedSocket] = set()
        self._reasons: dict[int, str] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket) -> WatchedSocket:
        watched = WatchedSocket(sock, self)
        with self._lock:
            self._sockets.add(watched)
        return watched

    def forget(self, sock: WatchedSocket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def close(self) -> None:
        self._closed.set()

    def cut_reason(self) -> Optional[str]:
        """Why the watchdog cut this thread's last transfer, if it did."""
        with self._lock:
            return self._reasons.pop(threading.get_ident(), None)

    def _watch(self) -> None:
        while not self._closed.wait(min(0.25, self.window / 4)):
            with self._lock:
                sockets = list(self._sockets)
            now = time.monotonic()
            for sock in sockets:
                if self._stop.is_set():
                    self._cut(sock, "the run is stopping")
                elif now - sock.window_start >= self.window:
                    if sock.readers and sock.window_bytes < STALL_FLOOR:
                        self._cut(sock, f"stalled: {sock.window_bytes} bytes in "
                                        f"{now - sock.window_start:.0f} s, less than "
                                        f"{STALL_FLOOR // 1024} kB")
                    sock.window_start, sock.window_bytes = now, 0

    def cut_threads(self, threads: set[int], reason: str) -> None:
        """End the transfers these threads are blocked in right now (an IDC series whose
        attempt failed: a stalled sibling object would otherwise hold it for a window)."""
        with self._lock:
            blocked = [s for s in self._sockets if s.readers and s.reader in threads]
        for sock in blocked:
            self._cut(sock, reason)

    def _cut(self, sock: WatchedSocket, reason: str) -> None:
        with self._lock:
            if sock.reader is not None:
                self._reasons[sock.reader] = reason
            self._sockets.discard(sock)
        sock.cut()


def watched_pool_classes(watchdog: TransferWatchdog) -> dict[str, type]:
    """urllib3 pool classes whose connections hand their sockets to the watchdog."""
    def watched(connection_class: type) -> type:
        class Watched(connection_class):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                self.sock = watchdog.watch(self.sock)
        return Watched

    class HTTPPool(urllib3.HTTPConnectionPool):
        ConnectionCls = watched(urllib3.connection.HTTPConnection)

    class HTTPSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = watched(urllib3.connection.HTTPSConnection)

    return {"http": HTTPPool, "https": HTTPSPool}


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with the watchdog on every connection it opens (proxied too)."""

    def __init__(self, watchdog: TransferWatchdog,
                 pool_maxsize: int = requests.adapters.DEFAULT_POOLSIZE):
        self._pool_classes = watched_pool_classes(watchdog)
        super().__init__(pool_maxsize=pool_maxsize)

    def init_poolmanager(self, *args: object, **kwargs: object) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **kwargs: object) -> urllib3.PoolManager:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):       # SOCKS pools are classes of their own
            manager.pool_classes_by_scheme = self._pool_classes
        return manager


def as_requests_error(exc: Exception, in_body: bool) -> requests.RequestException:
    """urllib3's exception (or an OSError of the request) as the one requests raises for it,
    which request_failure knows: HTTPAdapter.send's translation for the request and its
    headers, Response.iter_content's for the body. For a client that sends through urllib3
    itself (IDC's objects: requests' own layers cost more CPU than the GET, sources/idc.py)."""
    errors, failed = requests.exceptions, urllib3.exceptions
    if in_body:
        kinds = ((failed.ProtocolError, errors.ChunkedEncodingError),
                 (failed.DecodeError, errors.ContentDecodingError),
                 (failed.ReadTimeoutError, errors.ConnectionError),
                 (failed.SSLError, errors.SSLError))
        return next((kind(exc) for cause, kind in kinds if isinstance(exc, cause)),
                    errors.ConnectionError(exc))
    if isinstance(exc, (failed.ProtocolError, OSError, failed.ClosedPoolError)):
        return errors.ConnectionError(exc)
    if isinstance(exc, failed.MaxRetryError):
        reason = exc.reason
        if isinstance(reason, failed.ConnectTimeoutError) and \
                not isinstance(reason, failed.NewConnectionError):
            return errors.ConnectTimeout(exc)
        if isinstance(reason, failed.ProxyError):
            return errors.ProxyError(exc)
        if isinstance(reason, failed.SSLError):
            return errors.SSLError(exc)
        return errors.ConnectionError(exc)
    kinds = ((failed.ProxyError, errors.ProxyError), (failed.SSLError, errors.SSLError),
             (failed.ReadTimeoutError, errors.ReadTimeout),
             (failed.LocationValueError, errors.InvalidURL))
    return next((kind(exc) for cause, kind in kinds if isinstance(exc, cause)),
                errors.ConnectionError(exc))


def watched_session(session: requests.Session, watchdog: TransferWatchdog,
                    user_agent: str) -> requests.Session:
    adapter = WatchedAdapter(watchdog)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent
    return session
