"""The fake website API is as strict as aspera.md and WordPress say (tests/fakes/fake_website.py)."""
from __future__ import annotations

import pytest
import requests

from fakes.fake_website import FakeWebsite


@pytest.fixture
def website():
    fake = FakeWebsite().start()
    for n in range(1, 8):
        fake.add_download(n, f"download {n}")
    fake.add_collection("Pancreas-CT", [1, 2, 3], collection_title="Pancreatic CT",
                        collection_summary="<p>CT of the pancreas.</p>")
    try:
        yield fake
    finally:
        fake.stop()


def test_pages_follow_the_link_header_and_per_page_is_at_most_100(website):
    first = requests.get(website.url + "downloads/", params={"per_page": 3}, timeout=5)
    assert first.status_code == 200 and len(first.json()) == 3
    assert first.headers["X-WP-TotalPages"] == "3"
    second = requests.get(first.links["next"]["url"], timeout=5)
    assert [r["id"] for r in second.json()] == [4, 3, 2]          # newest first
    last = requests.get(second.links["next"]["url"], timeout=5)
    assert "next" not in last.links and len(last.json()) == 1
    refused = requests.get(website.url + "downloads/", params={"per_page": 101}, timeout=5)
    assert refused.status_code == 400 and refused.json()["code"] == "rest_invalid_param"
    past = requests.get(website.url + "downloads/", params={"page": 9}, timeout=5)
    assert past.status_code == 400


def test_fields_include_and_search_as_wordpress_answers_them(website):
    rows = requests.get(website.url + "downloads", params={
        "include": "2,5", "_fields": "id,download_url"}, timeout=5).json()
    assert rows == [{"id": 5, "download_url": ""}, {"id": 2, "download_url": ""}]
    found = requests.get(website.url + "collections/", params={"search": "pancreatic"},
                         timeout=5).json()
    assert [r["collection_short_title"] for r in found] == ["Pancreas-CT"]
    missed = requests.get(website.url + "collections/", params={"search": "Pancreas-CT"},
                          timeout=5).json()
    assert missed == []                  # the short title is not in the page's title or text


def test_only_v1s_two_endpoints_exist(website):
    base = website.url.rsplit("/api/v1/", 1)[0]
    for path in ("/api/v2/collections/", "/api/v1/media/1", "/api/v1/"):
        answer = requests.get(base + path, timeout=5)
        assert answer.status_code == 404 and answer.json()["code"] == "rest_no_route"
