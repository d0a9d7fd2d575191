"""A fake of IDC's public S3 buckets for tests: a real S3 implementation with a fault layer.

``FakeS3`` runs moto's S3 in server mode (``moto.server.ThreadedMotoServer``) on 127.0.0.1 and,
in front of it, a small HTTP proxy on another 127.0.0.1 port that forwards every request to
moto unchanged (method, path, query, headers, body; status, headers, streamed body), except
the requests a test scripted a fault for. Clients talk to the proxy (``.endpoint``); the
test's own uploads go straight to moto (``.direct_endpoint``).

Use it::

    from fakes.fake_s3 import FakeS3, index_rows

    def test_something(fake_s3):                              # tests/conftest.py's fixture
        row = index_rows("prostate_3t", limit=1)[0]
        blobs = fake_s3.add_series(row)                       # row["instanceCount"] objects
        key = fake_s3.keys(row["crdc_series_uuid"])[0]
        fake_s3.script_faults(key, ["503", "reset"])          # the next two GETs of key fail
        url = f"{fake_s3.endpoint}/{row['aws_bucket']}/{key}"  # anonymous, path-style

Anonymous access. moto answers an unsigned ListObjects(V2) on any bucket, but refuses an
unsigned GET/HEAD of an object (403, empty body) unless the bucket policy permits the action
or the object's ACL is public-read. moto matches a HEAD against the action ``s3:HeadObject``,
which no real policy names, so a policy alone would leave HEAD at 403. Every bucket created
here therefore gets IDC-like public-read bucket policy (``s3:GetObject`` + ``s3:ListBucket`` for
``Principal: *``) and every object is uploaded with ``ACL=public-read``.

Faults (``FAULT_KINDS``), consumed in order, one per request, by the next GETs of a key (or of
any key under a scripted prefix ending in ``/``), or by the next list requests of a prefix;
when a script is used up, normal service resumes:

- ``"500"``: 500 with an S3 XML error body (``<Code>InternalError</Code>``); moto not asked.
- ``"503"``: 503 with ``<Code>SlowDown</Code>`` (S3's throttling; no Retry-After, as S3 sends none).
- ``"reset"``: moto's status and headers, the first half of the body, then a TCP reset
  (SO_LINGER 0 close): the client reads some bytes, then gets ECONNRESET.
- ``"short"``: moto's status and headers (full Content-Length), the first half of the body,
  then an orderly close (FIN): the client sees EOF before Content-Length bytes.
- ``"corrupt"``: moto's status and headers (true ETag and Content-Length), the full body with
  4 bytes in the middle inverted (XOR 0xFF).
- ``"stall"``: moto's status and headers, the first half of the body, then nothing until
  released (``release_stalls()``, ``stop()``, or ``stall_seconds`` elapsed, default 30),
  then an orderly close without the rest.
- ``"ok"``: no fault (forwarded normally); lets a script fault the n-th request, e.g.
  ``script_list_faults(prefix, ["ok", "500"])`` fails the second page of a listing.

Only GETs of objects and list requests (GET on a bucket without a sub-resource such as
``?policy``) consume scripts; HEAD, PUT and the rest are always forwarded. Path-style
addressing only (``<endpoint>/<bucket>/<key>``), which is what a custom endpoint gets.

Shaping (optional, off by default; for benchmarks): ``FakeS3(first_byte_delay=0.025,
conn_bandwidth=20e6, total_bandwidth=None)`` waits ``first_byte_delay`` seconds before
answering each object GET or list request (a cloud bucket's time to first byte), and paces
the bodies of every response the layer sends at ``conn_bandwidth`` bytes/s per client
connection and ``total_bandwidth`` bytes/s over all of them (token buckets; a fault's partial
body is not paced). Connections are not limited in number: like S3, the more a client opens,
the more it gets, up to ``total_bandwidth``.

moto keeps its state in module globals, so one ``FakeS3`` runs per process at a time
(``start()`` raises otherwise) and ``start()`` resets moto's state.

Real series to copy metadata from (idc-index-data 25.0.5, ``index_rows``; sizes of the synthetic
objects are ~1 KB whatever the real ones are):

- ``lung_phantom`` ("Lung Phantom" on TCIA): smallest collection with an analysis result:
  1 original CT series of 237 instances (patient 4482356, crdc_series_uuid
  f5402923-2649-4347-aea3-dc88ef463cc3), plus 108 one-instance SEG series of the analysis
  result ``qin_lungct_seg``. Good for a whole-collection run (237 objects, or 345 with the
  analysis results).
- ``prostate_3t`` ("Prostate-3T"): 64 patients, one MR series each, 15-24 instances
  (1,258 in all): a patient subset (``patient_ids=``) gives a multi-series run of any size.
- ``rider_breast_mri``: 5 patients x 8 MR series x 60 instances (2,400).
- ``pancreas_ct``: 80 CT series (original, 181-466 instances) + 80 one-instance SEG series
  (``pancreas_ct_seg``); e.g. PANCREAS_0002 has a 195-instance CT series.
- ``covid_19_ny_sbu``: CT series with 1,001 instances (two ListObjectsV2 pages), e.g.
  patient A095019's 16688e7a-02b3-4bc2-9c41-6280d2c30f72.
- buckets: 1,009,517 series in ``idc-open-data``, 4,473 in ``idc-open-data-two``, 30,201 in
  ``idc-open-data-cr``; ``cptac_cm`` spans ``idc-open-data`` and ``idc-open-data-two``.

Cost (2 cores): ``start()`` 0.3-0.6 s, ``stop()`` < 0.1 s; uploads go through moto's HTTP
server at ~200 objects/s (a 1,001-instance series: ~6 s, DICOM generation included); a GET
through the fault layer takes a few ms.

Needs moto[server], boto3, duckdb, idc-index-data and pydicom (requirements-idc-test.txt).
idc-index-data 25.0.5 needs Python >= 3.10: on 3.9, ``rows()`` serves a snapshot of the few
series above that the tests use (``snapshot_rows``), checked against the index on 3.10+, and
``write_snapshot_index(folder)`` makes an index parquet of it for the tool's --idc-index.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import http.client
import http.server
import json
import logging
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any, Dict, List, Optional, Sequence

MIB = 1024 * 1024
PART_SIZE = 8 * MIB               # boto3's and the AWS CLI's default multipart threshold and part size
FAULT_KINDS = ("500", "503", "reset", "short", "corrupt", "stall", "ok")
REGION = "us-east-1"
DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
BIG_IMAGE_SIDE = 2176             # 2176 x 2176 x 2 bytes = 9,469,952 bytes (9.03 MiB): two 8 MiB parts
_CHUNK = 64 * 1024
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
               "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade"}
_LIST_PARAMS = {"list-type", "prefix", "delimiter", "continuation-token", "start-after",
                "max-keys", "encoding-type", "fetch-owner", "marker", "x-id"}
_INSTALL_HINT = "pip install -r requirements-idc-test.txt"


# ----------------------------------------------------------------------------- the index

# Runs in a child process: scanning the 1 M-row index takes duckdb ~170 MB, which would stay
# in the test process's peak RSS for good (and on Linux, in the wait4 ru_maxrss of every
# child it starts afterwards).
_INDEX_QUERY = """
import json, sys
import duckdb, idc_index_data
collection_id, analysis, patients = json.loads(sys.argv[1])
path = str(idc_index_data.IDC_INDEX_PARQUET_FILEPATH).replace("'", "''")
sql = f"select * from read_parquet('{path}') where collection_id = ?"
params = [collection_id]
if not analysis:
    sql += " and analysis_result_id is null"
