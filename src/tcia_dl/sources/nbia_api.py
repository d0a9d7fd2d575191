"""NBIA v4's REST client: tokens, TciaApi, getImage."""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit, urlunsplit

import requests
import requests_cache

from .. import __version__
from ..errors import (ApiError, EXIT_USAGE, FatalRunError, Interrupted, Md5ParameterRefused,
                      RequestContext, SeriesUnavailable, TransientError, request_failure)
from ..logs import log
from ..net import RetryPolicy, TransferWatchdog, parse_retry_after, watched_session
from ..plan import usable_records
from ..settings import CHUNK_SIZE
from ..storage import raise_if_disk_full


def token_url_for(api_url: str) -> str:
    """The OAuth endpoint lives at <host>/nbia-api/oauth/token beside .../services/v4/."""
    parts = urlsplit(api_url)
    prefix = parts.path.split("/nbia-api/")[0] if "/nbia-api/" in parts.path else ""
    return urlunsplit((parts.scheme, parts.netloc, f"{prefix}/nbia-api/oauth/token", "", ""))


class TokenManager:
    """Keycloak password-grant tokens for private NBIA servers, renewed before expiry and
    after a 401; one renewal is shared by every worker thread."""

    RENEW_MARGIN = 120.0  # seconds before expiry (a tenth of a shorter lifetime)

    def __init__(self, token_url: str, user: Optional[str], password: Optional[str],
                 session: requests.Session, timeout: tuple[float, float],
                 transport: dict[str, object], stop: threading.Event):
        self._url = token_url
        self._stop = stop
        self._transport = transport
        self._user = user
        self._password = password
        self._session = session
        self._timeout = timeout
        self._lock = threading.Lock()
        self._access: Optional[str] = None
        self._refresh: Optional[str] = None
        self._renew_at = 0.0
        self._refresh_until = 0.0

    @property
    def enabled(self) -> bool:
        return self._user is not None

    def secrets(self) -> list[str]:
        """What the log filter must never let through."""
        return [s for s in (self._password, self._access, self._refresh) if s]

    def headers(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        with self._lock:
            if self._access is None or time.monotonic() > self._renew_at:
                self._renew_locked()
            return {"Authorization": f"Bearer {self._access}"}

    def rejected(self, sent_headers: dict[str, str]) -> None:
        """A request carrying these headers got 401: renew, unless another worker already has."""
        if not self.enabled:
            raise FatalRunError("the server wants a login (401): pass --user for this NBIA server",
                                EXIT_USAGE)
        with self._lock:
            if sent_headers.get("Authorization") == f"Bearer {self._access}":
                self._access = None
                self._renew_locked()

    def _renew_locked(self) -> None:
        if self._refresh and time.monotonic() < self._refresh_until:
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh,
                    "client_id": "NBIA"}
            if self._request_token(form):
                log.debug("access token renewed with the refresh token")
                return
        form = {"grant_type": "password", "username": self._user, "password": self._password,
                "client_id": "NBIA"}
        if not self._request_token(form):
            raise FatalRunError(f"the server rejected the login of user {self._user!r}: "
                                "check --user and the password", EXIT_USAGE)
        log.debug("new access token for user %s", self._user)

    def _lifetime_less_margin(self, lifetime: float) -> float:
        return lifetime - min(self.RENEW_MARGIN, lifetime / 10)

    def _request_token(self, form: dict[str, Optional[str]]) -> bool:
        for attempt in range(1, 5):
            try:
                response = self._session.post(self._url, data=form, timeout=self._timeout,
                                              **self._transport)
            except requests.RequestException as exc:
                log.warning("token request failed (%s); retrying", type(exc).__name__)
                self._wait(RetryPolicy().delay(attempt))
                continue
            if response.status_code >= 500 or response.status_code == 429:
                self._wait(RetryPolicy().delay(attempt, parse_retry_after(
                    response.headers.get("Retry-After"))))
                continue
            if response.status_code != 200:
                return False
            try:
                body = response.json()
                access = str(body["access_token"])
                lifetime = float(body.get("expires_in", 300))
                refresh_lifetime = float(body.get("refresh_expires_in", 0))
            except (ValueError, TypeError, KeyError, AttributeError):
                raise FatalRunError("the token service answered without a usable token: is "
                                    "--api-url an NBIA server?") from None
            now = time.monotonic()
            self._access = access
            self._refresh = body.get("refresh_token")
            self._renew_at = now + self._lifetime_less_margin(lifetime)
            self._refresh_until = now + self._lifetime_less_margin(refresh_lifetime)
            return True
        raise FatalRunError("the token service did not answer: try again later")

    def _wait(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Interrupted()


class TciaApi:
    """One object per concern of talking to NBIA v4: cached metadata GETs with retries,
    streamed series zips with a stall watchdog, and optional tokens."""

    def __init__(self, base_url: str, *, cache_path: Optional[Path], cache_expiry: timedelta,
                 user: Optional[str], password: Optional[str], connect_timeout: float,
                 stall_timeout: float, retry: RetryPolicy, stop: threading.Event,
                 proxy: Optional[str] = None, ca_bundle: Optional[Path] = None):
        self.base_url = base_url
        self.retry = retry
        self.stop = stop
        self.watchdog = TransferWatchdog(stall_timeout, stop)
        # (connect, read): the read timeout is the stall watchdog. It bounds the time
        # between two received bytes, never the whole transfer, so a 2 GB series over a
        # slow link is fine while a silent connection is dropped after stall_timeout.
        self.timeout = (connect_timeout, stall_timeout)
        # Given per request, because requests lets $HTTPS_PROXY and $REQUESTS_CA_BUNDLE
        # override what a session says, while the user's flags must win.
        self.transport: dict[str, object] = {}
        if proxy:
            self.transport["proxies"] = {"http": proxy, "https": proxy}
        if ca_bundle:
            self.transport["verify"] = str(ca_bundle)
        self._user_agent = f"tcia_downloader/{__version__}"
        if cache_path is not None:
            # Metadata only: image zips and tokens go through plain sessions below.
            metadata = requests_cache.CachedSession(
                str(cache_path), backend="sqlite", expire_after=cache_expiry,
                allowable_methods=("GET",), allowable_codes=(200,), stale_if_error=True)
        else:
            metadata = requests.Session()
        self._metadata = watched_session(metadata, self.watchdog, self._user_agent)
        self._local = threading.local()    # one keep-alive connection per worker thread
        self.tokens = TokenManager(token_url_for(base_url), user, password,
                                   self._plain_session(), (connect_timeout, stall_timeout),
                                   self.transport, stop)

    def _plain_session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = watched_session(requests.Session(), self.watchdog, self._user_agent)
            self._local.session = session
        return session

    def close_thread_session(self) -> None:
        """A thread that downloads once (a series streamed while it arrives) closes its
        keep-alive connection as it ends: the watchdog would otherwise keep its socket."""
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            del self._local.session

    def close(self) -> None:
        self.watchdog.close()
        self._metadata.close()

    # -- metadata ---------------------------------------------------------------------------

    def get_json(self, endpoint: str, **params: str) -> list[dict]:
        """GET a metadata endpoint; NBIA answers an empty result with an empty body."""
        return self._json(endpoint, self._metadata_request("GET", endpoint, params=params))

    def post_json(self, endpoint: str, form: dict[str, str]) -> list[dict]:
        return self._json(endpoint, self._metadata_request("POST", endpoint, data=form))

    def _json(self, endpoint: str, response: requests.Response) -> list[dict]:
        """The rows of an answer: a JSON list of objects; anything else is one line."""
        if not response.content.strip():
            return []
        try:
            rows = response.json()
        except ValueError:
            raise FatalRunError(f"{endpoint} answered with something that is not JSON: "
                                f"{response.text[:120]!r}; is --api-url an NBIA v4 "
                                "URL?") from None
        if not isinstance(rows, list):
            raise FatalRunError(f"{endpoint} answered with a JSON {type(rows).__name__}, not "
                                "a list of rows; is --api-url an NBIA v4 URL?")
        objects = [row for row in rows if isinstance(row, dict)]
        if len(objects) < len(rows):
            log.warning("%s: ignored %d of %d rows that are not JSON objects", endpoint,
                        len(rows) - len(objects), len(rows))
        return objects

    def series_hash(self, series_uid: str) -> Optional[str]:
        """getMD5Hierarchy of one series: the MD5 of its images' sorted MD5 hex strings
        (shared/nbia-v4.md; unconfirmed on live data, so NbiaSource checks it against an
        md5hashes.csv when it can). None when there is no such answer."""
        try:
            response = self._metadata_request("POST", "getMD5Hierarchy",
                                              data={"SeriesInstanceUID": series_uid})
        except (ApiError, FatalRunError) as exc:
            log.debug("getMD5Hierarchy of %s: %s", series_uid, exc)
            return None
        text = response.text.strip().lower()
        return text if re.fullmatch(r"[0-9a-f]{32}", text) else None

    def collections(self) -> list[str]:
        return sorted({str(row["Collection"]) for row in self.get_json("getCollectionValues")
                       if row.get("Collection")})

    def series(self, **parameters: str) -> list[dict]:
        """getSeries with exact NBIA v4 parameter names (Collection, PatientID, ...); only
        the rows that can be planned (see usable_records)."""
        return usable_records(self.get_json("getSeries", **parameters), "getSeries")

    def series_metadata(self, uids: list[str]) -> list[dict]:
        """POST getSeriesMetadata: thousands of UIDs per call, unknown ones dropped."""
        return self.post_json("getSeriesMetadata", {"list": ",".join(uids), "format": "json"})

    def _metadata_request(self, method: str, endpoint: str, params: Optional[dict] = None,
                          data: Optional[dict] = None) -> requests.Response:
        url = self.base_url + endpoint
        last = ""
        for attempt in range(1, self.retry.attempts + 1):
            self.check_stop()
            headers = self.tokens.headers()
            try:
                response = self._metadata.request(method, url, params=params, data=data,
                                                  headers=headers, timeout=self.timeout,
                                                  **self.transport)
            except requests.RequestException as exc:
                self.check_stop()
                failure = request_failure(exc, self._request_context(None))
                if isinstance(failure, FatalRunError):
                    raise failure from None
                last = str(failure)
                self._pause(attempt, f"{endpoint}: {last}")
                continue
            if response.status_code == 200:
                return response
            if response.status_code == 401:
                self.tokens.rejected(headers)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                self._pause(attempt, f"{endpoint}: {last}",
                            parse_retry_after(response.headers.get("Retry-After")))
                continue
            raise ApiError(endpoint, response.status_code, response.text.strip()[:200])
        raise FatalRunError(f"{endpoint} kept failing ({last}) after {self.retry.attempts} "
                            "attempts; the service may be down, try again later (if it is "
                            "not: check --api-url, and --proxy or HTTPS_PROXY on a node "
                            "without internet)")

    def _request_context(self, written: Optional[int]) -> RequestContext:
        address = urlsplit(self.base_url)
        return RequestContext(host=str(address.hostname), server=address.netloc,
                              address_flag="--api-url",
                              timeouts=self.timeout, cut=self.watchdog.cut_reason(),
                              written=written, stopped=self.stop.is_set())

    def _pause(self, attempt: int, what: str, retry_after: Optional[float] = None) -> None:
        if attempt >= self.retry.attempts:
            return
        delay = self.retry.delay(attempt, retry_after)
        log.warning("%s; retrying in %.0f s", what, delay)
        if self.stop.wait(delay):
            raise Interrupted()

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    # -- images -----------------------------------------------------------------------------

    def download_zip(self, endpoint: str, series_uid: str, dest: Path,
                     on_bytes: Callable[[int], None], limit: Optional[int] = None) -> int:
        """One attempt at streaming a series zip to dest; returns the bytes written. More
        than limit bytes is a bad transfer: a server must not fill the scratch disk.

        Raises TransientError for anything worth retrying, SeriesUnavailable for a refusal,
        Md5ParameterRefused when an old server build refuses IncludeMD5."""
        params = {"SeriesInstanceUID": series_uid}
        if endpoint == "getImage":
            params.update(NewFileNames="Yes", IncludeMD5="Yes")
        headers = self.tokens.headers()
        session = self._plain_session()
        written = 0
        try:
            with session.get(self.base_url + endpoint, params=params, headers=headers,
                             stream=True, timeout=self.timeout, **self.transport) as response:
                self._raise_for_image_status(response, headers)
                with open(dest, "wb") as out:
                    for chunk in response.iter_content(CHUNK_SIZE):
                        if self.stop.is_set():
                            raise Interrupted()
                        out.write(chunk)
                        out.flush()        # a reader of the growing file sees what is counted
                        written += len(chunk)
                        on_bytes(len(chunk))
                        if limit is not None and written > limit:
                            raise TransientError(f"the server sent more than {limit} bytes, "
                                                 "more than the series' FileSize allows; "
                                                 "cut off")
        except requests.RequestException as exc:
            raise request_failure(exc, self._request_context(written)) from None
        except OSError as exc:
            raise_if_disk_full(exc, dest.parent)
            raise
        return written

    def _raise_for_image_status(self, response: requests.Response,
                                sent_headers: dict[str, str]) -> None:
        status = response.status_code
        if status == 200:
            return
        body = response.text.strip()
        if status == 400 and "IncludeMD5" in body and "Invalid query parameter" in body:
            raise Md5ParameterRefused()
        if status == 400 and "not been granted" in body:
            raise SeriesUnavailable("the server refuses it (400: not granted, or no such series)")
        if status == 401:
            self.tokens.rejected(sent_headers)
            raise TransientError("401: the token was rejected; renewed it", immediate=True)
        if status == 429:
            raise TransientError("HTTP 429 (rate limited)",
                                 parse_retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            raise TransientError(f"HTTP {status} from the server")
        raise SeriesUnavailable(f"HTTP {status}: {body[:200]}")


class ImageEndpoint:
    """Which image endpoint the run uses, and how a zip without md5hashes.csv is verified.
    getImage with IncludeMD5=Yes, while the server honours the parameter or, ignoring it,
    its getMD5Hierarchy series hashes verify each zip as a whole; switches once, for the
    whole run, to getImageWithMD5Hash when the server refuses the parameter, or ignores it
    and its series hashes turn out unusable (no answer, or not the hash of the MD5s its own
    md5hashes.csv lists: the formula is unconfirmed on live data)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.name = "getImage"
        self.series_hash_usable = True
        self._without_table_said = False

    def zips_come_without_table(self) -> None:
        with self._lock:
            if not self._without_table_said:
                self._without_table_said = True
                log.info("this server ignores IncludeMD5=Yes (its zips have no md5hashes.csv):"
                         " each zip is verified as a whole against its series' getMD5Hierarchy"
                         " hash")

    def distrust_series_hash(self, why: str) -> None:
        with self._lock:
            usable, self.series_hash_usable = self.series_hash_usable, False
        if usable:
            log.info("getMD5Hierarchy %s: a zip without md5hashes.csv is downloaded again "
                     "from getImageWithMD5Hash", why)
            self.fall_back("ignores IncludeMD5=Yes, and its series hashes cannot stand in")

    def fall_back(self, why: str) -> None:
        with self._lock:
            if self.name == "getImage":
                self.name = "getImageWithMD5Hash"
                log.info("this server %s; using getImageWithMD5Hash for the rest of the run", why)
