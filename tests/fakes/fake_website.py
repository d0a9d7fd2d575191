"""A stand-in for TCIA's website API v1 (WordPress REST, /api/v1/), on 127.0.0.1, for tests.

It behaves as shared/aspera.md documents it (what tcia_utils' `wordpress` module uses), and
as WordPress's REST API does where aspera.md is silent:

- Only GET /api/v1/collections/ and /api/v1/downloads/ (a trailing slash or not); any other
  path is 404 `{"code": "rest_no_route", ...}` - /api/v2/ too: its fields are not
  documented, so a client must not depend on it.
- Parameters `per_page` (1-100; more is 400 `rest_invalid_param`, as WordPress answers),
  `page` (past the last: 400 `rest_post_invalid_page_number`), `_fields` (a comma list: only
  those fields come back; without it, every field), `include` (ids), `search`. Unknown
  parameters are ignored, as WordPress does.
- `search` matches words anywhere in a post's title and text (not its other fields), so a
  search for "HER2" also finds "HER2-Tumor-ROIs-Extra", and a collection whose title and
  text do not hold its short title is not found by it: a client matches names itself.
- A page is a JSON list; further pages are announced in a `Link: <URL>; rel="next"` header
  (with X-WP-Total and X-WP-TotalPages), the URL carrying the query again; records come
  newest first (WordPress' default order), not in the order of `include`.
- Collections: `collection_short_title`, `collection_title`, `slug`, `collection_downloads`
  (download ids, numbers; false when there are none). Downloads: `download_title`,
  `download_type` (labels: a list), `data_type`, `file_type`, `download_access`,
  `data_license`, `download_url` (may be empty: then `download_file`, an attachment object
  with a `url`), `download_size` (a string or a number) and `download_size_unit`. Titles may
  hold HTML entities (WordPress writes `&#8211;` for an en dash).

Faults: `fail_next(n, status)` answers the next n requests with that status (503: a retry).
Every request is recorded in `requests` (path and query) for the tests to check.
"""
from __future__ import annotations

import http.server
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import parse_qs, urlencode, urlsplit

MAX_PER_PAGE = 100


@dataclass
class FakeWebsite:
    collections: list[dict] = field(default_factory=list)
    downloads: list[dict] = field(default_factory=list)
    requests: list[tuple[str, dict]] = field(default_factory=list)
    url: str = ""
    _failures: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Optional[http.server.ThreadingHTTPServer] = None

    # -- setup ----------------------------------------------------------------------------

    def add_collection(self, short_title: str, download_ids: list[int], **extra: object) -> None:
        number = 1000 + len(self.collections)
        self.collections.append({
            "id": number, "date": f"2024-01-{len(self.collections) + 1:02d}T00:00:00",
            "slug": short_title.lower(), "collection_short_title": short_title,
            "collection_title": f"{short_title} &#8211; a collection",
            "collection_summary": f"<p>About {short_title}.</p>",
            "collection_downloads": download_ids or False, **extra})

    def add_download(self, number: int, title: str, url: str = "", kind: str = "Other",
                     size: object = "1.5", unit: str = "GB", **extra: object) -> None:
        self.downloads.append({
            "id": number, "date": f"2024-02-{len(self.downloads) % 28 + 1:02d}T00:00:00",
            "download_title": title, "download_type": [kind], "data_type": ["Pathology"],
            "file_type": ["SVS"], "download_access": "Public", "data_license": "CC BY 4.0",
            "download_url": url, "download_file": False, "download_size": size,
            "download_size_unit": unit, **extra})

    def fail_next(self, count: int, status: int = 503) -> None:
        with self._lock:
            self._failures += [status] * count

    # -- the server -----------------------------------------------------------------------

    def start(self) -> "FakeWebsite":
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:            # noqa: N802 (http.server's name)
                status, body, headers = fake.answer(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/api/v1/"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def answer(self, target: str) -> tuple[int, object, dict[str, str]]:
        parts = urlsplit(target)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append((parts.path, query))
            if self._failures:
                return self._failures.pop(0), {"code": "unavailable"}, {}
        route = re.fullmatch(r"/api/v1/(collections|downloads)/?", parts.path)
        if not route:
            return 404, {"code": "rest_no_route", "message": "No route was found matching the "
                         "URL and request method.", "data": {"status": 404}}, {}
        return self.listing(parts.path, route[1], query)

    def listing(self, path: str, endpoint: str,
                query: dict[str, str]) -> tuple[int, object, dict[str, str]]:
        try:
            per_page = int(query.get("per_page", "10"))
            page = int(query.get("page", "1"))
        except ValueError:
            return invalid("per_page or page is not an integer")
        if not 1 <= per_page <= MAX_PER_PAGE:
            return invalid(f"per_page must be between 1 (inclusive) and {MAX_PER_PAGE} "
                           "(inclusive).")
        records = self.collections if endpoint == "collections" else self.downloads
        if "include" in query:
            wanted = {int(i) for i in query["include"].split(",") if i.strip().isdigit()}
            records = [r for r in records if r["id"] in wanted]
        if query.get("search"):
            records = [r for r in records if matches(r, query["search"])]
        records = sorted(records, key=lambda r: r["date"], reverse=True)
        total = len(records)
        pages = max(1, -(-total // per_page))
        if page > pages or page < 1:
            return 400, {"code": "rest_post_invalid_page_number", "message": "The page number "
                         "requested is larger than the number of pages available.",
                         "data": {"status": 400}}, {}
        rows = records[(page - 1) * per_page:page * per_page]
        if query.get("_fields"):
            keep = set(query["_fields"].split(","))
            rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
        headers = {"X-WP-Total": str(total), "X-WP-TotalPages": str(pages)}
        if page < pages:
            following = urlencode({**query, "page": str(page + 1)})
            headers["Link"] = f'<{self.url.rstrip("/").rsplit("/api/v1", 1)[0]}{path}?' \
                              f'{following}>; rel="next"'
        return 200, rows, headers

    def asked(self, endpoint: str) -> list[dict]:
        """The queries of the requests to an endpoint, in order."""
        return [query for path, query in self.requests if f"/{endpoint}" in path]


def invalid(message: str) -> tuple[int, object, dict[str, str]]:
    return 400, {"code": "rest_invalid_param", "message": f"Invalid parameter(s): {message}",
                 "data": {"status": 400}}, {}


def matches(record: dict, search: str) -> bool:
    """WordPress search: every word of the search somewhere in the post's title or text
    (here collection_title and collection_summary), not in its other fields."""
    text = " ".join(str(record.get(key) or "") for key in ("collection_title",
                                                          "collection_summary",
                                                          "download_title")).lower()
    return all(word in text for word in search.lower().split())