if patients is not None:
    sql += " and list_contains(?, PatientID)"
    params.append(patients)
con = duckdb.connect(config={"threads": 1})
cur = con.execute(sql + " order by PatientID, StudyInstanceUID, SeriesInstanceUID", params)
names = [d[0] for d in cur.description]
json.dump([dict(zip(names, row)) for row in cur.fetchall()], sys.stdout)
"""


@functools.lru_cache(maxsize=None)
def _index_json(query: str) -> str:
    done = subprocess.run([sys.executable, "-c", _INDEX_QUERY, query],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        if "ModuleNotFoundError" in last:
            raise ImportError(f"{last}: {_INSTALL_HINT}")
        raise RuntimeError(f"reading the IDC index failed: {last}")
    return done.stdout


def index_rows(collection_id: str, include_analysis_results: bool = False,
               limit: Optional[int] = None, *, patient_ids: Optional[Sequence[str]] = None,
               ) -> List[Dict[str, Any]]:
    """Rows of the installed idc-index-data index (one per series) for one collection, as
    dicts, ordered by PatientID, StudyInstanceUID, SeriesInstanceUID. Original series only
    unless ``include_analysis_results``; ``patient_ids`` keeps only those patients. Read with
    duckdb in a child process (~1 s; the same query is answered from a cache)."""
    query = json.dumps([collection_id, bool(include_analysis_results),
                        None if patient_ids is None else sorted(patient_ids)])
    found = json.loads(_index_json(query))
    return found[: int(limit)] if limit is not None else found


# A copy of a few rows of idc-index-data 25.0.5 (the columns add_series uses), for Python 3.9,
# where that package does not install (it needs Python >= 3.10). test_fake_s3 checks it
# against the index wherever the index is installed.
SNAPSHOT_COLUMNS = ("collection_id", "analysis_result_id", "PatientID", "StudyInstanceUID",
                    "SeriesInstanceUID", "Modality", "SOPClassUID", "SeriesNumber", "SeriesDescription",
                    "StudyDate", "StudyDescription", "aws_bucket", "crdc_series_uuid", "instanceCount",
                    "series_size_MB", "license_short_name", "source_DOI")
_SNAPSHOT = (
    ('prostate_3t', None, 'Prostate3T-01-0001', '1.3.6.1.4.1.14519.5.2.1.7308.2101.878027069026309930088081179232', '1.3.6.1.4.1.14519.5.2.1.7308.2101.294123309272114469889813649698', 'MR', '1.2.840.10008.5.1.4.1.1.4', '2', 't2_tse_tra', '2003-03-15', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '685be04a-ca32-4ec4-b2ca-45cb8252c817', 15, 3.121136, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0002', '1.3.6.1.4.1.14519.5.2.1.7308.2101.174768087184217631998622694695', '1.3.6.1.4.1.14519.5.2.1.7308.2101.203002521314946007603842576868', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-04-14', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '98b8ff07-c5f9-406e-83fe-16bf083c717d', 20, 4.158206, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0003', '1.3.6.1.4.1.14519.5.2.1.7308.2101.963278325993338392878243651154', '1.3.6.1.4.1.14519.5.2.1.7308.2101.286972777734309209775498508493', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-02-13', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '7c3629a0-09b9-448b-9ea7-e71ab50d99df', 24, 4.991726, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0004', '1.3.6.1.4.1.14519.5.2.1.7308.2101.779942494589345045769775478882', '1.3.6.1.4.1.14519.5.2.1.7308.2101.112694638881881463527415973833', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-04-03', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', 'a1762ed2-259e-4b64-a3de-593c5d33a7a2', 20, 4.161792, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0005', '1.3.6.1.4.1.14519.5.2.1.7308.2101.456573382271942806822042772525', '1.3.6.1.4.1.14519.5.2.1.7308.2101.128424014954001627445680964593', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-03-20', 'MR prostaat kanker detectie WDS_mc MCAPRODETW', 'idc-open-data', 'b690a985-afed-4e67-9a7e-c0df65c84079', 20, 4.162232, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0006', '1.3.6.1.4.1.14519.5.2.1.7308.2101.313126489857357276154915868809', '1.3.6.1.4.1.14519.5.2.1.7308.2101.315447759171940778415750609237', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-04-28', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '1d388b43-64d0-49f4-9cd9-82b3bdfbcd95', 20, 4.160344, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0007', '1.3.6.1.4.1.14519.5.2.1.7308.2101.994550259115942045104694382639', '1.3.6.1.4.1.14519.5.2.1.7308.2101.913804375580641648101810595370', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-05-01', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '3d8ae3ab-0e83-4031-b7b6-9931f9b1dab8', 20, 4.159676, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0008', '1.3.6.1.4.1.14519.5.2.1.7308.2101.367771875262376100645583735364', '1.3.6.1.4.1.14519.5.2.1.7308.2101.177663837100464311301589289294', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra', '2003-05-22', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', 'dc89a0a1-9baf-4737-b953-791172960c70', 15, 3.120682, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0009', '1.3.6.1.4.1.14519.5.2.1.7308.2101.637977639412730093231767416530', '1.3.6.1.4.1.14519.5.2.1.7308.2101.153505545312098146915314067348', 'MR', '1.2.840.10008.5.1.4.1.1.4', '2', 't2_tse_tra', '2003-03-15', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '34b1f280-6b84-469f-862e-0510ca912e2c', 17, 3.53667, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0010', '1.3.6.1.4.1.14519.5.2.1.7308.2101.292445269242544823221071132586', '1.3.6.1.4.1.14519.5.2.1.7308.2101.313362942195592570517841133677', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-02-10', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', 'd05264a2-fc9a-4d26-ac8e-a4230e1e59db', 20, 4.159952, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0011', '1.3.6.1.4.1.14519.5.2.1.7308.2101.279354101370096690974925375170', '1.3.6.1.4.1.14519.5.2.1.7308.2101.190695983970534665106903003399', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-02-27', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', 'e981db2d-394b-4395-a7e0-8ffdc51efb9d', 20, 4.159352, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0012', '1.3.6.1.4.1.14519.5.2.1.7308.2101.151951261973532185891847407908', '1.3.6.1.4.1.14519.5.2.1.7308.2101.155937334586458136517027004376', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-03-06', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '1d1b2b2e-ccd2-4aea-a244-1fb850abdb3e', 20, 4.160476, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0013', '1.3.6.1.4.1.14519.5.2.1.7308.2101.305436365067394759538617410978', '1.3.6.1.4.1.14519.5.2.1.7308.2101.155864588261016379928233518744', 'MR', '1.2.840.10008.5.1.4.1.1.4', '2', 't2_tse_tra', '2003-03-15', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', '188c9f40-fa86-4887-83a2-b82bdbdc55ec', 15, 3.120652, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0014', '1.3.6.1.4.1.14519.5.2.1.7308.2101.218376667886826636781529142304', '1.3.6.1.4.1.14519.5.2.1.7308.2101.263083536712312134552384706559', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-04-21', 'MR prostaat kanker detectie WDS_mc MCAPRODETW', 'idc-open-data', '6acddbb3-f343-4824-9fa5-542e49e72be5', 20, 4.159754, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0015', '1.3.6.1.4.1.14519.5.2.1.7308.2101.304303145850071139675628342261', '1.3.6.1.4.1.14519.5.2.1.7308.2101.101688087736317305418918651173', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-03-20', 'MR prostaat kanker detectie WDS_mc MCAPRODETW', 'idc-open-data', '761f2ee9-3c7c-4e71-bcef-43cc3ec66ef7', 20, 4.160404, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('prostate_3t', None, 'Prostate3T-01-0016', '1.3.6.1.4.1.14519.5.2.1.7308.2101.183666070866268935240926832895', '1.3.6.1.4.1.14519.5.2.1.7308.2101.100875285304586647581787393410', 'MR', '1.2.840.10008.5.1.4.1.1.4', '4', 't2_tse_tra_320_p2', '2003-03-20', 'MR prostaat kanker detectie_mc MCAPRODET', 'idc-open-data', 'f33a92bc-8041-4026-8054-0e91ff817cab', 20, 4.161578, 'CC BY 3.0', '10.7937/k9/tcia.2015.qjtv5il5'),
    ('covid_19_ny_sbu', None, 'A095019', '1.3.6.1.4.1.14519.5.2.1.99.1071.24959495743882045369807958755791', '1.3.6.1.4.1.14519.5.2.1.99.1071.32617409022384009988074894688660', 'CT', '1.2.840.10008.5.1.4.1.1.2', '8', 'CTA 0.5 CE', '1900-11-14', 'CT ABD AND PELVIS WITH IV CONT', 'idc-open-data', '16688e7a-02b3-4bc2-9c41-6280d2c30f72', 1001, 528.922308, 'CC BY 4.0', '10.7937/tcia.bbag-2923'),
    ('lung_phantom', None, '4482356', '1.2.840.113745.101000.1186002.40721.8111.13846623', '1.2.840.113619.2.55.3.1930041893.617.1308206442.326.4', 'CT', '1.2.840.10008.5.1.4.1.1.2', '6', '1.25x1.25 LUNG', '2011-06-29', 'CT RESEARCH EXAM', 'idc-open-data', 'f5402923-2649-4347-aea3-dc88ef463cc3', 237, 127.503952, 'CC BY 3.0', '10.7937/k9/tcia.2015.08a1ixoo'),
    ('pancreas_ct', 'pancreas_ct_seg', 'PANCREAS_0001', '1.2.826.0.1.3680043.2.1125.1.38381854871216336385978062044218957', '1.2.276.0.7230010.3.1.3.481037312.53527.1718923483.913862', 'SEG', '1.2.840.10008.5.1.4.1.1.66.4', '300', 'Segmentation of pancreas', '2015-11-24', 'Pancreas', 'idc-open-data', '823b9a8e-6892-452f-85f1-b2220910f007', 1, 2.366784, 'CC BY 4.0', '10.5281/zenodo.12130275'),
    ('pancreas_ct', None, 'PANCREAS_0001', '1.2.826.0.1.3680043.2.1125.1.38381854871216336385978062044218957', '1.2.826.0.1.3680043.2.1125.1.68878959984837726447916707551399667', 'CT', '1.2.840.10008.5.1.4.1.1.2', None, 'Pancreas', '2015-11-24', 'Pancreas', 'idc-open-data', 'ceb10f86-5ed4-4187-a613-b9c24dcf5024', 240, 126.12169, 'CC BY 3.0', '10.7937/k9/tcia.2016.tnb1kqbu'),
    ('pancreas_ct', 'pancreas_ct_seg', 'PANCREAS_0002', '1.2.826.0.1.3680043.2.1125.1.6781777242073195563250281253223046', '1.2.276.0.7230010.3.1.3.481037312.53394.1718923458.885271', 'SEG', '1.2.840.10008.5.1.4.1.1.66.4', '300', 'Segmentation of pancreas', '2015-11-24', 'Pancreas', 'idc-open-data', 'a05bf69f-a1f1-4d52-8b4b-d7c56a2c023c', 1, 2.30018, 'CC BY 4.0', '10.5281/zenodo.12130275'),
    ('pancreas_ct', None, 'PANCREAS_0002', '1.2.826.0.1.3680043.2.1125.1.6781777242073195563250281253223046', '1.2.826.0.1.3680043.2.1125.1.66376154825293205999744306285863502', 'CT', '1.2.840.10008.5.1.4.1.1.2', None, 'Pancreas', '2015-11-24', 'Pancreas', 'idc-open-data', '9690d777-e739-4497-9c94-d10fc96d91a7', 195, 102.474224, 'CC BY 3.0', '10.7937/k9/tcia.2016.tnb1kqbu'),
)


def snapshot_rows(collection_id: str) -> List[Dict[str, Any]]:
    """The snapshot's rows of one collection (prostate_3t: its first 16 series; covid_19_ny_sbu:
    one 1,001-instance CT series; lung_phantom: its CT series; pancreas_ct: PANCREAS_0001 and
    _0002, a CT and a SEG series each), in index_rows' order."""
    return [dict(zip(SNAPSHOT_COLUMNS, row)) for row in _SNAPSHOT if row[0] == collection_id]


