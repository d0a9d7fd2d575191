#!/usr/bin/env python3
"""tests/fakes/fake_s3.py for benchmarks: a cloud-bucket-shaped fake of IDC's S3 holding a synthetic
CT-like collection, an IDC index of it, and a cache of the GET answers.

    python bench/fake_s3_server.py --index-dir DIR [--series N --instances N --image-size N]
        [--first-byte-delay S --conn-bandwidth B/s --total-bandwidth B/s] [--no-cache] [--stats FILE]

prints 'READY <endpoint>' on its first stdout line once everything is uploaded, then serves
until SIGTERM or SIGINT (then writes --stats again, with the request counters).

The collection: the DICOM files of tests/fakes/fake_nbia.py's DEMO collection (the NBIA bench's:
CT-like slices with a phantom and noise, MR and PT among them, and pydicom's sample files as
its second series; same --seed, same bytes), uploaded to moto (``FakeS3.put_object``) one
object per instance at ``<crdc_series_uuid>/<crdc_instance_uuid>.dcm`` in ``idc-open-data``,
as IDC files them. ``DIR/idc_index.parquet`` has idc-index-data's schema (one row per series,
collection_id ``demo``) and ``DIR/collections_index.parquet`` names it ``DEMO`` with its DOI
and license, which is what ``--mode idc --idc-index DIR/idc_index.parquet`` reads.

Shaping: FakeS3's own (first byte, per-connection and total bandwidth; see tests/fakes/fake_s3.py).

Why a cache: through moto, one object GET costs this machine about 5 ms of CPU (moto finds its
backend for every request: werkzeug, Flask, its dispatcher), i.e. about a core for 100 MB/s
of 0.5 MB objects, taken from the two cores the contenders compress on; a real bucket costs
the client's machine nothing. So before READY, every object is fetched once from moto through
the fault layer's own forwarding code, once as a plain GET (what tcia_downloader sends) and
once with ``Range: bytes=0-52428799`` (what s5cmd's downloader sends: its 50 MiB part), and
fault-free GETs with those headers are answered with the same status, headers (a fresh Date)
and body from memory: about 1 ms of CPU each. Everything else (listings, HEAD, other ranges,
conditional GETs, scripted faults) goes to moto as in the tests. The cached body is the
object FakeS3 uploaded, checked equal to what moto sent. ``--no-cache`` turns it off.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fakes import fake_nbia, fake_s3  # noqa: E402

BUCKET = "idc-open-data"
COLLECTION_ID = "demo"
COLLECTION_NAME = "DEMO"
DOI = "10.0000/fake-nbia-demo"
LICENSE = ("CC BY 4.0", "https://creativecommons.org/licenses/by/4.0/",
           "Creative Commons Attribution 4.0 International License")
S5CMD_RANGE = "bytes=0-52428799"          # s5cmd (aws-sdk-go's S3 downloader): 50 MiB parts
CONDITIONAL = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
# idc-index-data 25.0.5's idc_index.parquet, column by column
INDEX_SCHEMA = (
    ("collection_id", "VARCHAR"), ("analysis_result_id", "VARCHAR"), ("PatientID", "VARCHAR"),
    ("SeriesInstanceUID", "VARCHAR"), ("StudyInstanceUID", "VARCHAR"), ("source_DOI", "VARCHAR"),
    ("PatientAge", "VARCHAR"), ("PatientSex", "VARCHAR"), ("StudyDate", "VARCHAR"),
    ("StudyDescription", "VARCHAR"), ("BodyPartExamined", "VARCHAR"), ("Modality", "VARCHAR"),
    ("SOPClassUID", "VARCHAR"), ("sop_class_name", "VARCHAR"), ("TransferSyntaxUID", "VARCHAR"),
    ("transfer_syntax_name", "VARCHAR"), ("PhotometricInterpretation", "VARCHAR"),
    ("PixelRepresentation", "VARCHAR"), ("Manufacturer", "VARCHAR"),
    ("ManufacturerModelName", "VARCHAR"), ("SeriesDate", "VARCHAR"), ("SeriesDescription", "VARCHAR"),
    ("SeriesNumber", "VARCHAR"), ("instanceCount", "BIGINT"), ("license_short_name", "VARCHAR"),
    ("series_init_idc_version", "BIGINT"), ("series_revised_idc_version", "BIGINT"),
    ("aws_bucket", "VARCHAR"), ("crdc_series_uuid", "VARCHAR"), ("series_aws_url", "VARCHAR"),
    ("series_size_MB", "DOUBLE"))

_CATALOGUE: Optional[Any] = None
# (bucket, key, Range header or None) -> (status, reason, headers, body)
_CACHE: dict[tuple[str, str, Optional[str]], tuple[int, str, list[tuple[str, str]], bytes]] = {}
_HITS = {"hits": 0, "misses": 0}
_original_forward = fake_s3._Handler._forward


def _cached_forward(self: Any, record: Any, body: bytes, fault: Optional[str]) -> None:
    hit = None
    if record.op == "get" and fault is None and self.command == "GET" and \
            not any(h in self.headers for h in CONDITIONAL):
        hit = _CACHE.get((record.bucket, record.key, self.headers.get("Range")))
    if hit is None:
        _HITS["misses"] += record.op == "get"
        _original_forward(self, record, body, fault)
        return
    _HITS["hits"] += 1
    status, reason, headers, data = hit
    self.send_response_only(status, reason)
    for name, value in headers:
        self.send_header(name, self.date_time_string() if name.lower() == "date" else value)
    if self.close_connection:
        self.send_header("Connection", "close")
    self.end_headers()
    record.status = status
    self._write_last(record, data)


def instance_uuid(sop_uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "instance " + sop_uid))


def series_uuid(series_uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "series " + series_uid))


def idc_date(v4: Optional[str]) -> Optional[str]:
    """NBIA's MM-DD-YYYY as IDC's YYYY-MM-DD."""
    if not v4:
        return None
    month, day, year = v4.split("-")
    return f"{year}-{month}-{day}"


BUILD_PIECE = 32                   # instances per task: a big series is built on every core too


def _build_task(task: tuple[str, int, int]) -> list[bytes]:
    uid, start, stop = task
    assert _CATALOGUE is not None
    s = _CATALOGUE.series[uid]
    return [_CATALOGUE.gen.build(s, k) for k in range(start, stop)]


def build_and_upload(fake: fake_s3.FakeS3, catalogue: Any, procs: int) -> dict[str, Any]:
    """Generate every DICOM file (forked processes), upload it (8 threads), record the rows."""
    global _CATALOGUE
    _CATALOGUE = catalogue
    series = list(catalogue.series.values())
    rows, paths, md5s = [], [], []
    largest = total = 0
    uploads: list[concurrent.futures.Future] = []
    started = time.monotonic()
    fake.create_bucket(BUCKET)
    assert fake.client is not None               # built before the threads share it
    tasks = [(s.uid, start, min(start + BUILD_PIECE, s.n)) for s in series
             for start in range(0, s.n, BUILD_PIECE)]
    pool = multiprocessing.get_context("fork").Pool(procs) if procs > 1 and len(tasks) > 1 else None
    try:
        pieces = iter(pool.imap(_build_task, tasks, chunksize=1) if pool else map(_build_task, tasks))
        with concurrent.futures.ThreadPoolExecutor(8) as uploader:
            for s in series:
                files = [f for _ in range(0, s.n, BUILD_PIECE) for f in next(pieces)]
                r = s.record
                crdc = series_uuid(s.uid)
                size = sum(len(f) for f in files)
                largest, total = max(largest, size), total + size
                for k, data in enumerate(files):
                    md5s.append(hashlib.md5(data).hexdigest())
                    key = f"{crdc}/{instance_uuid(s.sop_uids[k])}.dcm"
                    uploads.append(uploader.submit(fake.put_object, BUCKET, key, data))
                rows.append({
                    "collection_id": COLLECTION_ID, "analysis_result_id": None,
                    "PatientID": r["PatientID"], "SeriesInstanceUID": s.uid,
                    "StudyInstanceUID": r["StudyInstanceUID"], "source_DOI": DOI,
                    "PatientAge": s.extra.get("PatientAge"), "PatientSex": s.extra.get("PatientSex"),
                    "StudyDate": idc_date(r.get("StudyDate")), "StudyDescription": r.get("StudyDesc"),
                    "BodyPartExamined": r.get("BodyPartExamined"), "Modality": r.get("Modality"),
                    "SOPClassUID": catalogue.gen.sop_class(s), "sop_class_name": None,
                    "TransferSyntaxUID": fake_nbia.EXPLICIT_VR_LE,
                    "transfer_syntax_name": "Explicit VR Little Endian",
                    "PhotometricInterpretation": "MONOCHROME2", "PixelRepresentation": "1",
                    "Manufacturer": r.get("Manufacturer"),
                    "ManufacturerModelName": r.get("ManufacturerModelName"),
                    "SeriesDate": idc_date(r.get("SeriesDate")),
                    "SeriesDescription": r.get("SeriesDescription"),
                    "SeriesNumber": None if r.get("SeriesNumber") is None else str(r["SeriesNumber"]),
                    "instanceCount": s.n, "license_short_name": LICENSE[0],
                    "series_init_idc_version": 1, "series_revised_idc_version": 1,
                    "aws_bucket": BUCKET, "crdc_series_uuid": crdc,
                    "series_aws_url": f"s3://{BUCKET}/{crdc}/*", "series_size_MB": size / 1e6})
                # idc-index's default dirTemplate: %collection_id/%PatientID/%StudyInstanceUID/
                # %Modality_%SeriesInstanceUID
                paths.append([BUCKET, crdc, f"{COLLECTION_ID}/{r['PatientID']}/{r['StudyInstanceUID']}/"
                                            f"{r.get('Modality')}_{s.uid}"])
            for future in uploads:
                future.result()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    md5s.sort()
    return {"rows": rows, "series_paths": paths, "series": len(series),
            "instances": sum(s.n for s in series), "dicom_bytes": total,
            "largest_series_bytes": largest, "bucket": BUCKET,
            "collection": {"id": COLLECTION_ID, "name": COLLECTION_NAME},
            "build_upload_seconds": round(time.monotonic() - started, 1),
            # what a correct archive must hold: the MD5 of the sorted MD5s of all DICOM files
            "served_md5_digest": hashlib.md5("\n".join(md5s).encode()).hexdigest()}


def write_index(folder: Path, rows: list[dict]) -> Path:
    """idc_index.parquet (idc-index-data's columns and types) and collections_index.parquet."""
    import duckdb
    folder.mkdir(parents=True, exist_ok=True)
    index, beside = folder / "idc_index.parquet", folder / "collections_index.parquet"
    con = duckdb.connect()
    try:
        con.execute("CREATE TABLE series (" + ", ".join(f'"{c}" {t}' for c, t in INDEX_SCHEMA) + ")")
        con.executemany(f"INSERT INTO series VALUES ({', '.join('?' for _ in INDEX_SCHEMA)})",
                        [[row[c] for c, _ in INDEX_SCHEMA] for row in rows])
        con.execute(f"COPY series TO '{index}' (FORMAT PARQUET)")
        con.execute(
            "COPY (SELECT ? AS collection_name, ? AS collection_id, "
            "[{'source_id': ?, 'source_doi': ?, 'source_type': 'original_data', "
            "'license': {'license_url': ?, 'license_long_name': ?, 'license_short_name': ?}}] "
            f"AS sources) TO '{beside}' (FORMAT PARQUET)",
            [COLLECTION_NAME, COLLECTION_ID, COLLECTION_ID, DOI, LICENSE[1], LICENSE[2], LICENSE[0]])
    finally:
        con.close()
    return index


def warm(fake: fake_s3.FakeS3, ranges: list[Optional[str]]) -> dict[str, Any]:
    """One GET of every object from moto per Range variant, kept as the fault layer would
    relay it (its hop-by-hop headers dropped); the body kept is the uploaded object itself
    once it is checked equal to moto's."""
    started = time.monotonic()
    connection = http.client.HTTPConnection(fake._moto_host, fake._moto_port, timeout=120)
    count = 0
    for bucket, objects in fake._objects.items():
        for key, data in objects.items():
            for rng in ranges:
                connection.request("GET", f"/{bucket}/{urllib.parse.quote(key)}",
                                   headers={"Range": rng} if rng else {})
                response = connection.getresponse()
                body = response.read()
                if response.status not in (200, 206) or body != data:
                    raise RuntimeError(f"moto answered {response.status} for {key} (Range {rng}) "
                                       "with other bytes than those uploaded")
                headers = [(k, v) for k, v in response.getheaders()
                           if k.lower() not in fake_s3._HOP_BY_HOP]
                _CACHE[(bucket, key, rng)] = (response.status, response.reason, headers, data)
                count += 1
    connection.close()
    return {"cached_answers": count, "warm_seconds": round(time.monotonic() - started, 1)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index-dir", type=Path, required=True)
    p.add_argument("--series", type=int, default=160)
    p.add_argument("--patients", type=int, default=50)
    p.add_argument("--instances", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-byte-delay", type=float, default=0.0, metavar="S")
    p.add_argument("--conn-bandwidth", type=float, default=0, metavar="B/s")
    p.add_argument("--total-bandwidth", type=float, default=0, metavar="B/s")
    p.add_argument("--no-cache", action="store_true", help="every GET through moto (costs CPU)")
    p.add_argument("--cache-ranges", default="none," + S5CMD_RANGE,
                   help="Range headers whose answers are cached ('none': a plain GET)")
    p.add_argument("--stats", type=Path)
    p.add_argument("--build-procs", type=int, default=len(os.sched_getaffinity(0)))
    a = p.parse_args(argv)
    cfg = fake_nbia.FakeConfig(seed=a.seed, real_collections=False, demo_series=a.series,
                               demo_patients=max(1, min(a.patients, a.series)),
                               instances=a.instances, image_size=a.image_size)
    catalogue = fake_nbia._Catalogue(fake_nbia._normalised(cfg))
    fake = fake_s3.FakeS3(first_byte_delay=a.first_byte_delay,
                          conn_bandwidth=a.conn_bandwidth or None,
                          total_bandwidth=a.total_bandwidth or None).start()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        stats = build_and_upload(fake, catalogue, max(1, a.build_procs))
        index = write_index(a.index_dir, stats.pop("rows"))
        stats.update(index=str(index), cached=not a.no_cache,
                     shaping={"first_byte_delay": a.first_byte_delay,
                              "conn_bandwidth": a.conn_bandwidth, "total_bandwidth": a.total_bandwidth})
        if not a.no_cache:
            ranges = [None if r.strip().lower() == "none" else r.strip()
                      for r in a.cache_ranges.split(",") if r.strip()]
            stats.update(warm(fake, ranges))
            fake_s3._Handler._forward = _cached_forward
        fake.reset_counters()
        if a.stats:
            a.stats.write_text(json.dumps(stats))
        print(f"READY {fake.endpoint}", flush=True)
        while not stopping.wait(0.5):
            pass
        if a.stats:
            stats.update(object_gets=sum(fake.gets.values()), gets_from_cache=_HITS["hits"],
                         gets_through_moto=_HITS["misses"], lists=sum(fake.lists.values()))
            a.stats.write_text(json.dumps(stats))
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
