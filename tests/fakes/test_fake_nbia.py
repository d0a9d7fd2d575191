"""Tests of the fake NBIA v4 server itself: every quirk and every fault, seen on the wire.

Where chunking, resets and stalls matter the tests speak raw HTTP/1.1 over a socket; elsewhere
they use requests. Only servers started on 127.0.0.1 by the tests are contacted.
"""
from __future__ import annotations

import concurrent.futures
import csv
import email.utils
import errno
import hashlib
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import requests

from fakes import fake_nbia
from fakes.fake_nbia import BODY_500, FakeConfig, FakeNbia, Faults

HERE = Path(__file__).resolve().parent
DATE = re.compile(r"^\d{2}-\d{2}-\d{4}$")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def get(fake: FakeNbia, endpoint: str, params: dict | list | None = None, **kw) -> requests.Response:
    return requests.get(fake.url + endpoint, params=params, timeout=10, **kw)


def demo_uids(fake: FakeNbia) -> list[str]:
    return [r["SeriesInstanceUID"] for r in fake.series("DEMO")]


def zip_of(resp: requests.Response) -> zipfile.ZipFile:
    assert resp.status_code == 200, resp.text
    return zipfile.ZipFile(io.BytesIO(resp.content))


def md5_rows(z: zipfile.ZipFile) -> list[tuple[str, str]]:
    text = z.read("md5hashes.csv").decode()
    lines = text.split("\n")
    assert lines[0] == "Filename,MD5Hash" and lines[-1] == ""
    assert "\r" not in text and '"' not in text
    return [tuple(line.split(",")) for line in lines[1:-1]]


def connect(fake: FakeNbia, timeout: float = 5.0) -> socket.socket:
    u = urllib.parse.urlsplit(fake.url)
    return socket.create_connection((u.hostname, u.port), timeout=timeout)