# TCIA's name, the DOI and its license URL of each snapshot collection (idc-index-data 25.0.5's
# collections_index.parquet), for the index write_snapshot_index makes.
CC_BY_3, CC_BY_4 = ("https://creativecommons.org/licenses/by/3.0/",
                    "https://creativecommons.org/licenses/by/4.0/")
SNAPSHOT_COLLECTIONS = {
    "prostate_3t": ("Prostate-3T", [("10.7937/k9/tcia.2015.qjtv5il5", CC_BY_3)]),
    "covid_19_ny_sbu": ("COVID-19-NY-SBU", [("10.7937/tcia.bbag-2923", CC_BY_4)]),
    "lung_phantom": ("Lung Phantom", [("10.7937/k9/tcia.2015.08a1ixoo", CC_BY_3)]),
    "pancreas_ct": ("Pancreas-CT", [("10.7937/k9/tcia.2016.tnb1kqbu", CC_BY_3),
                                    ("10.5281/zenodo.12130275", CC_BY_4)]),
}


def write_snapshot_index(folder: "os.PathLike[str]") -> str:
    """The snapshot as an index of idc-index-data's schema (the columns it has) and a
    collections_index.parquet beside it: what the tool's --idc-index takes where the package
    does not install. Returns the index's path."""
    import duckdb
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    index, beside = os.path.join(folder, "idc_index.parquet"), \
        os.path.join(folder, "collections_index.parquet")
    as_json = os.path.join(folder, "rows.json")
    with open(as_json, "w") as handle:
        json.dump([dict(zip(SNAPSHOT_COLUMNS, row)) for row in _SNAPSHOT], handle)
    con = duckdb.connect()
    try:
        # the real index's types: VARCHAR but for these two (dates and UUIDs are text there)
        types = {"instanceCount": "BIGINT", "series_size_MB": "DOUBLE"}
        columns = ", ".join(f"{c}: '{types.get(c, 'VARCHAR')}'" for c in SNAPSHOT_COLUMNS)
        con.execute(f"COPY (SELECT * FROM read_json('{as_json}', format = 'array', "
                    f"columns = {{{columns}}})) TO '{index}' (FORMAT PARQUET)")
        values = ", ".join(
            f"('{cid}', '{name}', [" + ", ".join(f"{{'source_doi': '{doi}', 'license': "
                                                 f"{{'license_url': '{url}'}}}}"
                                                 for doi, url in sources) + "])"
            for cid, (name, sources) in SNAPSHOT_COLLECTIONS.items())
        con.execute(f"COPY (SELECT * FROM (VALUES {values}) AS t(collection_id, "
                    f"collection_name, sources)) TO '{beside}' (FORMAT PARQUET)")
    finally:
        con.close()
    os.unlink(as_json)
    return index


def rows(collection_id: str, **kwargs: Any) -> List[Dict[str, Any]]:
    """index_rows(collection_id, **kwargs) where idc-index-data 25.0.5 installs (Python >= 3.10),
    else the snapshot's rows filtered the same way (patient_ids, limit; original series only)."""
    if sys.version_info >= (3, 10):
        return index_rows(collection_id, **kwargs)
    found = snapshot_rows(collection_id)
    if not kwargs.get("include_analysis_results"):
        found = [r for r in found if r["analysis_result_id"] is None]
    if kwargs.get("patient_ids") is not None:
        found = [r for r in found if r["PatientID"] in kwargs["patient_ids"]]
    return found[: kwargs["limit"]] if kwargs.get("limit") is not None else found


# ----------------------------------------------------------------------------- DICOM

def _lo(value: Any) -> Optional[str]:
    """A value fit for LO/SH-like elements (no backslash or control characters, <= 64 chars)."""
    if value is None:
        return None
    text = re.sub(r"[\\\x00-\x1f]", " ", str(value)).strip()
    return text[:64] or None


def _da(value: Any) -> Optional[str]:
    if value is None:
        return None
    digits = re.sub(r"\D", "", str(value))
    return digits if len(digits) == 8 else None


def _is(value: Any) -> Optional[str]:
    try:
        number = int(float(str(value)))
    except (TypeError, ValueError):
        return None
    text = str(number)
    return text if len(text) <= 12 else None