def request_bytes(path: str, method: str = "GET", body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method == "POST":
        lines += ["Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def v4_path(endpoint: str, params: dict | None = None) -> str:
    return fake_nbia.API_PREFIX + endpoint + ("?" + urllib.parse.urlencode(params) if params else "")


@dataclass
class Raw:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)
    terminated: bool = False            # the terminating zero-length chunk was received

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def read_raw(f: io.BufferedReader) -> Raw:
    """One HTTP/1.1 response, parsed by hand so chunk framing is visible."""
    status_line = f.readline().decode()
    assert status_line.startswith("HTTP/1.1 "), status_line
    raw = Raw(int(status_line.split()[1]), [])
    while (line := f.readline().decode()) not in ("\r\n", ""):
        k, _, v = line.rstrip("\r\n").partition(":")
        raw.headers.append((k.strip(), v.strip()))
    if (raw.header("Transfer-Encoding") or "").lower() == "chunked":
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                assert f.readline() == b"\r\n"
                raw.terminated = True
                break
            data = f.read(size)
            assert len(data) == size, "short chunk"
            assert f.read(2) == b"\r\n"
            raw.chunks.append(data)
        raw.body = b"".join(raw.chunks)
    else:
        n = int(raw.header("Content-Length") or 0)
        raw.body = f.read(n)
    return raw


def raw_get(fake: FakeNbia, endpoint: str, params: dict | None = None, headers: dict | None = None) -> Raw:
    with connect(fake) as s, s.makefile("rb") as f:
        s.sendall(request_bytes(v4_path(endpoint, params), headers=headers))
        return read_raw(f)


def read_until_error(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Everything the server sends until EOF or an error (reset, timeout)."""
    got = bytearray()
    while True:
        try:
            data = sock.recv(65536)
        except (OSError, socket.timeout) as exc:
            return bytes(got), exc
        if not data:
            return bytes(got), None
        got += data


# ---------------------------------------------------------------------------------------------
# Metadata endpoints and their quirks
# ---------------------------------------------------------------------------------------------

def test_collections_in_every_format(fake_nbia):
    r = get(fake_nbia, "getCollectionValues")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.json() == [{"Collection": "CPTAC-GBM"}, {"Collection": "DEMO"}, {"Collection": "Pancreas-CT"}]
    assert fake_nbia.collections() == ["CPTAC-GBM", "DEMO", "Pancreas-CT"]
    assert get(fake_nbia, "getCollectionValues", {"format": "csv"}).text == "Collection\nCPTAC-GBM\nDEMO\nPancreas-CT\n"
    xml = get(fake_nbia, "getCollectionValues", {"format": "xml"}).text
    assert xml.startswith("<?xml") and "<Collection type='java.lang.String'>DEMO</Collection>" in xml
    assert "<TD>Pancreas-CT</TD>" in get(fake_nbia, "getCollectionValues", {"format": "html"}).text


@pytest.mark.parametrize("endpoint,bad,allowed", [
    ("getSeries", "collection", "[Collection, format, PatientID, StudyInstanceUID, Modality, BodyPartExamined, "
                                "ManufacturerModelName, Manufacturer, SeriesInstanceUID]"),
    ("getPatient", "PatientID", "[Collection, format, PatientId]"),          # getPatient wants PatientId
    ("getPatientStudy", "PatientId", "[Collection, PatientID, StudyInstanceUID, format]"),
    ("getCollectionValues", "Format", "[format]"),
    ("getImageWithMD5Hash", "NewFileNames", "[SeriesInstanceUID]"),
    ("getImage", "seriesinstanceuid", "[SeriesInstanceUID, NewFileNames, IncludeMD5]"),
])
def test_unknown_or_wrong_case_parameter_is_400(fake_nbia, endpoint, bad, allowed):
    r = get(fake_nbia, endpoint, {bad: "x"})
    assert r.status_code == 400
    assert r.text == f"Invalid query parameter: '{bad}'. Allowed parameters are: {allowed}"


def test_unknown_format_endpoint_and_method(fake_nbia):
    r = get(fake_nbia, "getSeries", {"Collection": "DEMO", "format": "yaml"})
    assert r.status_code == 500 and r.text == "Server was not able to process your request"
    assert get(fake_nbia, "getNoSuchThing").status_code == 404
    assert requests.post(fake_nbia.url + "getSeries", timeout=10).status_code == 405
    assert get(fake_nbia, "getSeriesMetadata").status_code == 405


def test_right_case_parameters_are_accepted(fake_nbia):
    assert get(fake_nbia, "getPatient", {"PatientId": "DEMO-0001"}).json()[0]["PatientId"] == "DEMO-0001"
    assert get(fake_nbia, "getPatientStudy", {"PatientID": "DEMO-0001"}).status_code == 200


@pytest.mark.parametrize("endpoint,params", [
    ("getSeries", {"Collection": "No-Such-Collection"}),
    ("getSeries", {"Collection": "DEMO", "Modality": "XX"}),
    ("getPatient", {"Collection": "No-Such-Collection"}),
    ("getPatientStudy", {"PatientID": "nobody"}),
    ("getSeriesSize", {"SeriesInstanceUID": "1.2.3"}),
    ("getSOPInstanceUIDs", {"SeriesInstanceUID": "1.2.3"}),
    ("getUpdatedSeries", {"fromDate": "01-01-2099"}),
])
def test_empty_result_is_200_with_empty_body(fake_nbia, endpoint, params):
    r = get(fake_nbia, endpoint, params)
    assert r.status_code == 200 and r.content == b"" and r.headers["Content-Length"] == "0"


def test_series_records_as_served(fake_nbia):
    for collection in fake_nbia.collections():
        served = get(fake_nbia, "getSeries", {"Collection": collection}).json()
        assert served == fake_nbia.series(collection)
        for rec in served:
            assert None not in rec.values()
            assert all(isinstance(rec[k], int) for k in ("ImageCount", "FileSize"))
            assert isinstance(rec.get("SeriesNumber", 0), int)
            for k in ("SeriesDate", "StudyDate", "DateReleased"):
                assert k not in rec or DATE.match(rec[k]), rec[k]
            files = fake_nbia.instances(rec["SeriesInstanceUID"])
            assert rec["ImageCount"] == len(files)
            assert rec["FileSize"] == sum(len(b) for _, b in files)
    pancreas = fake_nbia.series("Pancreas-CT")
    assert len(pancreas) == 80 and {r["Modality"] for r in pancreas} == {"CT"}  # as NBIA lists it
    assert sum("SeriesDate" not in r for r in pancreas) == 80          # null keys left out
    assert "StudyDescription" not in pancreas[0] and pancreas[0]["StudyDesc"] == "Pancreas"


def test_analysis_results_only_when_asked_for(fake_nbia_factory):
    fake = fake_nbia_factory(instances=1, demo_series=0, analysis_results=True)
    pancreas = fake.series("Pancreas-CT")
    assert len(pancreas) == 160 and sum(r["Modality"] == "SEG" for r in pancreas) == 80


def test_real_metadata_scaled_down_and_rewritten(fake_nbia_factory):
    fake = fake_nbia_factory(instances=2, demo_series=0)
    original = {r["SeriesInstanceUID"]: r for r in json.loads((HERE.parent / "data" / "Pancreas-CT.series.json").read_text())}
    for rec in fake.series("Pancreas-CT"):
        orig = original[rec["SeriesInstanceUID"]]
        assert rec["ImageCount"] == min(orig["ImageCount"], 2)
        for key in ("StudyInstanceUID", "PatientID", "Modality", "SeriesDescription", "LicenseName"):
            assert rec[key] == orig[key]
        assert rec["LicenseURI"].startswith("https://creativecommons.org/") and DATE.match(rec["DateReleased"])
    assert fake.collections() == ["CPTAC-GBM", "Pancreas-CT"]


@pytest.mark.parametrize("key", ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                                 "BodyPartExamined", "Manufacturer", "ManufacturerModelName"])
def test_every_getseries_filter(fake_nbia, key):
    everything = [r for c in fake_nbia.collections() for r in fake_nbia.series(c)]
    value = next(r[key] for r in reversed(everything) if key in r)
    expected = [r for r in everything if r.get(key) == value]
    assert get(fake_nbia, "getSeries", {key: value}).json() == expected
    demo_only = [r for r in expected if r["Collection"] == "DEMO"]
    r = get(fake_nbia, "getSeries", {key: value, "Collection": "DEMO"})
    assert (r.json() if r.content else []) == demo_only


def test_series_csv_is_quoted(fake_nbia):
    text = get(fake_nbia, "getSeries", {"Collection": "DEMO", "format": "csv"}).text
    rows = list(csv.reader(io.StringIO(text)))
    assert text.startswith('"SeriesInstanceUID","StudyInstanceUID","Modality",')
    assert len(rows) == 1 + len(fake_nbia.series("DEMO"))


def test_patients_and_studies(fake_nbia):
    patients = get(fake_nbia, "getPatient", {"Collection": "DEMO"}).json()
    assert [p["PatientId"] for p in patients] == ["DEMO-0001", "DEMO-0002", "DEMO-0003", "DEMO-0004"]
    assert {"PatientId", "PatientName", "PatientSex", "Collection"} <= set(patients[0])
    demo = fake_nbia.series("DEMO")
    studies = get(fake_nbia, "getPatientStudy", {"Collection": "DEMO"}).json()
    assert sum(s["SeriesCount"] for s in studies) == len(demo)
    assert {s["StudyInstanceUID"] for s in studies} == {r["StudyInstanceUID"] for r in demo}
    per_patient = {}
    for s in studies:
        per_patient.setdefault(s["PatientID"], []).append(s)
        assert DATE.match(s["StudyDate"]) and s["StudyDescription"]
    assert sorted(len(v) for v in per_patient.values()) == [1, 1, 2, 2]     # some multi-study patients
    assert len({r["Modality"] for r in demo}) >= 3


def test_series_size_and_sop_uids(fake_nbia):
    for rec in fake_nbia.series("DEMO")[:3]:
        uid = rec["SeriesInstanceUID"]
        size = get(fake_nbia, "getSeriesSize", {"SeriesInstanceUID": uid}).json()
        assert size == [{"TotalSizeInBytes": rec["FileSize"], "ObjectCount": rec["ImageCount"]}]
        sops = [x["SOPInstanceUID"] for x in get(fake_nbia, "getSOPInstanceUIDs", {"SeriesInstanceUID": uid}).json()]
        assert sops == [pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for _, b in fake_nbia.instances(uid)]
        for sop in sops:
            assert re.fullmatch(r"[0-9.]{1,64}", sop) and not re.search(r"\.0\d", sop)


def test_series_metadata_post(fake_nbia):
    uids = demo_uids(fake_nbia)[:3]
    r = requests.post(fake_nbia.url + "getSeriesMetadata", data={"list": ",".join(uids + ["9.9.9"])}, timeout=10)
    assert r.status_code == 200 and r.text.startswith('"Patient ID","Patient Name",')
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [row["Series Instance UID"] for row in rows] == uids                 # unknown UID dropped
    assert rows[0]["File Size"] == str(fake_nbia.series("DEMO")[0]["FileSize"])
    j = requests.post(fake_nbia.url + "getSeriesMetadata", data={"list": ",".join(uids), "format": "json"}, timeout=10)
    assert [x["Series Instance UID"] for x in j.json()] == uids
    assert isinstance(j.json()[0]["Image Count"], int)
    assert requests.post(fake_nbia.url + "getSeriesMetadata", data={"list": "9.9.9"}, timeout=10).content == b""
    assert requests.post(fake_nbia.url + "getSeriesMetadata", data={}, timeout=10).status_code == 400


def test_series_metadata_compact_headers(fake_nbia_factory):
    fake = fake_nbia_factory(metadata_headers="compact", real_collections=False)
    r = requests.post(fake.url + "getSeriesMetadata", data={"list": demo_uids(fake)[0]}, timeout=10)
    assert r.text.startswith('"PatientID","PatientName",')


def test_md5_hierarchy(fake_nbia):
    def post(**form):
        return requests.post(fake_nbia.url + "getMD5Hierarchy", data=form, timeout=10).text

    def combine(hashes):
        return md5("".join(sorted(hashes)).encode())

    demo = fake_nbia.series("DEMO")
    series_hash = {r["SeriesInstanceUID"]: combine(md5(b) for _, b in fake_nbia.instances(r["SeriesInstanceUID"]))
                   for r in demo}
    uid = demo[0]["SeriesInstanceUID"]
    assert post(SeriesInstanceUID=uid) == series_hash[uid]
    study = demo[0]["StudyInstanceUID"]
    study_hash = combine(series_hash[r["SeriesInstanceUID"]] for r in demo if r["StudyInstanceUID"] == study)
    assert post(StudyInstanceUID=study) == study_hash
    studies = {}
    for r in demo:
        studies.setdefault(r["PatientID"], {}).setdefault(r["StudyInstanceUID"], []).append(series_hash[r["SeriesInstanceUID"]])
    patient_hash = {p: combine(combine(v) for v in st.values()) for p, st in studies.items()}
    assert post(PatientID="DEMO-0001") == patient_hash["DEMO-0001"]
    assert post(Collection="DEMO") == combine(patient_hash.values())
    assert post(SeriesInstanceUID="9.9.9") == ""


def test_updated_series(fake_nbia):
    everything = [r for c in fake_nbia.collections() for r in fake_nbia.series(c)]
    dates = sorted({time.strptime(r["DateReleased"], "%m-%d-%Y") for r in everything})
    pivot = dates[len(dates) // 2]
    expected = {r["SeriesInstanceUID"] for r in everything if time.strptime(r["DateReleased"], "%m-%d-%Y") >= pivot}
    got = get(fake_nbia, "getUpdatedSeries", {"fromDate": time.strftime("%m-%d-%Y", pivot)}).json()
    assert {r["SeriesInstanceUID"] for r in got} == expected and 0 < len(expected) < len(everything)


def test_single_image(fake_nbia):
    uid = demo_uids(fake_nbia)[0]
    name, data = fake_nbia.instances(uid)[2]
    sop = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    r = get(fake_nbia, "getSingleImage", {"SeriesInstanceUID": uid, "SOPInstanceUID": sop})
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom" and r.content == data


# ---------------------------------------------------------------------------------------------
# Zips
# ---------------------------------------------------------------------------------------------

def test_getimage_zip_on_the_wire_and_keep_alive(fake_nbia):
    uid = demo_uids(fake_nbia)[0]
    with connect(fake_nbia) as s, s.makefile("rb") as f:
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
        first = read_raw(f)
        # the same connection serves further requests: metadata, a 400, and another zip
        s.sendall(request_bytes(v4_path("getCollectionValues")))
        second = read_raw(f)
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": "1.2.3"})))
        third = read_raw(f)
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid, "NewFileNames": "Yes"})))
        fourth = read_raw(f)
    assert first.status == 200 and first.terminated and first.chunks
    assert first.header("Content-Length") is None
    assert first.header("Transfer-Encoding") == "chunked"
    assert first.header("Content-Type") == "application/octet-stream"
    assert first.header("Content-Disposition") == f'attachment; filename="{uid}.zip"'
    z = zipfile.ZipFile(io.BytesIO(first.body))
    assert z.testzip() is None
    assert z.namelist() == ["LICENSE", "00000001.dcm", "00000002.dcm", "00000003.dcm", "00000004.dcm"]
    assert z.read("LICENSE").decode().startswith(
        "License Information. The DEMO collection is distributed under the CC BY 4.0 at https://creativecommons.org/")
    assert all(i.flag_bits & 0x08 for i in z.infolist())           # data descriptors: streamed
    assert second.status == 200 and json.loads(second.body)[0] == {"Collection": "CPTAC-GBM"}
    assert third.status == 400
    z4 = zipfile.ZipFile(io.BytesIO(fourth.body))
    assert z4.namelist() == ["LICENSE", "1-1.dcm", "1-2.dcm", "1-3.dcm", "1-4.dcm"]
    assert [z4.read(n) for n in z4.namelist()[1:]] == [z.read(n) for n in z.namelist()[1:]]
    assert fake_nbia.counters.complete_downloads(uid) == 2


def test_new_file_names_padding_and_order(fake_nbia_factory):
    fake = fake_nbia_factory(instances=12, demo_series=1, real_collections=False)
    uid = demo_uids(fake)[0]
    z = zip_of(get(fake, "getImage", {"SeriesInstanceUID": uid, "NewFileNames": "Yes"}))
    names = z.namelist()[1:]
    assert names == [f"1-{i:02d}.dcm" for i in range(1, 13)]
    numbers = [pydicom.dcmread(io.BytesIO(z.read(n))).InstanceNumber for n in names]
    assert numbers == list(range(1, 13))
    assert [n for n, _ in fake.instances(uid)] == names


def test_zip_stored_option(fake_nbia_factory):
    fake = fake_nbia_factory(zip_deflate=False, real_collections=False, demo_series=1)
    z = zip_of(get(fake, "getImage", {"SeriesInstanceUID": demo_uids(fake)[0]}))
    assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    fake2 = fake_nbia_factory(real_collections=False, demo_series=1)
    z2 = zip_of(get(fake2, "getImage", {"SeriesInstanceUID": demo_uids(fake2)[0]}))
    assert {i.compress_type for i in z2.infolist()} == {zipfile.ZIP_DEFLATED}


def test_include_md5_modes(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False)
    uids = demo_uids(fake)
    params = {"SeriesInstanceUID": uids[0], "NewFileNames": "Yes", "IncludeMD5": "Yes"}
    # default: accepted but ignored
    assert fake.config.include_md5 == "ignore" and FakeConfig().include_md5 == "ignore"
    assert "md5hashes.csv" not in zip_of(get(fake, "getImage", params)).namelist()
    # honoured: md5hashes.csv last, correct, rows in arbitrary order
    fake.config.include_md5 = "honour"
    orders = []
    for uid in uids:
        z = zip_of(get(fake, "getImage", {**params, "SeriesInstanceUID": uid}))
        assert z.namelist()[0] == "LICENSE" and z.namelist()[-1] == "md5hashes.csv"
        rows = md5_rows(z)
        assert sorted(rows) == sorted((n, md5(b)) for n, b in fake.instances(uid))
        orders.append([n for n, _ in rows])
    assert any(o != sorted(o) for o in orders)
    assert "md5hashes.csv" not in zip_of(get(fake, "getImage", {"SeriesInstanceUID": uids[0]})).namelist()
    # refused, as builds before 2025-11 do
    fake.config.include_md5 = "refuse"
    r = get(fake, "getImage", params)
    assert r.status_code == 400 and r.text.startswith("Invalid query parameter: 'IncludeMD5'.")
    assert get(fake, "getImage", {"SeriesInstanceUID": uids[0]}).status_code == 200


def test_image_with_md5_hash(fake_nbia):
    for uid in demo_uids(fake_nbia)[:3]:
        z = zip_of(get(fake_nbia, "getImageWithMD5Hash", {"SeriesInstanceUID": uid}))
        files = fake_nbia.instances(uid)
        names = [f"{i:08d}.dcm" for i in range(1, len(files) + 1)]
        assert z.namelist() == names + ["md5hashes.csv"]                     # no LICENSE
        assert sorted(md5_rows(z)) == sorted((n, md5(b)) for n, (_, b) in zip(names, files))
        assert [z.read(n) for n in names] == [b for _, b in files]


@pytest.mark.parametrize("endpoint", ["getImage", "getImageWithMD5Hash", "getSingleImage"])
def test_unknown_and_missing_series(fake_nbia, endpoint):
    r = get(fake_nbia, endpoint, {"SeriesInstanceUID": "1.2.3.999"})
    assert r.status_code == 400
    assert r.text == ("The user has not been granted the access to image with given SeriesInstanceUID,1.2.3.999."
                      " Please contact System Admin to resolve this issue.")
    r = get(fake_nbia, endpoint)
    assert r.status_code == 400 and r.text == "A parameter, SeriesInstanceUID, is required for this API call."
    assert fake_nbia.counters.requests(endpoint, 400) == 2


# ---------------------------------------------------------------------------------------------
# DICOM content
# ---------------------------------------------------------------------------------------------

def test_dicom_files_are_valid_and_belong_to_their_series(fake_nbia):
    for coll in fake_nbia.collections():
        for rec in fake_nbia.series(coll)[:6]:
            for name, data in fake_nbia.instances(rec["SeriesInstanceUID"]):
                assert data[128:132] == b"DICM"
                ds = pydicom.dcmread(io.BytesIO(data))
                assert ds.SeriesInstanceUID == rec["SeriesInstanceUID"]
                assert ds.StudyInstanceUID == rec["StudyInstanceUID"]
                assert ds.PatientID == rec["PatientID"]
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert ds.pixel_array.shape[0] > 0


def test_ct_content_compresses_like_ct(fake_nbia_factory):
    fake = fake_nbia_factory(image_size=256, real_collections=False, demo_series=1)
    rec = fake.series("DEMO")[0]
    assert rec["Modality"] == "CT"
    for _, data in fake.instances(rec["SeriesInstanceUID"]):
        ds = pydicom.dcmread(io.BytesIO(data))
        px = ds.pixel_array
        assert px.dtype == np.int16 and ds.Rows == ds.Columns == 256
        assert px[0, 0] <= -1000 and np.median(px[0]) <= -1000                  # air around the body
        assert np.mean(px <= -1000) > 0.1                                         # air at -1024
        assert np.mean((px > -100) & (px < 150)) > 0.2                            # soft tissue
        assert np.mean((px > -900) & (px < -700)) > 0.03                          # lungs
        ratio = len(ds.PixelData) / len(zlib.compress(ds.PixelData, 6))
        assert 1.5 < ratio < 8, ratio                                            # not random, not flat


def test_sample_series_carries_pydicoms_files(fake_nbia):
    rec = next(r for r in fake_nbia.series("DEMO") if r["SeriesDescription"] == "pydicom sample files")
    files = fake_nbia.instances(rec["SeriesInstanceUID"])
    assert [n for n, _ in files] == ["1-1.dcm", "1-2.dcm"]
    for (_, data), sample in zip(files, ("CT_small.dcm", "MR_small.dcm")):
        ds = pydicom.dcmread(io.BytesIO(data))
        original = pydicom.dcmread(pydicom.data.get_testdata_file(sample))
        assert ds.PixelData == original.PixelData
        assert (ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.PatientID) == (
            rec["SeriesInstanceUID"], rec["StudyInstanceUID"], rec["PatientID"])


def test_deterministic_from_seed(fake_nbia_factory):
    a = fake_nbia_factory(seed=7, real_collections=False)
    b = fake_nbia_factory(seed=7, real_collections=False)
    c = fake_nbia_factory(seed=8, real_collections=False)
    assert a.series("DEMO") == b.series("DEMO")
    uid = demo_uids(a)[0]
    assert a.instances(uid) == b.instances(uid)
    assert get(a, "getImage", {"SeriesInstanceUID": uid}).content == get(b, "getImage", {"SeriesInstanceUID": uid}).content
    assert demo_uids(c)[0] != uid


def test_scales_to_ten_thousand_series(fake_nbia_factory):
    t0 = time.monotonic()
    fake = fake_nbia_factory(demo_series=10_000, demo_patients=500, real_collections=False)
    assert time.monotonic() - t0 < 10
    served = get(fake, "getSeries", {"Collection": "DEMO"}).json()
    assert len(served) == 10_000 and len({r["SeriesInstanceUID"] for r in served}) == 10_000
    last = served[-1]
    files = fake.instances(last["SeriesInstanceUID"])
    assert sum(len(b) for _, b in files) == last["FileSize"]


def test_image_size_option(fake_nbia_factory):
    fake = fake_nbia_factory(image_size=32, instances=3, real_collections=False, demo_series=2)
    for rec in fake.series("DEMO"):
        files = fake.instances(rec["SeriesInstanceUID"])
        if rec["SeriesDescription"] != "pydicom sample files":
            assert len(files) == 3 and pydicom.dcmread(io.BytesIO(files[0][1])).Rows == 32
        assert rec["FileSize"] == sum(len(b) for _, b in files)


# ---------------------------------------------------------------------------------------------
# Nastiness (DEMO only, off by default)
# ---------------------------------------------------------------------------------------------

def test_no_nastiness_by_default(fake_nbia):
    demo = fake_nbia.series("DEMO")
    assert all(re.fullmatch(r"[A-Za-z0-9 .-]+", r["SeriesDescription"]) for r in demo)
    assert all("SeriesDate" in r and "StudyDate" in r for r in demo)
    keys = [(r["StudyInstanceUID"], r["SeriesNumber"]) for r in demo]
    assert len(keys) == len(set(keys))
    z = zip_of(get(fake_nbia, "getImageWithMD5Hash", {"SeriesInstanceUID": demo[0]["SeriesInstanceUID"]}))
    assert len(z.namelist()) == demo[0]["ImageCount"] + 1


def test_nasty_contaminate(fake_nbia_factory):
    fake = fake_nbia_factory(nasty={"contaminate"}, include_md5="honour", real_collections=False)
    uid = demo_uids(fake)[0]
    z = zip_of(get(fake, "getImage", {"SeriesInstanceUID": uid, "NewFileNames": "Yes", "IncludeMD5": "Yes"}))
    listed = {n for n, _ in md5_rows(z)}
    dcm = [n for n in z.namelist() if n.endswith(".dcm")]
    foreign = [n for n in dcm if pydicom.dcmread(io.BytesIO(z.read(n))).SeriesInstanceUID != uid]
    assert len(foreign) == 1 and foreign[0] not in listed
    assert listed == {n for n, _ in fake.instances(uid)}
    assert len(fake.instances(uid)) == len(dcm) - 1                            # not among instances()
    z2 = zip_of(get(fake, "getImageWithMD5Hash", {"SeriesInstanceUID": uid}))
    assert len([n for n in z2.namelist() if n.endswith(".dcm")]) == len(dcm)


def test_nasty_junk(fake_nbia_factory):
    fake = fake_nbia_factory(nasty={"junk"})
    junk_names = set()
    for uid in demo_uids(fake)[:2]:
        z = zip_of(get(fake, "getImageWithMD5Hash", {"SeriesInstanceUID": uid}))
        junk = [n for n in z.namelist() if n in ("Thumbs.db", "notes.txt")]
        assert len(junk) == 1
        junk_names.add(junk[0])
        data = z.read(junk[0])
        assert data[128:132] != b"DICM"
        assert (junk[0], md5(data)) in md5_rows(z)                            # listed, correct hash
    assert junk_names == {"Thumbs.db", "notes.txt"}
    real = fake.series("Pancreas-CT")[0]["SeriesInstanceUID"]                   # DEMO only
    assert "notes.txt" not in zip_of(get(fake, "getImageWithMD5Hash", {"SeriesInstanceUID": real})).namelist()


def test_nasty_hostile_names(fake_nbia_factory):
    fake = fake_nbia_factory(nasty={"hostile_names"}, real_collections=False)
    served = get(fake, "getSeries", {"Collection": "DEMO"}).json()
    descs = [r["SeriesDescription"] for r in served]
    assert any("/" in d for d in descs) and ".." in descs and any(d.startswith(".") for d in descs)
    assert any(re.search(r"[\x00-\x1f]", d) for d in descs)
    assert any(any(ord(ch) > 127 for ch in d) for d in descs)
    assert max(len(d) for d in descs) == 300
    assert any("/" in r["StudyDesc"] for r in served)
    assert all(re.fullmatch(r"DEMO-\d{4}", r["PatientID"]) for r in served)   # PatientID stays sane
    for r in served:
        if r["SeriesDescription"] in fake_nbia.HOSTILE_SERIES_DESCRIPTIONS:
            _, data = fake.instances(r["SeriesInstanceUID"])[0]
            assert pydicom.dcmread(io.BytesIO(data)).SeriesInstanceUID == r["SeriesInstanceUID"]
    text = requests.post(fake.url + "getSeriesMetadata", data={"list": ",".join(r["SeriesInstanceUID"] for r in served)},
                         timeout=10).content.decode("utf-8")                  # text/csv, no charset
    # csv readers before Python 3.11 refuse NUL: carry it through as a character they accept
    rows = csv.DictReader(io.StringIO(text.replace("\x00", "\ufffe")))
    assert sorted(row["Series Description"].replace("\ufffe", "\x00") for row in rows) == sorted(descs)


def test_nasty_duplicate_series_numbers_and_colliding_suffixes(fake_nbia_factory):
    fake = fake_nbia_factory(nasty={"duplicate_series_numbers"}, real_collections=False)
    demo = fake.series("DEMO")
    by_key = {}
    for r in demo:
        by_key.setdefault((r["StudyInstanceUID"], r["SeriesNumber"], r["SeriesDescription"]), []).append(r)
    dups = [v for v in by_key.values() if len(v) > 1]
    assert dups
    assert any(len({r["SeriesInstanceUID"][-5:] for r in v}) < len(v) for v in dups)
    studies = {}
    for r in demo:
        studies.setdefault(r["PatientID"], {})[r["StudyInstanceUID"]] = (r.get("StudyDate"), r["StudyDesc"])
    twins = [(p, a, b) for p, st in studies.items() for a in st for b in st
             if a < b and a[-5:] == b[-5:] and st[a] == st[b]]
    assert twins
    for r in demo:                                                   # the duplicates download fine
        assert fake.instances(r["SeriesInstanceUID"])


def test_nasty_missing_dates(fake_nbia_factory):
    fake = fake_nbia_factory(nasty={"missing_dates"}, real_collections=False)
    served = get(fake, "getSeries", {"Collection": "DEMO"}).json()
    no_series_date = [r for r in served if "SeriesDate" not in r]
    no_study_date = [r for r in served if "StudyDate" not in r]
    assert no_study_date and len(no_series_date) > len(no_study_date)
    ds = pydicom.dcmread(io.BytesIO(fake.instances(no_study_date[0]["SeriesInstanceUID"])[0][1]))
    assert "StudyDate" not in ds and "SeriesDate" not in ds
    studies = get(fake, "getPatientStudy", {"Collection": "DEMO"}).json()
    assert any("StudyDate" not in s for s in studies)


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def small(fake_nbia_factory):
    """A small DEMO-only server for fault tests."""
    return fake_nbia_factory(real_collections=False, demo_series=4, include_md5="honour")


def test_fault_500(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["500"])
    raw = raw_get(small, "getImage", {"SeriesInstanceUID": uid})
    assert raw.status == 500 and raw.body == BODY_500 and len(BODY_500) == 48
    assert raw_get(small, "getImage", {"SeriesInstanceUID": uid}).status == 200      # then normal
    assert small.counters.requests("getImage", 500) == 1 and small.counters.requests("getImage", 200) == 1
    assert small.counters.complete_downloads(uid) == 1


def test_keep_alive_survives_error_and_fault_answers(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["500", "429", "truncate", "corrupt"])
    with connect(small) as s, s.makefile("rb") as f:
        statuses = []
        for _ in range(5):
            s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
            raw = read_raw(f)
            statuses.append((raw.status, raw.terminated))
    assert statuses == [(500, False), (429, False), (200, True), (200, True), (200, True)]
    assert small.counters.complete_downloads(uid) == 2                        # corrupt + clean


def test_fault_429_with_retry_after(small):
    uid = demo_uids(small)[0]
    small.config.faults = Faults(retry_after=7)
    small.script_faults(uid, ["429"])
    raw = raw_get(small, "getImageWithMD5Hash", {"SeriesInstanceUID": uid})
    assert raw.status == 429 and raw.header("Retry-After") == "7"
    assert small.counters.requests("getImageWithMD5Hash", 429) == 1


def test_fault_reset_mid_body(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["reset"])
    with connect(small) as s:
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
        got, exc = read_until_error(s)
    assert isinstance(exc, ConnectionResetError) or getattr(exc, "errno", None) == errno.ECONNRESET, exc
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"PK\x03\x04" in body           # part of the zip came
    assert not body.endswith(b"0\r\n\r\n")
    assert small.counters.complete_downloads(uid) == 0
    assert get(small, "getImage", {"SeriesInstanceUID": uid}).status_code == 200


def test_fault_stall_then_close(small):
    uid = demo_uids(small)[0]
    small.config.faults.stall_seconds = 1.5
    small.script_faults(uid, ["stall"])
    with connect(small, timeout=0.5) as s:
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
        got, exc = read_until_error(s)
        assert isinstance(exc, socket.timeout)                                  # silence, still open
        assert got.startswith(b"HTTP/1.1 200") and b"PK\x03\x04" in got
        s.settimeout(5)
        t0 = time.monotonic()
        rest, exc = read_until_error(s)
        assert exc is None and rest == b""                                      # then a plain close
        assert time.monotonic() - t0 < 2.5
    assert small.counters.complete_downloads(uid) == 0


def test_stop_interrupts_a_stall(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, faults=Faults(stall=1.0, stall_seconds=60))
    with connect(fake, timeout=0.5) as s:
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": demo_uids(fake)[0]})))
        got, exc = read_until_error(s)
        assert isinstance(exc, socket.timeout) and got.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        fake.stop()
        s.settimeout(5)
        read_until_error(s)
        assert time.monotonic() - t0 < 3


def test_fault_corrupt_entry(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["corrupt"])
    z = zip_of(get(small, "getImage", {"SeriesInstanceUID": uid, "NewFileNames": "Yes", "IncludeMD5": "Yes"}))
    assert z.testzip() is None                                                  # CRCs are consistent
    rows = dict(md5_rows(z))
    bad = [n for n, h in rows.items() if md5(z.read(n)) != h]
    assert len(bad) == 1
    assert rows == {n: md5(b) for n, b in small.instances(uid)}                  # the csv is right
    assert small.counters.complete_downloads(uid) == 1


def test_fault_truncate_before_central_directory(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["truncate"])
    raw = raw_get(small, "getImage", {"SeriesInstanceUID": uid, "IncludeMD5": "Yes"})
    assert raw.status == 200 and raw.terminated                               # a clean HTTP end
    assert raw.body.startswith(b"PK\x03\x04") and b"PK\x01\x02" not in raw.body and b"PK\x05\x06" not in raw.body
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(io.BytesIO(raw.body))
    assert small.counters.complete_downloads(uid) == 0


def test_fault_bad_md5_row(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["bad_md5_row"])
    z = zip_of(get(small, "getImageWithMD5Hash", {"SeriesInstanceUID": uid}))
    rows = md5_rows(z)
    assert sum(md5(z.read(n)) != h for n, h in rows) == 1
    assert small.counters.complete_downloads(uid) == 1


def test_scripted_not_granted_refuses_a_listed_series_like_nbia(small):
    uid = demo_uids(small)[0]
    small.script_faults(uid, ["not_granted"])
    refused = get(small, "getImageWithMD5Hash", {"SeriesInstanceUID": uid})
    assert refused.status_code == 400
    assert refused.text == ("The user has not been granted the access to image with given "
                            f"SeriesInstanceUID,{uid}. Please contact System Admin to resolve "
                            "this issue.")
    assert get(small, "getImageWithMD5Hash", {"SeriesInstanceUID": uid}).status_code == 200


def test_scripted_faults_take_precedence(small):
    uid = demo_uids(small)[0]
    small.config.faults = Faults(p500=1.0)
    small.script_faults(uid, ["429", "truncate"])
    statuses = [get(small, "getImage", {"SeriesInstanceUID": uid}) for _ in range(3)]
    assert [r.status_code for r in statuses] == [429, 200, 500]
    with pytest.raises(ValueError):
        small.script_faults(uid, ["explode"])


def test_fault_probabilities_are_reproducible_and_thread_independent(fake_nbia_factory):
    faults = Faults(p500=0.3, p429=0.2, retry_after=0)

    def sequences(fake, parallel):
        uids = demo_uids(fake)

        def run(uid):
            return [get(fake, "getImage", {"SeriesInstanceUID": uid}).status_code for _ in range(12)]
        if parallel:
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                return dict(zip(uids, pool.map(run, uids)))
        return {uid: run(uid) for uid in uids}

    a = sequences(fake_nbia_factory(seed=3, real_collections=False, demo_series=4, faults=faults), False)
    b = sequences(fake_nbia_factory(seed=3, real_collections=False, demo_series=4, faults=faults), True)
    c = sequences(fake_nbia_factory(seed=4, real_collections=False, demo_series=4, faults=faults), False)
    assert a == b and a != c
    flat = [s for seq in a.values() for s in seq]
    assert 5 <= flat.count(500) <= 25 and 2 <= flat.count(429) <= 20 and flat.count(200) >= 10


# ---------------------------------------------------------------------------------------------
# WAN shaping
# ---------------------------------------------------------------------------------------------

def test_first_byte_delay(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, first_byte_delay=0.6)
    uid = demo_uids(fake)[0]
    t0 = time.monotonic()
    assert get(fake, "getCollectionValues").status_code == 200
    assert time.monotonic() - t0 < 0.5                                         # metadata: no delay
    with connect(fake) as s:
        t0 = time.monotonic()
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
        assert s.recv(1)
        assert time.monotonic() - t0 >= 0.58


def test_stop_interrupts_a_first_byte_delay(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, first_byte_delay=60)
    with connect(fake) as s:
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": demo_uids(fake)[0]})))
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1)
        t0 = time.monotonic()
        fake.stop()
        s.settimeout(5)
        got, _ = read_until_error(s)
        assert time.monotonic() - t0 < 3 and not got.startswith(b"HTTP/1.1 200")


def test_connection_and_total_bandwidth(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=2, image_size=128, zip_deflate=False,
                             conn_bandwidth=400_000)
    uids = demo_uids(fake)[:1]                                                  # [1] is the sample series
    size = fake.series("DEMO")[0]["FileSize"]                                  # ~131 kB stored
    t0 = time.monotonic()
    assert len(get(fake, "getImage", {"SeriesInstanceUID": uids[0]}).content) >= size
    elapsed = time.monotonic() - t0
    assert size / 400_000 * 0.8 < elapsed < size / 400_000 * 3 + 0.5
    # total cap shared by two parallel downloads
    fake.config.conn_bandwidth = None
    fake.config.total_bandwidth = 400_000
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        sizes = list(pool.map(lambda _: len(get(fake, "getImage", {"SeriesInstanceUID": uids[0]}).content), range(2)))
    elapsed = time.monotonic() - t0
    assert sum(sizes) / 400_000 * 0.8 < elapsed


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------

def token(fake: FakeNbia, **form) -> requests.Response:
    return requests.post(fake.token_url, data={"client_id": "NBIA", **form}, timeout=10)


def test_token_grants(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, users={"alice": "pw"}, token_lifetime=60)
    r = token(fake, username="alice", password="pw", grant_type="password")
    assert r.status_code == 200
    t = r.json()
    assert {"access_token", "expires_in", "refresh_token", "refresh_expires_in", "token_type"} <= set(t)
    assert t["expires_in"] == 60 and t["token_type"] == "Bearer"
    bad = token(fake, username="alice", password="nope", grant_type="password")
    assert bad.status_code == 401 and bad.json()["error"] == "invalid_grant"
    assert token(fake, username="bob", password="", grant_type="password").status_code == 401
    nbia_client = requests.post(fake.token_url, data={"username": "alice", "password": "pw",
                                                      "grant_type": "password", "client_id": "x"}, timeout=10)
    assert nbia_client.status_code == 401 and nbia_client.json()["error"] == "invalid_client"
    refreshed = token(fake, grant_type="refresh_token", refresh_token=t["refresh_token"])
    assert refreshed.status_code == 200 and refreshed.json()["access_token"] != t["access_token"]
    wrong = token(fake, grant_type="refresh_token", refresh_token="garbage")
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"


def test_private_server_requires_a_valid_token(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, require_token=True)
    uid = demo_uids(fake)[0]
    for endpoint, params in (("getSeries", {}), ("getImage", {"SeriesInstanceUID": uid})):
        raw = raw_get(fake, endpoint, params)
        assert raw.status == 401 and raw.body == b""
        raw = raw_get(fake, endpoint, params, headers={"Authorization": "Bearer wrong"})
        assert raw.status == 401 and raw.body == b""
    t = token(fake, username="nbia_guest", password="", grant_type="password").json()
    auth = {"Authorization": "Bearer " + t["access_token"]}
    assert get(fake, "getImage", {"SeriesInstanceUID": uid}, headers=auth).status_code == 200
    fake.expire_tokens()
    assert get(fake, "getImage", {"SeriesInstanceUID": uid}, headers=auth).status_code == 401
    new = token(fake, grant_type="refresh_token", refresh_token=t["refresh_token"]).json()
    assert get(fake, "getSeries", headers={"Authorization": "Bearer " + new["access_token"]}).status_code == 200
    # the same over the test-only HTTP endpoint
    assert requests.post(fake.url.split("/nbia-api")[0] + "/_fake/expire_tokens", timeout=10).status_code == 204
    assert get(fake, "getSeries", headers={"Authorization": "Bearer " + new["access_token"]}).status_code == 401


def test_token_expires_by_lifetime(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, token_lifetime=0.3)
    t = token(fake, username="nbia_guest", password="", grant_type="password").json()
    assert t["expires_in"] == 0.3 and t["refresh_expires_in"] == 36000
    auth = {"Authorization": "Bearer " + t["access_token"]}
    assert get(fake, "getSeries", headers=auth).status_code == 200
    deadline = time.monotonic() + 5
    while get(fake, "getSeries", headers=auth).status_code == 200:
        assert time.monotonic() < deadline
        threading.Event().wait(0.05)
    assert get(fake, "getSeries").status_code == 200                          # public: no header is fine


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------

def test_counters_and_http_snapshot(small):
    uid = demo_uids(small)[0]
    get(small, "getImage", {"SeriesInstanceUID": uid})
    get(small, "getImage", {"SeriesInstanceUID": "9.9"})
    get(small, "getSeries")
    snap = requests.get(small.url.split("/nbia-api")[0] + "/_fake/counters", timeout=10).json()
    assert snap == small.counters.snapshot()
    assert snap["complete_downloads"] == {uid: 1}
    assert snap["requests"] == {"getImage 200": 1, "getImage 400": 1, "getSeries 200": 1}
    assert small.counters.requests("getImage") == 2
    small.counters.reset()
    assert small.counters.snapshot() == {"complete_downloads": {}, "requests": {}}


def test_complete_download_needs_the_whole_zip(small):
    """A client that hangs up early does not count as a complete download."""
    small.config.conn_bandwidth = 50_000
    uid = demo_uids(small)[0]
    with connect(small) as s:
        s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
        assert s.recv(100)
    deadline = time.monotonic() + 5
    while small.counters.requests("getImage", 200) < 1:
        assert time.monotonic() < deadline
    assert small.counters.complete_downloads(uid) == 0


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def test_cli_ready_line_and_serving():
    proc = subprocess.Popen([sys.executable, str(HERE / "fake_nbia.py"), "--port", "0", "--demo-series", "3",
                             "--no-real-collections", "--nasty", "junk", "--include-md5", "honour"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"READY (http://127\.0\.0\.1:(\d+)/nbia-api/services/v4/)\n", line)
        assert m, line
        url = m.group(1)
        assert requests.get(url + "getCollectionValues", timeout=10).json() == [{"Collection": "DEMO"}]
        uid = requests.get(url + "getSeries", timeout=10).json()[0]["SeriesInstanceUID"]
        z = zipfile.ZipFile(io.BytesIO(requests.get(url + "getImage", params={
            "SeriesInstanceUID": uid, "IncludeMD5": "Yes"}, timeout=10).content))
        assert "md5hashes.csv" in z.namelist() and ("notes.txt" in z.namelist() or "Thumbs.db" in z.namelist())
        counters = requests.get(url.split("/nbia-api")[0] + "/_fake/counters", timeout=10).json()
        assert counters["complete_downloads"] == {uid: 1}
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0                                                # SIGTERM: clean stop


def test_cli_rejects_bad_settings():
    r = subprocess.run([sys.executable, str(HERE / "fake_nbia.py"), "--port", "0", "--data-dir", "/nonexistent"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "not a directory" in r.stderr and r.stdout == ""


def test_cli_help_documents_every_switch():
    out = subprocess.run([sys.executable, str(HERE / "fake_nbia.py"), "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    for flag in ("--seed", "--data-dir", "--no-real-collections", "--demo-series", "--demo-patients",
                 "--instances", "--image-size", "--include-md5", "--require-token", "--user",
                 "--token-lifetime", "--refresh-lifetime", "--nasty", "--fault-500", "--fault-429",
                 "--retry-after", "--fault-reset", "--fault-stall", "--stall-seconds", "--fault-corrupt",
                 "--fault-truncate", "--fault-bad-md5-row", "--first-byte-delay", "--conn-bandwidth",
                 "--total-bandwidth", "--port", "--host", "--zip-deflate", "--metadata-headers"):
        assert flag in out, flag
    for kind in fake_nbia.NASTY_KINDS:
        assert kind in out


def test_cli_config_mapping():
    args = fake_nbia._parser().parse_args(["--nasty", "all", "--user", "a:b", "--fault-500", "0.5",
                                           "--stall-seconds", "2", "--no-zip-deflate", "--include-md5", "refuse",
                                           "--conn-bandwidth", "1000", "--first-byte-delay", "0.5"])
    cfg = fake_nbia.config_from_args(args)
    assert cfg.conn_bandwidth == 1000 and cfg.total_bandwidth is None and cfg.first_byte_delay == 0.5
    assert cfg.data_dir is None and cfg.real_collections
    assert cfg.nasty == fake_nbia.NASTY_KINDS and cfg.users == {"nbia_guest": "", "a": "b"}
    assert cfg.faults.p500 == 0.5 and cfg.faults.stall_seconds == 2 and not cfg.zip_deflate
    assert cfg.include_md5 == "refuse"


def test_config_overrides_and_validation():
    fake = FakeNbia(FakeConfig(seed=5, demo_series=1), real_collections=False, nasty=["junk"])
    assert fake.config.seed == 5 and fake.config.nasty == frozenset({"junk"}) and fake.collections() == ["DEMO"]
    with pytest.raises(ValueError):
        FakeNbia(nasty={"bogus"})
    with pytest.raises(ValueError):
        FakeNbia(include_md5="maybe")
    with pytest.raises(ValueError):
        FakeNbia(data_dir="/nonexistent")


def test_custom_data_dir(tmp_path):
    rec = json.loads((HERE.parent / "data" / "CPTAC-GBM.series.json").read_text())[0]
    (tmp_path / "X.series.json").write_text(json.dumps([{**rec, "Collection": "X-Coll"}]))
    fake = FakeNbia(data_dir=tmp_path, demo_series=0)
    assert fake.collections() == ["X-Coll"] and fake.series("X-Coll")[0]["SeriesInstanceUID"] == rec["SeriesInstanceUID"]


# ---------------------------------------------------------------------------------------------
# Hostile server: metadata hooks, overrides, hangs and the HOSTILE_KINDS image faults
# ---------------------------------------------------------------------------------------------

HUGE = 2 * 1024 * 1024
# Both image endpoints, each asked for md5hashes.csv.
MD5_ENDPOINTS = [("getImage", {"IncludeMD5": "Yes"}), ("getImageWithMD5Hash", {})]


@pytest.fixture
def hostile(fake_nbia_factory):
    return fake_nbia_factory(real_collections=False, demo_series=2, include_md5="honour",
                             faults=Faults(huge_entry_bytes=HUGE))


def hostile_zip(fake: FakeNbia, kind: str, endpoint: str, params: dict) -> tuple[zipfile.ZipFile, bytes, str]:
    uid = demo_uids(fake)[0]
    fake.script_faults(uid, [kind])
    resp = get(fake, endpoint, {"SeriesInstanceUID": uid, **params})
    return zip_of(resp), resp.content, uid


def test_series_rows_hook_serves_whatever_it_returns(fake_nbia_factory):
    def hook(rows):
        rows[0]["SeriesInstanceUID"] = "../../x"
        return rows + [rows[0], "not a dict", {}, 7]
    fake = fake_nbia_factory(real_collections=False, demo_series=4, series_rows_hook=hook)
    served = get(fake, "getSeries", {"Collection": "DEMO"}).json()
    clean = fake.series("DEMO")                                                 # the hook got copies
    assert served == [{**clean[0], "SeriesInstanceUID": "../../x"}, *clean[1:],
                      {**clean[0], "SeriesInstanceUID": "../../x"}, "not a dict", {}, 7]
    assert get(fake, "getImage", {"SeriesInstanceUID": "../../x"}).status_code == 400
    assert get(fake, "getSeries", {"Collection": "DEMO", "format": "csv"}).text.count("\n") == 5   # json only
    fake.config.series_rows_hook = lambda rows: {"rows": len(rows)}
    assert get(fake, "getSeries", {"Collection": "DEMO", "Modality": "PT"}).json() == {"rows": 1}
    fake.config.series_rows_hook = lambda rows: []
    r = get(fake, "getSeries")
    assert r.status_code == 200 and r.content == b""


def test_override_metadata_answers_exactly_that(hostile):
    hostile.override_metadata("getCollectionValues", 503, b"<html>busy</html>",
                              [("Content-Type", "text/html"), ("X-Odd", "1")])
    raw = raw_get(hostile, "getCollectionValues", {"bogus": "param"})
    assert (raw.status, raw.body, raw.header("X-Odd"), raw.header("Content-Type")) == (
        503, b"<html>busy</html>", "1", "text/html")
    hostile.override_metadata("getSeries", 200, b"", [("Content-Length", "0")])
    raw = raw_get(hostile, "getSeries")
    assert raw.status == 200 and [k for k, _ in raw.headers].count("Content-Length") == 1
    assert hostile.counters.requests("getCollectionValues", 503) == 1
    hostile.clear_overrides()
    assert get(hostile, "getCollectionValues").json() == [{"Collection": "DEMO"}]
    with pytest.raises(ValueError):
        hostile.override_metadata("getNothing", 200, b"")


def test_metadata_hang_silent_until_stop(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, metadata_hang="silent")
    uid = fake._catalogue.all_series()[0].uid
    assert get(fake, "getImage", {"SeriesInstanceUID": uid}).status_code == 200   # images unaffected
    with connect(fake, timeout=0.5) as s:
        s.sendall(request_bytes(v4_path("getSeries")))
        got, exc = read_until_error(s)
        assert isinstance(exc, socket.timeout) and got == b""
        t0 = time.monotonic()
        fake.stop()
        s.settimeout(5)
        got, _ = read_until_error(s)
        assert got == b"" and time.monotonic() - t0 < 3


def test_metadata_hang_trickle_one_byte_per_second(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, metadata_hang="trickle")
    body = json.dumps([{"Collection": "DEMO"}]).encode()
    with connect(fake) as s, s.makefile("rb") as f:
        s.sendall(request_bytes(v4_path("getCollectionValues")))
        assert f.readline().startswith(b"HTTP/1.1 200")
        headers = []
        while (line := f.readline()) != b"\r\n":
            headers.append(line.decode().strip())
        assert f"Content-Length: {len(body)}" in headers
        t0 = time.monotonic()
        assert f.read(2) == body[:2]
        assert 1.5 < time.monotonic() - t0 < 3.5
        t0 = time.monotonic()
        fake.stop()
        s.settimeout(5)
        assert len(f.read()) < len(body) - 2 and time.monotonic() - t0 < 3


def test_fault_trickle_respects_the_rate(fake_nbia_factory):
    fake = fake_nbia_factory(real_collections=False, demo_series=1, instances=1, image_size=32,
                             zip_deflate=False, faults=Faults(trickle_rate=4000))
    uid = demo_uids(fake)[0]
    fake.script_faults(uid, ["trickle"])
    t0 = time.monotonic()
    raw = raw_get(fake, "getImageWithMD5Hash", {"SeriesInstanceUID": uid})
    elapsed = time.monotonic() - t0
    wire = sum(len(b"%x\r\n\r\n" % len(c)) + len(c) for c in raw.chunks) + len(b"0\r\n\r\n")
    expected = (wire - fake_nbia.TRICKLE_FREE) / 4000
    assert expected > 0.3 and 0.8 * expected < elapsed < 1.5 * expected + 0.3, (wire, elapsed)
    assert raw.terminated and zipfile.ZipFile(io.BytesIO(raw.body)).testzip() is None
    assert fake.counters.complete_downloads(uid) == 1


def test_fault_endless_until_hang_up_or_stop(hostile):
    uid = demo_uids(hostile)[0]
    for stop in (False, True):
        hostile.script_faults(uid, ["endless"])
        with connect(hostile) as s, s.makefile("rb") as f:
            s.sendall(request_bytes(v4_path("getImage", {"SeriesInstanceUID": uid})))
            assert f.readline().startswith(b"HTTP/1.1 200")
            while f.readline() != b"\r\n":
                pass
            blocks = []
            for _ in range(20):                                                # 1.25 MiB
                size = int(f.readline(), 16)
                blocks.append(f.read(size))
                assert f.read(2) == b"\r\n"
            assert size == 64 * 1024 and len(set(blocks)) == 1 and len(set(blocks[0])) > 200
            if stop:
                t0 = time.monotonic()
                hostile.stop()
                s.settimeout(5)
                read_until_error(s)
                assert time.monotonic() - t0 < 3
        assert hostile.counters.complete_downloads(uid) == 0
        if not stop:
            deadline = time.monotonic() + 5
            while hostile.counters.requests("getImage", 200) < 1:               # then normal service
                assert time.monotonic() < deadline
            assert zip_of(get(hostile, "getImage", {"SeriesInstanceUID": uid})).testzip() is None
            assert hostile.counters.complete_downloads(uid) == 1
            hostile.counters.reset()


@pytest.mark.parametrize("endpoint,params", MD5_ENDPOINTS)
def test_fault_huge_license(hostile, endpoint, params):
    z, body, _ = hostile_zip(hostile, "huge_license", endpoint, params)
    info = z.getinfo("LICENSE")
    assert info.file_size == HUGE and info.compress_size < HUGE // 20               # a deflate bomb
    assert z.read("LICENSE").startswith(b"License Information. The DEMO collection")
    assert all(md5(z.read(n)) == h for n, h in md5_rows(z))                      # the rest is normal


@pytest.mark.parametrize("endpoint,params", MD5_ENDPOINTS)
def test_fault_huge_md5_table(hostile, endpoint, params):
    z, _, uid = hostile_zip(hostile, "huge_md5_table", endpoint, params)
    info = z.getinfo("md5hashes.csv")
    assert HUGE <= info.file_size < HUGE + 1000 and info.compress_size < HUGE // 20
    rows = md5_rows(z)
    real = {n: h for n, h in rows if n != "x.dcm"}
    assert real == {n: h for n, h in ((name, md5(z.read(name))) for name in z.namelist()) if n in real}
    assert len(real) == len(hostile.instances(uid)) and len(rows) > HUGE // 40
    assert rows[:len(real)] == [r for r in rows if r[0] != "x.dcm"]             # the table, then filler
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for _, h in rows[-3:])


@pytest.mark.parametrize("endpoint,params", MD5_ENDPOINTS)
def test_fault_huge_dicom_listed_with_its_true_md5(hostile, endpoint, params):
    z, _, uid = hostile_zip(hostile, "huge_dicom", endpoint, params)
    rows = dict(md5_rows(z))
    (big,) = [i for i in z.infolist() if i.file_size == HUGE]
    assert big.filename.endswith(".dcm") and rows[big.filename] == md5(z.read(big.filename))
    assert all(md5(z.read(n)) == h for n, h in rows.items())
    ds = pydicom.dcmread(z.open(big.filename), stop_before_pixels=True)
    assert ds.SeriesInstanceUID == uid


@pytest.mark.parametrize("endpoint,params", MD5_ENDPOINTS)
@pytest.mark.parametrize("kind,error", [("encrypted_entry", RuntimeError), ("unsupported_method", NotImplementedError)])
def test_fault_unreadable_entry(hostile, endpoint, params, kind, error):
    z, body, _ = hostile_zip(hostile, kind, endpoint, params)
    bad = []
    for info in z.infolist():
        local_flags, local_method = struct.unpack_from("<HH", body, info.header_offset + 6)
        assert (local_flags, local_method) == (info.flag_bits, info.compress_type)   # both headers agree
        try:
            z.read(info.filename)
        except error:
            bad.append(info)
    assert len(bad) == 1 and bad[0].filename.endswith(".dcm")
    if kind == "encrypted_entry":
        assert bad[0].flag_bits & 1 and bad[0].compress_type == zipfile.ZIP_DEFLATED
    else:
        assert bad[0].compress_type == 99 and not bad[0].flag_bits & 1
    assert {n for n, _ in md5_rows(z)} == {i.filename for i in z.infolist()} - {"LICENSE", "md5hashes.csv"}


@pytest.mark.parametrize("endpoint", ["getImage", "getImageWithMD5Hash"])
def test_fault_retry_after_as_http_date(hostile, endpoint):
    hostile.config.faults.retry_after = 30
    uid = demo_uids(hostile)[0]
    hostile.script_faults(uid, ["retry_after_date"])
    raw = raw_get(hostile, endpoint, {"SeriesInstanceUID": uid})
    when = email.utils.parsedate_to_datetime(raw.header("Retry-After"))
    assert raw.status == 429 and raw.header("Retry-After").endswith(" GMT")
    assert 25 < when.timestamp() - time.time() < 35
    assert get(hostile, endpoint, {"SeriesInstanceUID": uid}).status_code == 200


@pytest.mark.parametrize("endpoint,params", MD5_ENDPOINTS)
def test_fault_control_names(hostile, endpoint, params):
    z, _, uid = hostile_zip(hostile, "control_names", endpoint, params)
    assert fake_nbia.CONTROL_NAME in z.namelist() and "\x1b" in fake_nbia.CONTROL_NAME
    rows = dict(md5_rows(z))
    assert fake_nbia.CONTROL_NAME not in rows
    assert sorted(rows.values()) == sorted(md5(b) for _, b in hostile.instances(uid))


def test_hostile_settings_validation_and_cli():
    assert set(fake_nbia.HOSTILE_KINDS) <= set(fake_nbia.SCRIPTED_ONLY_KINDS)
    with pytest.raises(ValueError):
        FakeNbia(demo_series=1, real_collections=False, metadata_hang="sometimes")
    with pytest.raises(ValueError):
        FakeNbia(demo_series=1, real_collections=False, faults=Faults(trickle_rate=0))
    args = fake_nbia._parser().parse_args(["--metadata-hang", "silent"])
    assert fake_nbia.config_from_args(args).metadata_hang == "silent"
    assert fake_nbia.config_from_args(fake_nbia._parser().parse_args([])).metadata_hang is None
    assert "huge_dicom" in fake_nbia._parser().format_help()