def _cs(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = re.sub(r"[^A-Z0-9_ ]", "_", str(value).upper())[:16].strip()
    return text or None


def synthetic_dicom(row: Dict[str, Any], instance_number: int, sop_instance_uid: str,
                    *, side: int = 16) -> bytes:
    """A small valid DICOM file (explicit VR little endian, ``side`` x ``side`` 16-bit
    MONOCHROME2 pixels, deterministic per SOPInstanceUID) carrying ``row``'s identifiers."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset

    from .fake_nbia import dicom_file_bytes

    sop_class = row.get("SOPClassUID") or SECONDARY_CAPTURE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LE
    ds = Dataset()
    ds.file_meta = meta
    if int(pydicom.__version__.split(".")[0]) < 3:   # pydicom 2.4 (Python 3.9) wants these set
        ds.is_little_endian = True
        ds.is_implicit_VR = False
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    ds.PatientID = _lo(row.get("PatientID")) or ""
    ds.PatientName = _lo(row.get("PatientID")) or ""
    ds.StudyInstanceUID = row["StudyInstanceUID"]
    ds.SeriesInstanceUID = row["SeriesInstanceUID"]
    ds.Modality = _cs(row.get("Modality")) or "OT"
    for keyword, value in (("SeriesNumber", _is(row.get("SeriesNumber"))),
                           ("SeriesDescription", _lo(row.get("SeriesDescription"))),
                           ("StudyDate", _da(row.get("StudyDate"))),
                           ("StudyDescription", _lo(row.get("StudyDescription")))):
        if value is not None:
            setattr(ds, keyword, value)
    ds.InstanceNumber = str(instance_number)
    ds.AcquisitionNumber = "1"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = random.Random(sop_instance_uid).randbytes(side * side * 2)
    return dicom_file_bytes(ds)


def s3_etag(data: bytes, part_size: Optional[int] = None) -> str:
    """S3's ETag (without quotes) of ``data`` written in one PUT (``part_size`` None) or by a
    multipart upload with parts of ``part_size`` bytes."""
    if part_size is None:
        return hashlib.md5(data).hexdigest()
    digests = [hashlib.md5(data[i:i + part_size]).digest() for i in range(0, len(data), part_size)]
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


# ----------------------------------------------------------------------------- the fault layer

class _Pacer:
    """A bandwidth cap (token bucket): writers take bytes at once and sleep off the debt, so
    concurrent users of one pacer share its rate. The sleep ends early when ``stop`` is set."""

    def __init__(self, rate: Optional[float]) -> None:
        self.rate = rate if rate and rate > 0 else None
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        if self.rate is None:
            return
        with self._lock:
            now = time.monotonic()
            burst = max(self.rate * 0.02, float(_CHUNK))
            self._tokens = min(burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            stop.wait(debt / self.rate)


@dataclasses.dataclass
class Request:
    """One request seen by the fault layer."""
    method: str
    bucket: str
    key: str                 # "" for bucket-level requests
    query: str
    op: str                  # "get" (object GET), "list", or "other"
    fault: Optional[str]     # the fault applied, None if forwarded normally
    status: Optional[int]    # the status sent (None if nothing was sent)
    completed: bool          # response sent in full (the last bytes handed to the socket)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256       # s5cmd opens up to 256 connections at once
    fake: "FakeS3"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 120                  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
        # and the client's delayed ACK add 40 ms to every response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pacer = _Pacer(self.server.fake.conn_bandwidth)
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    # -- request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        fake = self.server.fake
        split = urllib.parse.urlsplit(self.path)
        bucket, _, key = urllib.parse.unquote(split.path).lstrip("/").partition("/")
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        op, target = "other", ""
        if self.command == "GET" and bucket and key:
            op, target = "get", key
        elif self.command == "GET" and bucket and set(query) <= _LIST_PARAMS:
            op, target = "list", query.get("prefix", [""])[0]
        body = self._read_body()
        record = fake._begin(Request(self.command, bucket, key, split.query, op, None, None, False), target)
        if op != "other" and fake.first_byte_delay > 0:
            fake._shaping_stop.wait(fake.first_byte_delay)
        if record.fault in ("500", "503"):
            self._send_error_xml(record, int(record.fault), bucket, key)
        else:
            self._forward(record, body, record.fault)

    def _write_last(self, record: Request, data: bytes) -> None:
        """Write the last bytes of a full response. The request counts as completed before
        they leave (a client that has read them sees the counters already updated) and stops
        counting if the write fails."""
        self.server.fake._completed(record, True)
        try:
            self._write_body(data)
            self.wfile.flush()
        except OSError:
            self.server.fake._completed(record, False)
            raise

    def _write_body(self, data: bytes) -> None:
        """Body bytes to the client, paced when the FakeS3 shapes (else one plain write)."""
        fake = self.server.fake
        if self._pacer.rate is None and fake._total_pacer.rate is None:
            self.wfile.write(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK):
            piece = view[start:start + _CHUNK]
            self._pacer.take(len(piece), fake._shaping_stop)
            fake._total_pacer.take(len(piece), fake._shaping_stop)
            self.wfile.write(piece)

    # -- responses

    def _send_error_xml(self, record: Request, status: int, bucket: str, key: str) -> None:
        code, message = (("InternalError", "We encountered an internal error. Please try again.")
                         if status == 500 else ("SlowDown", "Please reduce your request rate."))
        request_id = uuid.uuid4().hex[:16].upper()
        resource = f"<Key>{key}</Key>" if key else f"<BucketName>{bucket}</BucketName>"
        payload = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                   f"<Message>{message}</Message>{resource}<RequestId>{request_id}</RequestId>"
                   f"<HostId>{uuid.uuid4().hex}</HostId></Error>").encode()
        self.send_response_only(status)
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Date", self.date_time_string())
        self.send_header("Server", "AmazonS3")
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        record.status = status
        self._write_last(record, payload if self.command != "HEAD" else b"")

    def _forward(self, record: Request, body: bytes, fault: Optional[str]) -> None:
        fake = self.server.fake
        upstream = http.client.HTTPConnection(fake._moto_host, fake._moto_port, timeout=120)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP | {"content-length", "expect"}:
                    upstream.putheader(name, value)
            if body or self.command in ("PUT", "POST") or "Content-Length" in self.headers:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body or None)
            response = upstream.getresponse()
            self._relay(record, response, fault)
        finally:
            upstream.close()

    def _relay(self, record: Request, response: http.client.HTTPResponse, fault: Optional[str]) -> None:
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP]
        no_body = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        length = response.getheader("Content-Length")
        data: Optional[bytes] = None
        if not no_body and (length is None or fault not in (None, "ok")):
            data = response.read()              # faults need the whole body (objects are small)
            if length is None:
                headers.append(("Content-Length", str(len(data))))
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        record.status = response.status
        if no_body:
            self._write_last(record, b"")
            return
        if fault in (None, "ok"):
            if data is not None:
                self._write_last(record, data)
                return
            remaining = int(length or 0)
            if remaining == 0:
                self._write_last(record, b"")
            while remaining > 0:
                chunk = response.read(min(_CHUNK, remaining))
                if not chunk:                      # moto sent less than it announced
                    self.close_connection = True
                    return
                remaining -= len(chunk)
                if remaining > 0:
                    self._write_body(chunk)
                else:
                    self._write_last(record, chunk)
            return
        assert data is not None
        half = data[: len(data) // 2]
        if fault == "corrupt":
            flipped = bytearray(data)
            middle = len(flipped) // 2
            for i in range(max(0, middle - 2), min(len(flipped), middle + 2)):
                flipped[i] ^= 0xFF
            self._write_last(record, bytes(flipped))
        elif fault == "short":
            self.wfile.write(half)
            self.wfile.flush()
            self.close_connection = True
        elif fault == "reset":
            self.wfile.write(half)
            self.wfile.flush()
            self._reset()
        elif fault == "stall":
            self.wfile.write(half)
            self.wfile.flush()
            self.server.fake._stall()
            self.close_connection = True
        else:  # pragma: no cover - validated in script_faults
            raise AssertionError(fault)

    def _reset(self) -> None:
        """Close the connection with a TCP RST (SO_LINGER on, timeout 0)."""
        self.close_connection = True
        sock = self.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()             # the makefile holds a reference: drop it so that
            sock.close()                   # close() really closes the descriptor now
        except OSError:
            pass


class FakeS3:
    """moto's S3 server plus a scripted fault layer in front of it, both on 127.0.0.1.

    ``FakeS3(stall_seconds=30.0).start()`` -> self; ``.endpoint`` (the fault layer, for the
    code under test), ``.direct_endpoint`` (moto, for setup), ``.stop()``. Optional shaping
    (module docstring): ``first_byte_delay`` seconds, ``conn_bandwidth`` and
    ``total_bandwidth`` bytes/s; all off by default.
    """

    _running: Optional["FakeS3"] = None
    _running_lock = threading.Lock()

    def __init__(self, *, stall_seconds: float = 30.0, first_byte_delay: float = 0.0,
                 conn_bandwidth: Optional[float] = None,
                 total_bandwidth: Optional[float] = None) -> None:
        if first_byte_delay < 0 or (conn_bandwidth or 0) < 0 or (total_bandwidth or 0) < 0:
            raise ValueError("first_byte_delay, conn_bandwidth and total_bandwidth are >= 0")
        self.stall_seconds = stall_seconds
        self.first_byte_delay = first_byte_delay
        self.conn_bandwidth = conn_bandwidth
        self._total_pacer = _Pacer(total_bandwidth)
        self._shaping_stop = threading.Event()      # ends delays and pacing sleeps at stop()
        self.endpoint = ""
        self.direct_endpoint = ""
        self._lock = threading.Lock()
        self._moto: Any = None
        self._moto_host = "127.0.0.1"
        self._moto_port = 0
        self._proxy: Optional[_Server] = None
        self._proxy_thread: Optional[threading.Thread] = None
        self._client: Any = None
        self._connections: set = set()
        self._stall_release = threading.Event()
        self._stopped = False
        self._get_scripts: Dict[str, collections.deque] = {}
        self._list_scripts: Dict[str, collections.deque] = {}
        self._buckets: set = set()
        self._objects: Dict[str, Dict[str, bytes]] = {}
        self._series: Dict[str, List[str]] = {}
        self.reset_counters()

    # -- life cycle

    def start(self) -> "FakeS3":
        try:
            import boto3  # noqa: F401
            from moto.server import ThreadedMotoServer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"{e}: {_INSTALL_HINT}") from e
        with FakeS3._running_lock:
            if FakeS3._running is not None:
                raise RuntimeError("a FakeS3 is already running in this process (moto's state is global)")
            FakeS3._running = self
        try:
            werkzeug_log = logging.getLogger("werkzeug")
            if werkzeug_log.level == logging.NOTSET:
                werkzeug_log.setLevel(logging.WARNING)
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._moto.start()
            self._moto_host, self._moto_port = self._moto.get_host_and_port()
            self.direct_endpoint = f"http://{self._moto_host}:{self._moto_port}"
            self._proxy = _Server(("127.0.0.1", 0), _Handler)
            self._proxy.fake = self
            self.endpoint = f"http://127.0.0.1:{self._proxy.server_address[1]}"
            self._proxy_thread = threading.Thread(target=self._proxy.serve_forever, args=(0.05,),
                                                  name="fake-s3-proxy", daemon=True)
            self._proxy_thread.start()
            connection = http.client.HTTPConnection(self._moto_host, self._moto_port, timeout=30)
            connection.request("POST", "/moto-api/reset")     # moto's state is module-global
            status = connection.getresponse().status
            connection.close()
            if status != 200:
                raise RuntimeError(f"moto reset answered {status}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both servers (idempotent). Releases stalled responses and closes open connections."""
        if self._stopped:
            return
        self._stopped = True
        self._stall_release.set()
        self._shaping_stop.set()
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._moto is not None and self._moto_port:
            try:   # free the objects now (moto's state is module-global) rather than at the next start()
                connection = http.client.HTTPConnection(self._moto_host, self._moto_port, timeout=30)
                connection.request("POST", "/moto-api/reset")
                connection.getresponse().read()
                connection.close()
            except OSError:
                pass
            # ThreadedMotoServer.stop() waits for werkzeug's serve_forever loop, which looks at
            # its shutdown flag every 0.5 s or after each connection: poke it to stop at once.
            stopper = threading.Thread(target=self._moto.stop, daemon=True)
            stopper.start()
            while stopper.is_alive():
                try:
                    socket.create_connection((self._moto_host, self._moto_port), timeout=0.2).close()
                except OSError:
                    pass
                stopper.join(0.02)
            server = getattr(self._moto, "_server", None)
            if server is not None:
                server.server_close()
        with FakeS3._running_lock:
            if FakeS3._running is self:
                FakeS3._running = None

    def __enter__(self) -> "FakeS3":
        return self.start() if not self.endpoint else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- faults

    def script_faults(self, key_or_prefix: str, kinds: Sequence[str]) -> None:
        """Queue faults for the next GETs of an object key (``<series_uuid>/<instance>.dcm``),
        or, if ``key_or_prefix`` ends with ``/``, of any key under that prefix. A GET takes
        from its key's queue first, else from the longest matching prefix queue."""
        self._script(self._get_scripts, key_or_prefix, kinds)

    def script_list_faults(self, prefix: str, kinds: Sequence[str]) -> None:
        """Queue faults for the next list requests (ListObjectsV2/V1, every page) whose
        ``prefix`` parameter is exactly ``prefix`` (e.g. ``<series_uuid>/``)."""
        self._script(self._list_scripts, prefix, kinds)

    def _script(self, table: Dict[str, collections.deque], name: str, kinds: Sequence[str]) -> None:
        if isinstance(kinds, str):
            raise TypeError("kinds is a list of fault names, e.g. ['500']")
        bad = [k for k in kinds if k not in FAULT_KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; known: {FAULT_KINDS}")
        with self._lock:
            table.setdefault(name, collections.deque()).extend(kinds)

    def pending_faults(self) -> Dict[str, List[str]]:
        """The GET faults not consumed yet, by key or prefix."""
        with self._lock:
            return {k: list(v) for k, v in self._get_scripts.items() if v}

    def pending_list_faults(self) -> Dict[str, List[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._list_scripts.items() if v}

    def clear_faults(self) -> None:
        with self._lock:
            self._get_scripts.clear()
            self._list_scripts.clear()

    def release_stalls(self) -> None:
        """End every stalled response now (their connections are closed). Later stalls stall again."""
        with self._lock:
            event, self._stall_release = self._stall_release, threading.Event()
            if self._stopped:
                self._stall_release.set()
        event.set()

    def _stall(self) -> None:
        with self._lock:
            event = self._stall_release
        event.wait(self.stall_seconds)

    def _take_fault(self, op: str, target: str) -> Optional[str]:
        """The next scripted fault for a request (call with self._lock held)."""
        if op == "get":
            queue = self._get_scripts.get(target)
            if not queue:
                prefixes = [p for p, q in self._get_scripts.items()
                            if q and p.endswith("/") and target.startswith(p)]
                queue = self._get_scripts[max(prefixes, key=len)] if prefixes else None
        elif op == "list":
            queue = self._list_scripts.get(target)
        else:
            queue = None
        return queue.popleft() if queue else None

    # -- counters

    def reset_counters(self) -> None:
        """Zero the counters and clear the request log (scripts are kept)."""
        with self._lock:
            self.gets: collections.Counter = collections.Counter()            # every object GET, by key
            self.gets_completed: collections.Counter = collections.Counter()  # unfaulted, sent in full
            self.gets_faulted: collections.Counter = collections.Counter()    # answered with a fault ("ok" excluded)
            self.lists: collections.Counter = collections.Counter()           # every list request, by prefix parameter
            self.lists_faulted: collections.Counter = collections.Counter()
            self.connections_opened = 0                                       # TCP connections accepted
            self.heads: collections.Counter = collections.Counter()           # HEAD of an object, by key
            self.log: List[Request] = []

    def gets_under(self, prefix: str, counter: str = "gets") -> int:
        """Sum of one of the GET counters over the keys starting with ``prefix``."""
        with self._lock:
            return sum(n for k, n in getattr(self, counter).items() if k.startswith(prefix))

    def _begin(self, r: Request, target: str) -> Request:
        """Take the request's fault (if any) and count it, on arrival."""
        with self._lock:
            r.fault = self._take_fault(r.op, target)
            faulted = r.fault not in (None, "ok")
            self.log.append(r)
            if r.op == "get":
                self.gets[target] += 1
                if faulted:
                    self.gets_faulted[target] += 1
            elif r.op == "list":
                self.lists[target] += 1
                if faulted:
                    self.lists_faulted[target] += 1
            elif r.method == "HEAD" and r.key:
                self.heads[r.key] += 1
        return r

    def _completed(self, r: Request, done: bool) -> None:
        with self._lock:
            r.completed = done
            if r.op == "get" and r.fault in (None, "ok"):
                self.gets_completed[r.key] += 1 if done else -1

    def _track(self, connection: socket.socket, opened: bool) -> None:
        with self._lock:
            (self._connections.add if opened else self._connections.discard)(connection)
            self.connections_opened += opened

    # -- populating (straight to moto, with boto3 and dummy credentials)

    @property
    def client(self) -> Any:
        """A boto3 S3 client on ``direct_endpoint`` (path style, dummy credentials)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            options: Dict[str, Any] = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 3}}
            try:   # botocore >= 1.36 adds CRC checksums to uploads by default: keep them off, as IDC's
                config = Config(request_checksum_calculation="when_required",
                                response_checksum_validation="when_required", **options)
            except TypeError:  # pragma: no cover - older botocore
                config = Config(**options)
            self._client = boto3.client("s3", endpoint_url=self.direct_endpoint, region_name=REGION,
                                        config=config, **DUMMY_CREDENTIALS)
        return self._client

    def create_bucket(self, bucket: str) -> None:
        """Create ``bucket`` (if new) with an IDC-like public-read policy."""
        if bucket in self._buckets:
            return
        self.client.create_bucket(Bucket=bucket)
        policy = {"Version": "2012-10-17", "Statement": [{
            "Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
            "Action": ["s3:GetObject", "s3:ListBucket"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
        self.client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        self._buckets.add(bucket)

    def put_object(self, bucket: str, key: str, data: bytes, *, multipart: bool = False,
                   part_size: int = PART_SIZE) -> str:
        """Upload one public-read object (multipart with ``part_size`` parts if asked);
        returns its ETag without quotes."""
        self.create_bucket(bucket)
        common = {"Bucket": bucket, "Key": key}
        if not multipart:
            etag = self.client.put_object(Body=data, ACL="public-read", ContentType="application/dicom",
                                          **common)["ETag"]
        else:
            upload_id = self.client.create_multipart_upload(ACL="public-read", ContentType="application/dicom",
                                                            **common)["UploadId"]
            parts = []
            for number, offset in enumerate(range(0, len(data), part_size), start=1):
                part = self.client.upload_part(Body=data[offset:offset + part_size], PartNumber=number,
                                               UploadId=upload_id, **common)
                parts.append({"ETag": part["ETag"], "PartNumber": number})
            etag = self.client.complete_multipart_upload(UploadId=upload_id,
                                                         MultipartUpload={"Parts": parts}, **common)["ETag"]
        with self._lock:
            self._objects.setdefault(bucket, {})[key] = data
        return etag.strip('"')

    def add_series(self, row: Dict[str, Any], instances: Optional[int] = None,
                   multipart_index: Optional[int] = None) -> List[bytes]:
        """Upload a synthetic series for an idc_index row: ``instances`` (default
        ``row["instanceCount"]``) valid DICOM objects at ``<crdc_series_uuid>/<uuid4>.dcm`` in
        ``row["aws_bucket"]``, InstanceNumber 1..n. With ``multipart_index=k`` the k-th object
        (0-based, InstanceNumber k+1) is ~9 MiB and uploaded in two 8 MiB-part multipart pieces
        (ETag ``<hex>-2``). Returns the objects' bytes in InstanceNumber order; their keys are
        ``keys(row["crdc_series_uuid"])`` in the same order."""
        from pydicom.uid import generate_uid

        series_uuid = row["crdc_series_uuid"]
        bucket = row["aws_bucket"]
        count = int(row["instanceCount"] if instances is None else instances)
        if series_uuid in self._series:
            raise ValueError(f"series {series_uuid} was already added")
        if multipart_index is not None and not 0 <= multipart_index < count:
            raise ValueError(f"multipart_index {multipart_index} is not in 0..{count - 1}")
        self.create_bucket(bucket)
        blobs: List[bytes] = []
        keys: List[str] = []
        for k in range(count):
            big = k == multipart_index
            blob = synthetic_dicom(row, k + 1, generate_uid(), side=BIG_IMAGE_SIDE if big else 16)
            key = f"{series_uuid}/{uuid.uuid4()}.dcm"
            blobs.append(blob)
            keys.append(key)
        self._upload_all(bucket, keys, blobs, multipart_index)
        with self._lock:
            self._series[series_uuid] = keys
        return blobs

    def _upload_all(self, bucket: str, keys: List[str], blobs: List[bytes],
                    multipart_index: Optional[int]) -> None:
        """Upload in a few threads: moto answers one PUT in ~2 ms, a thread pool keeps a
        1,000-instance series to about a second."""
        from concurrent.futures import ThreadPoolExecutor

        assert self.client is not None           # build the client before the threads share it
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(self.put_object, bucket, key, blob, multipart=(i == multipart_index))
                       for i, (key, blob) in enumerate(zip(keys, blobs))]
            for future in futures:
                future.result()

    def keys(self, series_uuid: str) -> List[str]:
        """The keys ``add_series`` gave a series, in InstanceNumber order."""
        with self._lock:
            return list(self._series[series_uuid])

    def objects(self, bucket: str, prefix: str = "") -> Dict[str, bytes]:
        """{key: bytes} of every object this FakeS3 uploaded to ``bucket`` under ``prefix``."""
        with self._lock:
            return {k: v for k, v in sorted(self._objects.get(bucket, {}).items()) if k.startswith(prefix)}


__all__ = ["FakeS3", "FAULT_KINDS", "PART_SIZE", "Request", "index_rows", "rows", "s3_etag",
           "snapshot_rows", "synthetic_dicom", "write_snapshot_index"]
