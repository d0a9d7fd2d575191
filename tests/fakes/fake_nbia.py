#!/usr/bin/env python3
"""A fake of TCIA's NBIA v4 REST service, for tests, demos and benchmarks.

It imitates the behaviour described in ``nbia-v4.md`` point by point: the endpoints a
downloader needs, their quirks (case-sensitive parameter names, 200 with an empty body for
empty results, null keys left out, MM-DD-YYYY dates, 400 for unknown series), zips streamed
with chunked transfer encoding, the three possible treatments of ``IncludeMD5``, Keycloak-like
tokens, and the failures seen on the live service (500s, 429s, resets, stalls, corrupt
entries, truncated zips, wrong MD5 rows) with deterministic, seedable probabilities.

It can also play a malicious or broken server: ``script_faults`` takes HOSTILE_KINDS (trickled
or endless bodies, huge LICENSE/md5hashes.csv/DICOM entries, encrypted or AES-method entries,
an HTTP-date Retry-After, names with terminal escapes); ``FakeConfig.series_rows_hook`` rewrites
getSeries rows; ``FakeNbia.override_metadata`` makes an endpoint answer fixed bytes; and
``FakeConfig.metadata_hang`` makes metadata requests hang silently or trickle at 1 byte/s.

Use it from Python::

    with FakeNbia(seed=1, faults=Faults(p500=0.2)).start() as fake:
        requests.get(fake.url + "getCollectionValues")

or as a program::

    python tests/fakes/fake_nbia.py --port 0 --nasty all --fault-reset 0.1

which prints ``READY http://127.0.0.1:<port>/nbia-api/services/v4/`` once it listens.

Only the standard library, numpy and pydicom are used. Series metadata is built at start-up
without touching pixel data (file sizes are computed arithmetically from the DICOM element
list), and DICOM files are generated on request and kept in a bounded cache, so 10,000-series
collections are cheap.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as _dt
import email.utils
import hashlib
import html
import http.server
import io
import itertools
import json
import random
import re
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

import numpy as np
import pydicom
import pydicom.data
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset

__all__ = ["Faults", "FakeConfig", "FakeNbia", "Counters", "NASTY_KINDS", "FAULT_KINDS", "HOSTILE_KINDS",
           "main"]

# ---------------------------------------------------------------------------------------------
# Constants (immutable)
# ---------------------------------------------------------------------------------------------

API_PREFIX = "/nbia-api/services/v4/"
TOKEN_PATH = "/nbia-api/oauth/token"

NASTY_KINDS = frozenset({"contaminate", "junk", "hostile_names", "duplicate_series_numbers", "missing_dates"})
FAULT_KINDS = ("500", "429", "reset", "stall", "corrupt", "truncate", "bad_md5_row")
# A malicious or broken server, only by script_faults (see its docstring for what each does).
HOSTILE_KINDS = ("trickle", "endless", "huge_license", "huge_md5_table", "huge_dicom", "encrypted_entry",
                 "unsupported_method", "retry_after_date", "control_names")
# Only by script_faults: "not_granted" is a listed series the server refuses, as NBIA does for
# series the user may not see (and for withdrawn ones).
SCRIPTED_ONLY_KINDS = ("not_granted",) + HOSTILE_KINDS
# Faults whose zip is built in memory so that header bytes can be patched before sending.
PATCHED_KINDS = frozenset({"encrypted_entry", "unsupported_method"})
METADATA_HANGS = ("silent", "trickle")
INCLUDE_MD5_MODES = ("honour", "ignore", "refuse")

# The live service answers a failing request with exactly these 48 bytes.
BODY_500 = b"Server was not able to process your request\nnull"
MISSING_UID = "A parameter, SeriesInstanceUID, is required for this API call."
NOT_GRANTED = ("The user has not been granted the access to image with given SeriesInstanceUID,{uid}."
               " Please contact System Admin to resolve this issue.")

# UIDs: pydicom's UID root (free for anyone generating UIDs with pydicom) + a fixed branch
# for this fake, then seed and deterministic numbers. Digits and dots, well under 64 chars.
ORG_ROOT = "1.2.826.0.1.3680043.8.498.99"
IMPLEMENTATION_CLASS_UID = ORG_ROOT + ".0.1"
IMPLEMENTATION_VERSION = "FAKE_NBIA_1"

SOP_CLASS = MappingProxyType({
    "CT": "1.2.840.10008.5.1.4.1.1.2",     # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",     # MR Image Storage
    "PT": "1.2.840.10008.5.1.4.1.1.128",   # PET Image Storage
})
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"

# Column order of getSeries objects (nbia-v4.md); keys with null values are left out.
SERIES_COLUMNS = (
    "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
    "SeriesDescription", "BodyPartExamined", "SeriesNumber", "AnnotationsFlag", "Collection", "Site",
    "PatientID", "PatientSex", "PatientAge", "Manufacturer", "ManufacturerModelName",
    "SoftwareVersions", "ImageCount", "MaxSubmissionTimestamp", "LicenseName", "LicenseURI",
    "DataDescriptionURI", "FileSize", "ReleasedStatus", "DateReleased", "StudyDesc", "StudyDate",
    "ThirdPartyAnalysis", "Authorized",
)
PATIENT_COLUMNS = ("PatientId", "PatientName", "PatientBirthDate", "PatientSex", "EthnicGroup",
                   "Collection", "Phantom", "SpeciesCode", "SpeciesDescription", "Authorized")
STUDY_COLUMNS = ("StudyInstanceUID", "StudyDate", "StudyDescription", "AdmittingDiagnosesDescription",
                 "StudyID", "PatientAge", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                 "EthnicGroup", "Collection", "SeriesCount", "LongitudinalTemporalEventType",
                 "LongitudinalTemporalOffsetFromEvent", "Authorized")
# getSeriesMetadata columns as NBIA's source (V4_getSeriesMetadata) and tcia_utils' column
# mapping name them ("spaced"), with the source of each value. nbia-v4.md shows the header as
# "PatientID","PatientName",... ("compact"); FakeConfig.metadata_headers switches between them.
METADATA_COLUMNS = (
    ("Patient ID", "PatientID"), ("Patient Name", "PatientName"), ("Patient Sex", "PatientSex"),
    ("Ethnic Group", "EthnicGroup"), ("Phantom", "Phantom"), ("Species Code", "SpeciesCode"),
    ("Species Description", "SpeciesDescription"), ("Study Instance UID", "StudyInstanceUID"),
    ("Study Date", "StudyDate"), ("Study Description", "StudyDesc"),
    ("Admitting Diagnosis Description", "AdmittingDiagnosesDescription"), ("Study ID", "StudyID"),
    ("Patient Age", "PatientAge"), ("Longitudinal Temporal Event Type", "LongitudinalTemporalEventType"),
    ("Longitudinal Temporal Offset From Event", "LongitudinalTemporalOffsetFromEvent"),
    ("Series Instance UID", "SeriesInstanceUID"), ("Project", "Collection"), ("Modality", "Modality"),
    ("Protocol Name", "ProtocolName"), ("Series Date", "SeriesDate"),
    ("Series Description", "SeriesDescription"), ("Body Part Examined", "BodyPartExamined"),
    ("Series Number", "SeriesNumber"), ("Annotations Flag", "AnnotationsFlag"),
    ("Manufacturer", "Manufacturer"), ("Manufacturer Model Name", "ManufacturerModelName"),
    ("Pixel Spacing(mm)- Row", "PixelSpacing"), ("Slice Thickness(mm)", "SliceThickness"),
    ("Software Versions", "SoftwareVersions"), ("Image Count", "ImageCount"),
    ("Max Submission Timestamp", "MaxSubmissionTimestamp"), ("License Name", "LicenseName"),
    ("License URI", "LicenseURI"), ("Collection URI", "DataDescriptionURI"), ("File Size", "FileSize"),
    ("Date Released", "DateReleased"), ("Third Party Analysis", "ThirdPartyAnalysis"),
    ("Authorized", "Authorized"),
)

# Allowed GET parameters per endpoint, in the order the 400 message lists them.
GET_PARAMS: MappingProxyType[str, tuple[str, ...]] = MappingProxyType({
    "getCollectionValues": ("format",),
    "getPatient": ("Collection", "format", "PatientId"),
    "getPatientStudy": ("Collection", "PatientID", "StudyInstanceUID", "format"),
    "getSeries": ("Collection", "format", "PatientID", "StudyInstanceUID", "Modality", "BodyPartExamined",
                  "ManufacturerModelName", "Manufacturer", "SeriesInstanceUID"),
    "getSeriesSize": ("SeriesInstanceUID", "format"),
    "getImage": ("SeriesInstanceUID", "NewFileNames", "IncludeMD5"),
    "getImageWithMD5Hash": ("SeriesInstanceUID",),
    "getSOPInstanceUIDs": ("SeriesInstanceUID", "format"),
    "getSingleImage": ("SeriesInstanceUID", "SOPInstanceUID"),
    "getUpdatedSeries": ("fromDate", "format"),
})
POST_ENDPOINTS = MappingProxyType({"getSeriesMetadata": ("format",), "getMD5Hierarchy": ()})
IMAGE_ENDPOINTS = frozenset({"getImage", "getImageWithMD5Hash"})
# metadata_hang spares these: they serve image bytes, not metadata.
BULK_ENDPOINTS = IMAGE_ENDPOINTS | {"getSingleImage"}

LICENSE_URLS = MappingProxyType({
    "CC BY 3.0": "https://creativecommons.org/licenses/by/3.0/",
    "CC BY 4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC BY-NC 3.0": "https://creativecommons.org/licenses/by-nc/3.0/",
    "CC BY-NC 4.0": "https://creativecommons.org/licenses/by-nc/4.0/",
})

ZIP_DATE = (2024, 1, 2, 3, 4, 6)     # fixed entry timestamps: byte-identical zips across runs
CHUNK = 32 * 1024                    # HTTP chunk size of streamed zips
SEND_PIECE = 16 * 1024               # granularity of bandwidth shaping
# The DOIs of the analysis results in tests/data (pancreas_ct_seg, made by IDC, in Zenodo).
ANALYSIS_RESULT_DOIS = frozenset({"https://doi.org/10.5281/zenodo.12130275"})
CACHE_BYTES = 64 * 1024 * 1024       # bound of the in-memory cache of generated DICOM files
TRICKLE_FREE = 1024                  # body bytes a "trickle" image fault sends at full speed
METADATA_TRICKLE_RATE = 1.0          # bytes/s of metadata_hang="trickle"
ENDLESS_BLOCK = 64 * 1024            # the block an "endless" body repeats
STREAM_BLOCK = 1 << 20               # piece size of streamed huge entries
CONTROL_NAME = "\x1b[31mred\x1b[0m\x07bell.dcm"   # "control_names": ANSI escapes and BEL
ZIP_AES_METHOD = 99                  # WinZip AES: a method number Python's zipfile refuses

# Descriptions the "hostile_names" nastiness puts in the DEMO collection's metadata.
HOSTILE_SERIES_DESCRIPTIONS = (
    "../../../etc/passwd",
    "a/b\\c/d",
    ".hidden",
    "..",
    "Thorax ñ 肺 Ü 🫁 Ø",
    "ctrl\tchars\nnew\rline\x00nul\x1besc\x7fdel",
    "CON",
    "trailing dot and space. ",
    "L" + "o" * 298 + "g",            # 300 characters
)
HOSTILE_STUDY_DESC = "../..\\Study/ünïcödé\t\x07" + "x" * 40


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass
class Faults:
    """Per-image-request fault probabilities (getImage and getImageWithMD5Hash).

    One uniform draw per request, derived from (seed, series UID, that series' request
    number), is compared with the cumulative probabilities in the order of the fields, so
    each kind happens with its own probability and the sequence does not depend on threads.
    """
    p500: float = 0.0
    p429: float = 0.0
    retry_after: float = 1.0          # seconds, sent in Retry-After of 429 answers
    reset: float = 0.0                # part of the zip, then a TCP RST
    stall: float = 0.0                # part of the zip, then silence for stall_seconds, then close
    stall_seconds: float = 30.0
    corrupt: float = 0.0              # one DICOM entry's bytes altered before zipping
    truncate: float = 0.0             # clean end of the HTTP response, no central directory
    bad_md5_row: float = 0.0          # one wrong hash in md5hashes.csv
    # Parameters of scripted-only kinds (HOSTILE_KINDS):
    trickle_rate: float = 1.0         # bytes/s of "trickle" after its first TRICKLE_FREE bytes
    huge_entry_bytes: int = 64 * 1024 * 1024   # size of the huge_license/md5_table/dicom entries


@dataclass
class FakeConfig:
    seed: int = 0
    data_dir: Path | None = None          # *.series.json; None -> tests/data
    real_collections: bool = True         # serve the series.json collections
    # Also serve the series.json rows of ANALYSIS_RESULT_DOIS (IDC's analysis results that our
    # test data files under a collection, such as Pancreas-CT's 80 SEG series): real NBIA lists
    # only a collection's original series, so a test asks for these on purpose.
    analysis_results: bool = False
    demo_series: int = 12                 # DEMO collection: number of series
    demo_patients: int = 4
    instances: int = 4                    # instances per DEMO series; cap per real-metadata series
    image_size: int = 64                  # rows = columns of generated slices
    include_md5: str = "ignore"           # "honour" | "ignore" | "refuse"
    zip_deflate: bool = True              # NBIA's Java ZipOutputStream deflates by default
    require_token: bool = False
    users: dict[str, str] = field(default_factory=lambda: {"nbia_guest": ""})
    token_lifetime: float = 7200.0
    refresh_lifetime: float = 36000.0
    nasty: frozenset[str] = frozenset()   # subset of NASTY_KINDS
    faults: Faults = field(default_factory=Faults)
    first_byte_delay: float = 0.0         # seconds before the first byte of each image response
    conn_bandwidth: float | None = None   # bytes/s per connection
    total_bandwidth: float | None = None  # bytes/s over all connections
    # Additions beyond the agreed interface (defaults keep the agreed behaviour):
    metadata_headers: str = "spaced"      # getSeriesMetadata column names: "spaced" | "compact"
    verbose: bool = False                 # log each request to stderr
    # Hostile metadata (defaults: none). The hook gets getSeries' JSON rows (copies, after the
    # query's filters) and whatever it returns is served as JSON ([] keeps 200 + empty body).
    series_rows_hook: Callable[[list[dict]], list[Any]] | None = None
    # "silent": metadata requests get no answer until stop(); "trickle": their real answer at
    # METADATA_TRICKLE_RATE bytes/s. Image endpoints (BULK_ENDPOINTS) are not affected.
    metadata_hang: str | None = None
    # getMD5Hierarchy's formula is unconfirmed on live data: "right" serves the documented
    # one, "other" a hash by another formula (md5 of the MD5s unsorted, comma-joined),
    # "empty" a 200 with an empty body.
    md5_hierarchy: str = "right"


def _normalised(cfg: FakeConfig) -> FakeConfig:
    """Validate a config and coerce convenient input types (str paths, sets, dict faults)."""
    if cfg.data_dir is not None and not isinstance(cfg.data_dir, Path):
        cfg.data_dir = Path(cfg.data_dir)
    if isinstance(cfg.faults, dict):
        cfg.faults = Faults(**cfg.faults)
    nasty = frozenset([cfg.nasty] if isinstance(cfg.nasty, str) else cfg.nasty)
    if "all" in nasty:
        nasty = NASTY_KINDS
    unknown = nasty - NASTY_KINDS
    if unknown:
        raise ValueError(f"unknown nasty kinds {sorted(unknown)}; choose from {sorted(NASTY_KINDS)}")
    cfg.nasty = nasty
    if cfg.include_md5 not in INCLUDE_MD5_MODES:
        raise ValueError(f"include_md5 must be one of {INCLUDE_MD5_MODES}")
    if cfg.metadata_headers not in ("spaced", "compact"):
        raise ValueError("metadata_headers must be 'spaced' or 'compact'")
    if cfg.metadata_hang not in (None, *METADATA_HANGS):
        raise ValueError(f"metadata_hang must be None or one of {METADATA_HANGS}")
    if cfg.faults.trickle_rate <= 0 or cfg.faults.huge_entry_bytes < 0:
        raise ValueError("faults.trickle_rate > 0, faults.huge_entry_bytes >= 0")
    if cfg.instances < 1 or cfg.image_size < 8 or cfg.demo_series < 0 or cfg.demo_patients < 1:
        raise ValueError("instances >= 1, image_size >= 8, demo_series >= 0, demo_patients >= 1")
    return cfg


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def _uid(*parts: int) -> str:
    return ".".join([ORG_ROOT, *(str(int(p)) for p in parts)])


def _digest(*parts: object) -> bytes:
    """Deterministic pseudo-random bytes from any parts (stable across processes, unlike hash())."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def _unit(*parts: object) -> float:
    """A deterministic float in [0, 1)."""
    return int.from_bytes(_digest(*parts)[:8], "big") / 2.0 ** 64


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _v4_date(d: _dt.date) -> str:
    return d.strftime("%m-%d-%Y")


def _parse_v4_date(s: str) -> _dt.date:
    return _dt.datetime.strptime(s, "%m-%d-%Y").date()


def _dicom_date(v4: str | None) -> str | None:
    return None if not v4 else _parse_v4_date(v4).strftime("%Y%m%d")


_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def _dicom_lo(s: str | None, limit: int = 64) -> str | None:
    """A value that is valid in an LO/SH element: no control characters or backslashes, <= limit."""
    if s is None:
        return None
    s = _CONTROL.sub(" ", s).strip()[:limit].strip()
    return s or None


def _dicom_cs(s: str | None) -> str | None:
    if not s:
        return None
    s = re.sub(r"[^A-Z0-9 _]", "_", s.upper())[:16]
    return s or None


def _license_uri(name: str | None) -> str | None:
    if not name:
        return None
    return LICENSE_URLS.get(name, "https://creativecommons.org/licenses/by/4.0/")


def _repeated(unit: bytes, total: int) -> Iterator[bytes]:
    """``total`` bytes of ``unit`` over and over, in ~1 MiB pieces: huge entries never sit in memory."""
    block = unit * max(1, STREAM_BLOCK // len(unit))
    for start in range(0, total, len(block)):
        yield block[:total - start]


# ---------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------

@dataclass
class _Series:
    """One served series: its getSeries record plus what is needed to generate its files."""
    idx: int                              # global index: seeds pixel data and instance UIDs
    record: dict[str, Any]                # getSeries object exactly as served (no None values)
    patient_name: str
    study_id: str
    n: int                                # number of instances served
    demo: bool                            # nastiness applies to DEMO series only
    sop_uids: tuple[str, ...] = ()
    sample_files: tuple[bytes, ...] = ()  # pydicom's sample files, rewritten (sample series only)
    sizes: tuple[int, ...] = ()           # size of each served .dcm
    extra: dict[str, Any] = field(default_factory=dict)   # metadata not in getSeries (sex, age...)

    @property
    def uid(self) -> str:
        return self.record["SeriesInstanceUID"]

    @property
    def collection(self) -> str:
        return self.record["Collection"]

    def new_file_name(self, k: int) -> str:
        """NBIA's NewFileNames: <acquisition>-<instance>.dcm, each padded to its count's digits."""
        return f"1-{k + 1:0{len(str(self.n))}d}.dcm"

    @staticmethod
    def old_file_name(k: int) -> str:
        return f"{k + 1:08d}.dcm"


_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"})
Element = tuple[str, str, Any]            # (keyword, VR, value)


@dataclass(frozen=True)
class _PixelData:
    """Stands for the pixel data in an element list: its length, without generating it."""
    nbytes: int


def _value_length(vr: str, value: Any) -> int:
    if vr in ("US", "SS"):
        return 2 * (len(value) if isinstance(value, (list, tuple)) else 1)
    if vr in ("UL", "SL", "FL"):
        return 4 * (len(value) if isinstance(value, (list, tuple)) else 1)
    if isinstance(value, _PixelData):
        n = value.nbytes
    elif isinstance(value, (bytes, bytearray)):
        n = len(value)
    else:
        text = "\\".join(value) if isinstance(value, (list, tuple)) else str(value)
        n = len(text.encode("utf-8"))       # SpecificCharacterSet is ISO_IR 192 (UTF-8)
    return n + (n & 1)                      # values are padded to an even length


def _elements_size(elements: Iterable[Element]) -> int:
    """The exact number of bytes pydicom writes for these elements in explicit VR little endian."""
    return sum((12 if vr in _LONG_VRS else 8) + _value_length(vr, v) for _, vr, v in elements)


class _Generator:
    """Deterministic DICOM content: element lists, sizes, and CT-like pixel data."""

    # Geometry and display defaults per modality: pixel spacing, slice thickness, window.
    GEOMETRY = MappingProxyType({"CT": ("0.7", "2.5", "40", "400"), "MR": ("1.0", "5.0", "400", "800"),
                                 "PT": ("4.0", "3.0", "1000", "2000")})

    def __init__(self, seed: int, rows: int):
        self.seed = seed
        self.rows = rows

    def sop_class(self, s: _Series) -> str:
        return SOP_CLASS.get(s.record.get("Modality", ""), SECONDARY_CAPTURE)

    # The elements are split into a per-series constant part and a per-instance part, so a
    # series' FileSize is one element-list evaluation plus a few string lengths per instance.
    def meta_elements(self, s: _Series, k: int) -> list[Element]:
        return [
            ("FileMetaInformationVersion", "OB", b"\x00\x01"),
            ("MediaStorageSOPClassUID", "UI", self.sop_class(s)),
            ("MediaStorageSOPInstanceUID", "UI", s.sop_uids[k]),
            ("TransferSyntaxUID", "UI", EXPLICIT_VR_LE),
            ("ImplementationClassUID", "UI", IMPLEMENTATION_CLASS_UID),
            ("ImplementationVersionName", "SH", IMPLEMENTATION_VERSION),
        ]

    def series_elements(self, s: _Series) -> list[Element]:
        r = s.record
        modality = r.get("Modality", "OT")
        spacing, thickness, wc, ww = self.GEOMETRY.get(modality, self.GEOMETRY["CT"])
        sop_class = self.sop_class(s)
        out: list[Element] = [
            ("SpecificCharacterSet", "CS", "ISO_IR 192"),
            ("ImageType", "CS", ["ORIGINAL", "PRIMARY", "AXIAL"]),
            ("SOPClassUID", "UI", sop_class),
            ("StudyTime", "TM", "120000"),
            ("Modality", "CS", _dicom_cs(modality) or "OT"),
            ("PatientName", "PN", s.patient_name),
            ("PatientID", "LO", r["PatientID"]),
            ("StudyInstanceUID", "UI", r["StudyInstanceUID"]),
            ("SeriesInstanceUID", "UI", r["SeriesInstanceUID"]),
            ("StudyID", "SH", s.study_id),
            ("AcquisitionNumber", "IS", "1"),
            ("FrameOfReferenceUID", "UI", r["StudyInstanceUID"] + ".1"
             if len(r["StudyInstanceUID"]) <= 62 else r["StudyInstanceUID"]),
            ("ImageOrientationPatient", "DS", ["1", "0", "0", "0", "1", "0"]),
            ("SamplesPerPixel", "US", 1),
            ("PhotometricInterpretation", "CS", "MONOCHROME2"),
            ("Rows", "US", self.rows),
            ("Columns", "US", self.rows),
            ("PixelSpacing", "DS", [spacing, spacing]),
            ("SliceThickness", "DS", thickness),
            ("BitsAllocated", "US", 16),
            ("BitsStored", "US", 16),
            ("HighBit", "US", 15),
            ("PixelRepresentation", "US", 1),
            ("WindowCenter", "DS", wc),
            ("WindowWidth", "DS", ww),
            ("RescaleIntercept", "DS", "0"),
            ("RescaleSlope", "DS", "1"),
            ("PixelData", "OW", _PixelData(self.rows * self.rows * 2)),   # generated in build()
        ]
        if modality == "CT":
            out.append(("RescaleType", "LO", "HU"))
        if sop_class == SECONDARY_CAPTURE:
            out.append(("ConversionType", "CS", "WSD"))
        optional = [
            ("StudyDate", "DA", _dicom_date(r.get("StudyDate"))),
            ("SeriesDate", "DA", _dicom_date(r.get("SeriesDate"))),
            ("Manufacturer", "LO", _dicom_lo(r.get("Manufacturer"))),
            ("ManufacturerModelName", "LO", _dicom_lo(r.get("ManufacturerModelName"))),
            ("StudyDescription", "LO", _dicom_lo(r.get("StudyDesc"))),
            ("SeriesDescription", "LO", _dicom_lo(r.get("SeriesDescription"))),
            ("PatientSex", "CS", s.extra.get("PatientSex")),
            ("PatientAge", "AS", s.extra.get("PatientAge")),
            ("BodyPartExamined", "CS", _dicom_cs(r.get("BodyPartExamined"))),
            ("SeriesNumber", "IS", str(r["SeriesNumber"]) if r.get("SeriesNumber") is not None else None),
            ("ProtocolName", "LO", _dicom_lo(r.get("ProtocolName"))),
            ("SoftwareVersions", "LO", _dicom_lo(r.get("SoftwareVersions"))),
        ]
        out.extend(e for e in optional if e[2] is not None)
        return out

    def instance_elements(self, s: _Series, k: int) -> list[Element]:
        modality = s.record.get("Modality", "OT")
        spacing, thickness, _, _ = self.GEOMETRY.get(modality, self.GEOMETRY["CT"])
        corner = f"{-0.5 * self.rows * float(spacing):.1f}"
        z = f"{-k * float(thickness):.1f}"
        return [
            ("SOPInstanceUID", "UI", s.sop_uids[k]),
            ("InstanceNumber", "IS", str(k + 1)),
            ("ImagePositionPatient", "DS", [corner, corner, z]),
            ("SliceLocation", "DS", z),
        ]

    def sizes(self, s: _Series) -> tuple[int, ...]:
        const = _elements_size(self.series_elements(s))
        out = []
        for k in range(s.n):
            meta = _elements_size(self.meta_elements(s, k))
            # preamble + "DICM" + the (0002,0000) group length element, then the elements
            out.append(128 + 4 + 12 + meta + const + _elements_size(self.instance_elements(s, k)))
        return tuple(out)

    def pixels(self, s: _Series, k: int) -> np.ndarray:
        """A smooth phantom slice plus mild noise: compresses like real CT, unlike random bytes.

        float32 and broadcast 1-D axes keep this at a few ms per 512x512 slice, so the fake is
        not what limits a benchmark."""
        n = self.rows
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, s.idx, k])
        shape_rng = np.random.default_rng([self.seed & 0xFFFFFFFF, s.idx])   # per-series anatomy
        ax, ay, dx = shape_rng.uniform(0.72, 0.9), shape_rng.uniform(0.5, 0.66), shape_rng.uniform(-0.05, 0.05)
        scale = np.float32(0.85 + 0.15 * np.sin(np.pi * (k + 0.5) / max(s.n, 1)))   # widest mid-series
        axis = np.linspace(-1, 1, n, dtype=np.float32)
        y, x = axis[:, None], axis[None, :] - np.float32(dx)
        body = (x / (ax * scale)) ** 2 + (y / (ay * scale)) ** 2 <= 1.0
        lungs = body & ((((np.abs(x) - 0.33 * scale) / (0.22 * scale)) ** 2
                         + ((y + 0.05) / (0.36 * scale)) ** 2) <= 1.0)
        spine = (x ** 2 + (y - 0.42 * ay * scale) ** 2) <= (0.08 * scale) ** 2
        noise = rng.standard_normal((n, n), dtype=np.float32)
        modality = s.record.get("Modality", "CT")
        if modality == "MR":
            img = np.where(body, np.where(lungs, np.float32(140), 520 + 90 * y + 40 * x), np.float32(0))
            img = np.where(spine, np.float32(900), img) + np.abs(noise) * np.where(body, 10, 4)
        elif modality == "PT":
            img = np.where(body, 180 + 40 * y, np.float32(0))
            img = img + 2500 * np.exp(-((x - 0.2) ** 2 + (y - 0.1) ** 2) / 0.01)
            img = img + np.abs(noise) * np.where(body, 20, 3)
        else:                                                    # CT and everything else: HU
            img = np.where(body, np.where(lungs, -840 + 30 * y, 35 + 25 * y), np.float32(-1024))
            img = np.where(spine, np.float32(650), img)
            # Noise of 12 HU in air, 20 HU in the body: gzip/xz ratios then match those measured
            # on CT-like data (shared/measured.md: gzip -6 2.4, xz -1 2.8, xz -6 3.2 at 512x512).
            img = img + noise * np.where(body, np.float32(20), np.float32(12))
        return np.clip(np.rint(img), -1024, 3071).astype("<i2")

    def build(self, s: _Series, k: int) -> bytes:
        if s.sample_files:
            return s.sample_files[k]
        fm = FileMetaDataset()
        for kw, vr, value in self.meta_elements(s, k):
            fm.add_new(tag_for_keyword(kw), vr, value)
        ds = Dataset()
        ds.file_meta = fm
        for kw, vr, value in self.series_elements(s) + self.instance_elements(s, k):
            if kw == "PixelData":
                value = self.pixels(s, k).tobytes()
            ds.add_new(tag_for_keyword(kw), vr, value)
        data = dicom_file_bytes(ds)
        if len(data) != s.sizes[k]:      # FileSize must equal what is served: fail loudly
            raise AssertionError(f"size of {s.uid} #{k}: predicted {s.sizes[k]}, wrote {len(data)}")
        return data


def dicom_file_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM file (preamble, DICM, file meta), with pydicom 3 (Python 3.10+)
    and with pydicom 2.4, which is what pip gives Python 3.9."""
    buf = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, write_like_original=False)
    return buf.getvalue()


def _rewrite_sample(path: str, s: _Series, k: int) -> bytes:
    """One of pydicom's sample files, re-labelled to belong to series ``s``; pixel data kept."""
    ds = pydicom.dcmread(path)
    r = s.record
    ds.PatientID = r["PatientID"]
    ds.PatientName = s.patient_name
    ds.StudyInstanceUID = r["StudyInstanceUID"]
    ds.SeriesInstanceUID = r["SeriesInstanceUID"]
    ds.SOPInstanceUID = s.sop_uids[k]
    ds.file_meta.MediaStorageSOPInstanceUID = s.sop_uids[k]
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.SeriesNumber = r["SeriesNumber"]
    ds.StudyID = s.study_id
    ds.SeriesDescription = r["SeriesDescription"]
    ds.StudyDescription = r["StudyDesc"]
    if r.get("StudyDate"):
        ds.StudyDate = _dicom_date(r["StudyDate"])
    if r.get("SeriesDate"):
        ds.SeriesDate = _dicom_date(r["SeriesDate"])
    return dicom_file_bytes(ds)


class _Catalogue:
    """All served metadata. Built once, read-only afterwards (safe to share between threads)."""

    def __init__(self, cfg: FakeConfig):
        self.cfg = cfg
        self.gen = _Generator(cfg.seed, cfg.image_size)
        self.series: dict[str, _Series] = {}
        self.by_collection: dict[str, list[_Series]] = {}
        self._seed = abs(int(cfg.seed)) % 10 ** 9
        self._demo_next = 0
        if cfg.real_collections:
            self._load_real(cfg.data_dir or Path(__file__).resolve().parent.parent / "data")
        if cfg.demo_series > 0:
            self._build_demo()

    # -- registration -------------------------------------------------------------------------
    def _add(self, s: _Series) -> None:
        if not s.sop_uids:
            s.sop_uids = tuple(_uid(self._seed, 4, s.idx, 100000 + k) for k in range(s.n))
        if not s.sizes:
            s.sizes = self.gen.sizes(s)
        s.record["ImageCount"] = s.n
        s.record["FileSize"] = sum(s.sizes)
        s.record = {k: s.record[k] for k in SERIES_COLUMNS if s.record.get(k) is not None}
        self.series[s.uid] = s
        self.by_collection.setdefault(s.collection, []).append(s)

    # -- real metadata --------------------------------------------------------------------------
    def _load_real(self, data_dir: Path) -> None:
        if not Path(data_dir).is_dir():
            raise ValueError(f"data_dir {data_dir} is not a directory")
        for path in sorted(Path(data_dir).glob("*.series.json")):
            for rec in json.loads(path.read_text()):
                rec = dict(rec)
                uid = rec["SeriesInstanceUID"]
                if uid in self.series:
                    continue
                if rec.get("DataDescriptionURI") in ANALYSIS_RESULT_DOIS and \
                        not self.cfg.analysis_results:
                    continue
                rec.setdefault("LicenseURI", _license_uri(rec.get("LicenseName")))
                # A DateReleased spread over 2016-2024, stable per series, for getUpdatedSeries.
                rel = _dt.date(2016, 1, 1) + _dt.timedelta(days=int(_unit("released", uid) * 3000))
                rec.setdefault("DateReleased", _v4_date(rel))
                n = max(1, min(int(rec.get("ImageCount") or 1), self.cfg.instances))
                self._add(_Series(idx=len(self.series), record=rec, patient_name=rec["PatientID"],
                                  study_id="1", n=n, demo=False))

    # -- DEMO -------------------------------------------------------------------------------------
    DEMO_BASE = 1_000_000
    MODALITIES = ("CT", "MR", "CT", "PT", "CT", "MR")
    SERIES_DESC = MappingProxyType({"CT": ("Axial 2.5mm", "CT Chest Abdomen", "Arterial phase"),
                                    "MR": ("T1 AX POST", "T2 FLAIR", "DWI b1000"),
                                    "PT": ("PET AC", "PET NAC", "PET WB")})
    STUDY_DESC = MappingProxyType({"CT": "CT CHEST ABDOMEN PELVIS", "MR": "MR BRAIN WITH AND WITHOUT CONTRAST",
                                   "PT": "PET-CT WHOLE BODY"})
    BODY_PART = MappingProxyType({"CT": "CHEST", "MR": "BRAIN", "PT": "WHOLEBODY"})
    MODEL = MappingProxyType({"CT": "FakeCT 128", "MR": "FakeMR 3T", "PT": "FakePET 1"})

    def _patient(self, p: int) -> dict[str, str]:
        return {"PatientID": f"DEMO-{p + 1:04d}", "PatientName": f"DEMO^{p + 1:04d}",
                "PatientSex": "MF"[p % 2], "PatientAge": f"{40 + p % 45:03d}Y"}

    def _demo_series(self, p: int, study_uid: str, study_date: str | None, study_desc: str,
                     modality: str, desc: str, number: int | None, uid: str | None = None,
                     series_date: str | None = "same", study_id: str = "1") -> _Series:
        # DEMO numbers start at DEMO_BASE so DEMO UIDs and pixels do not depend on whether the
        # real-metadata collections are loaded.
        ordinal = self._demo_next
        self._demo_next += 1
        idx = self.DEMO_BASE + ordinal
        pat = self._patient(p)
        rel = _dt.date(2019, 1, 1) + _dt.timedelta(days=(ordinal * 13) % 1800)
        rec = {
            "SeriesInstanceUID": uid or _uid(self._seed, 2, ordinal + 1),
            "StudyInstanceUID": study_uid,
            "Modality": modality,
            "ProtocolName": f"{modality} protocol",
            "SeriesDate": study_date if series_date == "same" else series_date,
            "SeriesDescription": desc,
            "BodyPartExamined": self.BODY_PART[modality],
            "SeriesNumber": number,
            "Collection": "DEMO",
            "PatientID": pat["PatientID"],
            "PatientSex": pat["PatientSex"],
            "PatientAge": pat["PatientAge"],
            "Manufacturer": "Fake Medical Systems",
            "ManufacturerModelName": self.MODEL[modality],
            "SoftwareVersions": "1.0",
            "LicenseName": "CC BY 4.0",
            "LicenseURI": LICENSE_URLS["CC BY 4.0"],
            "DataDescriptionURI": "https://doi.org/10.0000/fake-nbia-demo",
            "DateReleased": _v4_date(rel),
            "StudyDesc": study_desc,
            "StudyDate": study_date,
        }
        return _Series(idx=idx, record=rec, patient_name=pat["PatientName"], study_id=study_id,
                       n=self.cfg.instances, demo=True,
                       extra={"PatientSex": pat["PatientSex"], "PatientAge": pat["PatientAge"]})

    def _build_demo(self) -> None:
        cfg = self.cfg
        P = cfg.demo_patients
        seed = self._seed
        # Even-numbered patients get two studies (when there are enough series): multi-study
        # patients are what breaks naive per-patient layouts.
        n_studies = [2 if (p % 2 == 0 and cfg.demo_series > P) else 1 for p in range(P)]
        numbers: collections.Counter[tuple[int, int]] = collections.Counter()
        first_modality: dict[tuple[int, int], str] = {}
        for i in range(cfg.demo_series):
            p, j = i % P, i // P
            st = j % n_studies[p]
            modality = self.MODALITIES[i % len(self.MODALITIES)]
            first_modality.setdefault((p, st), modality)
            numbers[(p, st)] += 1
            study_date = _v4_date(_dt.date(2015, 1, 5) + _dt.timedelta(days=37 * p + 200 * st))
            desc = self.SERIES_DESC[modality][j % 3]
            s = self._demo_series(p, _uid(seed, 1, p + 1, st + 1), study_date,
                                  self.STUDY_DESC[first_modality[(p, st)]], modality, desc,
                                  numbers[(p, st)] + (100 if modality == "PT" else 0))
            if i == 1:
                self._make_sample_series(s)
            else:
                self._add(s)
        if "hostile_names" in cfg.nasty:
            self._nasty_hostile()
        if "duplicate_series_numbers" in cfg.nasty:
            self._nasty_duplicates()
        if "missing_dates" in cfg.nasty:
            self._nasty_missing_dates()

    def _make_sample_series(self, s: _Series) -> None:
        """DEMO series #2 carries pydicom's real sample files (CT_small.dcm, MR_small.dcm)."""
        s.record.update(Modality="CT", ProtocolName="CT protocol", SeriesDescription="pydicom sample files",
                        ManufacturerModelName="pydicom test data", BodyPartExamined=None)
        names = ("CT_small.dcm", "MR_small.dcm")
        s.n = len(names)
        s.sop_uids = tuple(_uid(self._seed, 4, s.idx, 100000 + k) for k in range(s.n))
        s.sample_files = tuple(_rewrite_sample(pydicom.data.get_testdata_file(nm), s, k)
                               for k, nm in enumerate(names))
        s.sizes = tuple(len(b) for b in s.sample_files)
        self._add(s)

    def _p(self, p: int) -> int:
        return min(p, self.cfg.demo_patients - 1)

    def _nasty_hostile(self) -> None:
        p, seed = self._p(0), self._seed
        study = _uid(seed, 8, 1)
        for j, desc in enumerate(HOSTILE_SERIES_DESCRIPTIONS):
            self._add(self._demo_series(p, study, "03-03-2021", HOSTILE_STUDY_DESC, "CT", desc, 20 + j))

    def _nasty_duplicates(self) -> None:
        seed = self._seed
        # Three series with one SeriesNumber and description; the first two UIDs share their
        # last 5 characters, so <SeriesNumber>-<desc>-<last5> folder names collide.
        p = self._p(0)
        study = _uid(seed, 5, 0, 1)
        for j, uid in enumerate((_uid(seed, 5, 1, 90001), _uid(seed, 5, 2, 90001), _uid(seed, 5, 3, 90002))):
            self._add(self._demo_series(p, study, "04-04-2022", "Repeat study", "CT", "Repeat scan", 3, uid=uid))
        # Two studies of one patient, StudyInstanceUIDs sharing their last 5 characters, same
        # date, description and StudyID: the study folders collide.
        p = self._p(1)
        for j, study in enumerate((_uid(seed, 6, 1, 80001), _uid(seed, 6, 2, 80001))):
            self._add(self._demo_series(p, study, "05-05-2022", "Twin study", "MR", "Twin series", 1,
                                        uid=_uid(seed, 7, j + 1, 1)))

    def _nasty_missing_dates(self) -> None:
        seed = self._seed
        p = self._p(2)
        undated = _uid(seed, 9, 1)
        for j in range(2):
            self._add(self._demo_series(p, undated, None, "Undated study", "CT", f"Undated {j + 1}", j + 1))
        self._add(self._demo_series(p, _uid(seed, 9, 2), "06-06-2023", "Dated study", "CT",
                                    "No series date", 1, series_date=None))

    # -- queries ------------------------------------------------------------------------------------
    def collections(self) -> list[str]:
        return sorted(self.by_collection)

    def all_series(self) -> Iterable[_Series]:
        return [s for c in self.collections() for s in self.by_collection[c]]


# ---------------------------------------------------------------------------------------------
# Counters, tokens, caches
# ---------------------------------------------------------------------------------------------

class Counters:
    """Thread-safe counters that tests read: complete zips per series, requests per endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._complete: collections.Counter[str] = collections.Counter()
        self._requests: collections.Counter[str] = collections.Counter()

    def add_complete(self, series_uid: str, delta: int = 1) -> None:
        with self._lock:
            self._complete[series_uid] += delta
            if self._complete[series_uid] <= 0:
                del self._complete[series_uid]

    def add_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[f"{endpoint} {status}"] += 1

    def complete_downloads(self, series_uid: str) -> int:
        with self._lock:
            return self._complete.get(series_uid, 0)

    def requests(self, endpoint: str, status: int | None = None) -> int:
        with self._lock:
            if status is not None:
                return self._requests.get(f"{endpoint} {status}", 0)
            return sum(n for key, n in self._requests.items() if key.rsplit(" ", 1)[0] == endpoint)

    def snapshot(self) -> dict:
        with self._lock:
            return {"complete_downloads": dict(self._complete), "requests": dict(self._requests)}

    def reset(self) -> None:
        with self._lock:
            self._complete.clear()
            self._requests.clear()


class _Tokens:
    """Keycloak-like access and refresh tokens with lifetimes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._access: dict[str, tuple[str, float]] = {}    # token -> (user, expiry monotonic)
        self._refresh: dict[str, tuple[str, float]] = {}

    def issue(self, user: str, lifetime: float, refresh_lifetime: float) -> dict:
        now = time.monotonic()
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            self._access[access] = (user, now + lifetime)
            self._refresh[refresh] = (user, now + refresh_lifetime)
        def seconds(x: float) -> float | int:
            # Keycloak sends whole seconds; a fractional test lifetime is sent as is.
            return int(x) if float(x).is_integer() else x
        return {"access_token": access, "expires_in": seconds(lifetime),
                "refresh_expires_in": seconds(refresh_lifetime), "refresh_token": refresh,
                "token_type": "Bearer", "not-before-policy": 0,
                "session_state": secrets.token_hex(16), "scope": "openid email profile"}

    def valid(self, access: str) -> bool:
        with self._lock:
            entry = self._access.get(access)
        return entry is not None and time.monotonic() < entry[1]

    def refresh_user(self, refresh: str) -> str | None:
        with self._lock:
            entry = self._refresh.get(refresh)
        return entry[0] if entry is not None and time.monotonic() < entry[1] else None

    def expire_all(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._access = {t: (u, min(e, now)) for t, (u, e) in self._access.items()}


class _InstanceCache:
    """A bounded LRU of generated DICOM files plus a permanent (small) map of their MD5s."""

    def __init__(self, limit: int = CACHE_BYTES):
        self._lock = threading.Lock()
        self._data: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._bytes = 0
        self._limit = limit
        self._md5: dict[tuple[str, int], str] = {}

    def get(self, key: tuple[str, int], make: Callable[[], bytes]) -> bytes:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
                return data
        data = make()                     # outside the lock: two threads may build it twice
        with self._lock:
            self._md5[key] = _md5(data)
            if key not in self._data and len(data) <= self._limit:
                self._data[key] = data
                self._bytes += len(data)
                while self._bytes > self._limit:
                    _, old = self._data.popitem(last=False)
                    self._bytes -= len(old)
        return data

    def md5(self, key: tuple[str, int], make: Callable[[], bytes]) -> str:
        with self._lock:
            h = self._md5.get(key)
        if h is None:
            self.get(key, make)
            with self._lock:
                h = self._md5[key]
        return h


class _TokenBucket:
    """A bandwidth cap. Consumers take bytes at once and sleep off the debt, so concurrent
    users of one bucket share its rate; the sleep is interruptible by the server's stop event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens = 0.0
        self._stamp = time.monotonic()

    def take(self, n: int, rate: float | None, stop: threading.Event) -> None:
        if not rate or rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            burst = max(rate * 0.05, float(SEND_PIECE))
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            stop.wait(debt / rate)


# ---------------------------------------------------------------------------------------------
# Zip streaming
# ---------------------------------------------------------------------------------------------

class _Abort(Exception):
    """Raised inside the zip writer to break off a response for a reset or stall fault."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class _ChunkedWire:
    """A write-only, unseekable file object that sends what zipfile writes as HTTP chunks.

    zipfile sees no tell()/seek() and therefore writes data descriptors, just as Java's
    ZipOutputStream does on a servlet stream. ``cut`` makes it break off after that many body
    bytes (mid-chunk) by raising _Abort; ``discard`` drops everything written afterwards (used
    to leave out the central directory)."""

    def __init__(self, send: Callable[[bytes], None]):
        self._send = send
        self._buf = bytearray()
        self.sent = 0                     # zip bytes handed to the socket
        self.cut: int | None = None
        self.cut_kind = ""
        self.discard = False
        self.broken = False               # after an abort, zipfile's clean-up writes go nowhere

    def write(self, data: bytes) -> int:
        if self.broken or self.discard:
            return len(data)
        self._buf += data
        if self.cut is not None and self.sent + len(self._buf) >= self.cut:
            self._emit(bytes(self._buf))                       # raises _Abort
        while len(self._buf) >= CHUNK:
            self._emit(bytes(self._buf[:CHUNK]))
            del self._buf[:CHUNK]
        return len(data)

    def flush(self) -> None:
        pass

    def _emit(self, piece: bytes) -> None:
        if self.cut is not None and self.sent + len(piece) >= self.cut:
            keep = max(1, self.cut - self.sent)
            self.broken = True
            self._send(b"%x\r\n" % len(piece) + piece[:keep])   # announced, not delivered in full
            self.sent += keep
            raise _Abort(self.cut_kind)
        self._send(b"%x\r\n" % len(piece) + piece + b"\r\n")
        self.sent += len(piece)

    def trip(self) -> None:
        """Break off now (for a zip shorter than the planned cut), delivering part of the buffer."""
        if self.cut is None:
            return
        if not self._buf:
            self.broken = True
            raise _Abort(self.cut_kind)
        self.cut = min(self.cut, self.sent + max(1, len(self._buf) // 2))
        self._emit(bytes(self._buf))

    def drain(self) -> None:
        if self._buf and not self.broken:
            self._emit(bytes(self._buf))
            self._buf.clear()


class _MemoryWire:
    """An unseekable in-memory zip sink (no tell(): data descriptors, as on the wire), for the
    PATCHED_KINDS faults, whose header bytes are altered after zipfile has written them."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        pass


def _patch_entry(data: bytearray, name: str, flag_bits: int = 0, method: int | None = None) -> None:
    """OR ``flag_bits`` into one member's general-purpose flags and/or set its compression
    method, in its local header and its central directory record alike (in both the method
    field directly follows the flags), so every reader sees the same lie."""
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        offsets = [zf.getinfo(name).header_offset + 6]        # local header: flags at +6
        pos = zf.start_dir
    target = name.encode("utf-8")
    while data[pos:pos + 4] == b"PK\x01\x02":                 # central records: flags at +8
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46:pos + 46 + n] == target:
            offsets.append(pos + 8)
        pos += 46 + n + m + k
    for at in offsets:
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | flag_bits)
        if method is not None:
            struct.pack_into("<H", data, at + 2, method)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

class FakeNbia:
    """The fake service. ``start()`` serves on 127.0.0.1 in a daemon thread until ``stop()``."""

    def __init__(self, config: FakeConfig | None = None, **overrides: Any):
        cfg = dataclasses.replace(config, **overrides) if config is not None else FakeConfig(**overrides)
        self.config: FakeConfig = _normalised(cfg)
        self.counters = Counters()
        self._catalogue = _Catalogue(self.config)
        self._cache = _InstanceCache()
        self._tokens = _Tokens()
        self._lock = threading.Lock()
        self._request_no: collections.Counter[str] = collections.Counter()
        self._scripted: dict[str, collections.deque[str]] = {}
        self._overrides: dict[str, tuple[int, bytes, tuple[tuple[str, str], ...]]] = {}
        self._stop = threading.Event()
        self._total_bucket = _TokenBucket()
        self._connections: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.token_url = ""

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, port: int = 0, host: str = "127.0.0.1") -> "FakeNbia":
        if self._httpd is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        self._httpd = _Server((host, port), _Handler, self)
        real_port = self._httpd.server_address[1]
        base = f"http://{host}:{real_port}"
        self.url = base + API_PREFIX
        self.token_url = base + TOKEN_PATH
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-nbia-{real_port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: interrupts stalls, delays and shaping sleeps, closes open connections."""
        self._stop.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeNbia":
        if self._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test helpers --------------------------------------------------------------------------
    def script_faults(self, series_uid: str, kinds: list[str]) -> None:
        """The next image requests of this series get these faults in order, then normal service.

        Besides FAULT_KINDS and "not_granted", the HOSTILE_KINDS of a malicious or broken server
        (on getImage and getImageWithMD5Hash alike; sizes and rates come from config.faults):
        trickle = the real zip, its body at trickle_rate bytes/s after the first TRICKLE_FREE
        bytes; endless = 200, chunked, one 64 KiB random block repeated until the client hangs
        up or stop() (never a complete download); huge_license = a LICENSE entry (even without
        one normally) of huge_entry_bytes bytes of a repeated sentence; huge_md5_table =
        md5hashes.csv (even without one normally) followed by huge_entry_bytes of filler rows;
        huge_dicom = an extra <name>.dcm: instance 0's bytes padded with zeros to
        huge_entry_bytes, listed in md5hashes.csv with its true MD5; encrypted_entry = one DICOM
        entry with the encrypted flag bit (bit 0) set; unsupported_method = one DICOM entry with
        compression method 99 (AES); retry_after_date = 429 with an HTTP-date Retry-After
        retry_after seconds ahead; control_names = an extra entry CONTROL_NAME (ANSI escapes,
        BEL), not listed in md5hashes.csv. Huge entries are streamed, as zip64 entries."""
        bad = [k for k in kinds if k not in FAULT_KINDS + SCRIPTED_ONLY_KINDS]
        if bad:
            raise ValueError(f"unknown fault kinds {bad}; choose from "
                             f"{FAULT_KINDS + SCRIPTED_ONLY_KINDS}")
        with self._lock:
            self._scripted.setdefault(series_uid, collections.deque()).extend(kinds)

    def override_metadata(self, endpoint: str, status: int, body: bytes,
                          headers: Sequence[tuple[str, str]] = ()) -> None:
        """From now on ``endpoint`` (a v4 endpoint name) answers exactly this, whatever the request:
        status, body, these headers, and a Content-Length unless ``headers`` has one. Counted."""
        if endpoint not in GET_PARAMS and endpoint not in POST_ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}")
        with self._lock:
            self._overrides[endpoint] = (int(status), bytes(body), tuple(headers))

    def clear_overrides(self) -> None:
        with self._lock:
            self._overrides.clear()

    def collections(self) -> list[str]:
        return self._catalogue.collections()

    def series(self, collection: str) -> list[dict]:
        return [dict(s.record) for s in self._catalogue.by_collection.get(collection, [])]

    def instances(self, series_uid: str) -> list[tuple[str, bytes]]:
        s = self._catalogue.series[series_uid]
        return [(s.new_file_name(k), self._instance(s, k)) for k in range(s.n)]

    def expire_tokens(self) -> None:
        self._tokens.expire_all()

    # -- internals used by the handler ---------------------------------------------------------
    def _instance(self, s: _Series, k: int) -> bytes:
        return self._cache.get((s.uid, k), lambda: self._catalogue.gen.build(s, k))

    def _instance_md5(self, s: _Series, k: int) -> str:
        return self._cache.md5((s.uid, k), lambda: self._catalogue.gen.build(s, k))

    def _next_fault(self, uid: str) -> tuple[str | None, bytes]:
        """This request's fault: scripted first, else one deterministic draw per request."""
        with self._lock:
            self._request_no[uid] += 1
            n = self._request_no[uid]
            queue = self._scripted.get(uid)
            kind = queue.popleft() if queue else None
        h = _digest(self.config.seed, uid, n)
        if kind is None:
            f = self.config.faults
            u = int.from_bytes(h[:8], "big") / 2.0 ** 64
            acc = 0.0
            for name, p in (("500", f.p500), ("429", f.p429), ("reset", f.reset), ("stall", f.stall),
                            ("corrupt", f.corrupt), ("truncate", f.truncate), ("bad_md5_row", f.bad_md5_row)):
                acc += max(0.0, p)
                if u < acc:
                    kind = name
                    break
        return kind, h

    def _override(self, endpoint: str) -> tuple[int, bytes, tuple[tuple[str, str], ...]] | None:
        with self._lock:
            return self._overrides.get(endpoint)

    def _md5_of_series(self, s: _Series) -> str:
        return _md5("".join(sorted(self._instance_md5(s, k) for k in range(s.n))).encode())


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type, fake: FakeNbia):
        self.fake = fake
        super().__init__(address, handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        with self.fake._lock:
            self.fake._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self.fake._lock:
            self.fake._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-response are normal here; anything else is worth a trace.
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            super().handle_error(request, client_address)


def _format_rows(rows: list[dict], columns: Sequence[str], fmt: str | None) -> tuple[bytes, str] | None:
    """NBIA's formatResponse: json (nulls left out), csv (every field quoted), xml, html.
    Returns None for an unknown format (the service answers 500 then)."""
    fmt = (fmt or "json").lower()
    if fmt == "json":
        body = [{c: r[c] for c in columns if r.get(c) is not None} for r in rows]
        return json.dumps(body, ensure_ascii=False).encode(), "application/json"
    if fmt == "csv":
        # Multi-column answers are quoted (toCsvQuoted); single-column lists are not (toCsv).
        def q(v: Any) -> str:
            text = "" if v is None else str(v)
            return text if len(columns) == 1 else '"' + text.replace('"', '""') + '"'
        lines = [",".join(q(c) for c in columns)] + [",".join(q(r.get(c)) for c in columns) for r in rows]
        return ("\n".join(lines) + "\n").encode(), "text/csv"
    if fmt == "xml":
        out = ['<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Results>']
        for r in rows:
            out.append("<Row>")
            for c in columns:
                v = r.get(c)
                if v is not None:
                    t = "java.lang.Integer" if isinstance(v, int) else "java.lang.String"
                    out.append(f"<{c} type='{t}'>{html.escape(str(v))}</{c}>")
            out.append("</Row>")
        out.append("</Results>")
        return "".join(out).encode(), "application/xml"
    if fmt == "html":
        out = ["<P ALIGN='center'><TABLE BORDER=1><TR>", *(f"<TH>{c}</TH>" for c in columns), "</TR>"]
        for r in rows:
            out.append("<TR>")
            out.extend("<TD>&nbsp;</TD>" if r.get(c) is None else f"<TD>{html.escape(str(r[c]))}</TD>"
                       for c in columns)
            out.append("</TR>")
        out.append("</TABLE></P>")
        return "".join(out).encode(), "text/html"
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive and chunked transfer encoding
    server_version = "Apache"
    server: _Server

    def version_string(self) -> str:
        return self.server_version

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    # -- plumbing ---------------------------------------------------------------------------------
    @property
    def fake(self) -> FakeNbia:
        return self.server.fake

    def log_message(self, format: str, *args: Any) -> None:
        if self.fake.config.verbose:
            super().log_message(format, *args)

    def setup(self) -> None:
        super().setup()
        self._conn_bucket = _TokenBucket()
        self._shaped = False
        self._trickle_rate: float | None = None    # bytes/s of this response's body, if trickled
        self._trickle_free = 0                     # body bytes still to send at full speed

    def _count(self, endpoint: str, status: int) -> None:
        if endpoint:
            self.fake.counters.add_request(endpoint, status)

    def _reply(self, endpoint: str, status: int, body: bytes = b"", ctype: str | None = None,
               headers: Iterable[tuple[str, str]] = ()) -> None:
        self._count(endpoint, status)
        self.send_response(status)
        if ctype and body:
            self.send_header("Content-Type", ctype)
        headers = list(headers)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):   # an override may lie
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body)

    def _write(self, data: bytes) -> None:
        """Send bytes, shaped by the per-connection and total bandwidth caps for image responses."""
        if not data:
            return
        if self._trickle_rate:
            self._trickle(data, self._trickle_rate)
            return
        cfg = self.fake.config
        if not self._shaped or (not cfg.conn_bandwidth and not cfg.total_bandwidth):
            self.wfile.write(data)
            return
        for i in range(0, len(data), SEND_PIECE):
            piece = data[i:i + SEND_PIECE]
            if self.fake._stop.is_set():
                raise ConnectionAbortedError("server stopping")
            self._conn_bucket.take(len(piece), cfg.conn_bandwidth, self.fake._stop)
            self.fake._total_bucket.take(len(piece), cfg.total_bandwidth, self.fake._stop)
            self.wfile.write(piece)

    def _trickle(self, data: bytes, rate: float) -> None:
        """Send the first _trickle_free bytes at once, the rest at ``rate`` bytes/s in about 20
        pieces a second. Waiting on the stop event lets stop() end it at once."""
        free = min(len(data), self._trickle_free)
        self._trickle_free -= free
        if free:
            self.wfile.write(data[:free])
        step = max(1, int(rate / 20))
        for i in range(free, len(data), step):
            if self.fake._stop.wait(step / rate):
                raise ConnectionAbortedError("server stopping")
            self.wfile.write(data[i:i + step])

    def _read_form(self) -> dict[str, list[str]]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        return urllib.parse.parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)

    # -- dispatch ---------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._shaped = False
        self._responded = False
        self._trickle_rate, self._trickle_free = None, 0
        parsed = urllib.parse.urlsplit(self.path)
        path = parsed.path
        query = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)
        form = self._read_form() if method == "POST" else {}
        try:
            if path.startswith(API_PREFIX):
                self._v4(method, path[len(API_PREFIX):], query, form)
            elif path == TOKEN_PATH:
                self._token(method, form)
            elif path == "/_fake/counters" and method == "GET":     # test hooks: not counted
                self._reply("", 200, json.dumps(self.fake.counters.snapshot()).encode(), "application/json")
            elif path == "/_fake/expire_tokens" and method == "POST":
                self.fake.expire_tokens()
                self._reply("", 204)
            else:
                self._reply(path.rsplit("/", 1)[-1] or "/", 404, b"Not Found", "text/plain")
        except _Abort:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:                                       # a bug in the fake: say so loudly
            traceback.print_exc()
            self.close_connection = True
            if not self._responded:
                self._reply("", 500, BODY_500, "text/plain")

    def _auth_ok(self) -> bool:
        header = self.headers.get("Authorization")
        if header is None:
            return not self.fake.config.require_token       # no header: the guest user
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and self.fake._tokens.valid(token.strip())

    def _v4(self, method: str, name: str, query: list[tuple[str, str]], form: dict[str, list[str]]) -> None:
        cfg = self.fake.config
        if cfg.metadata_hang and name not in BULK_ENDPOINTS:
            if cfg.metadata_hang == "silent":
                self.fake._stop.wait()                        # request read, never an answer
                self.close_connection = True
                return
            self._trickle_rate = METADATA_TRICKLE_RATE        # the real answer, byte by byte
        if name not in GET_PARAMS and name not in POST_ENDPOINTS:
            self._reply(name, 404, b"Not Found", "text/plain")
            return
        override = self.fake._override(name)
        if override is not None:
            status, body, headers = override
            self._reply(name, status, body, None, headers)
            return
        if not self._auth_ok():
            self._reply(name, 401)                            # the live service: empty body
            return
        if (method == "GET") != (name in GET_PARAMS):
            self._reply(name, 405, b"Method Not Allowed", "text/plain")
            return
        allowed = GET_PARAMS.get(name) or POST_ENDPOINTS[name]
        if name == "getImage" and cfg.include_md5 == "refuse":
            allowed = tuple(p for p in allowed if p != "IncludeMD5")   # builds before 2025-11
        for key, _ in query:
            if key not in allowed:
                msg = f"Invalid query parameter: '{key}'. Allowed parameters are: [{', '.join(allowed)}]"
                self._reply(name, 400, msg.encode(), "text/plain")
                return
        params: dict[str, str] = {}
        for key, value in query:
            params.setdefault(key, value)
        getattr(self, "_ep_" + name)(params, form)

    # -- metadata endpoints ---------------------------------------------------------------------------
    def _rows(self, name: str, rows: list[dict], columns: Sequence[str], fmt: str | None) -> None:
        if not rows:
            self._reply(name, 200)                            # empty result: 200, empty body
            return
        out = _format_rows(rows, columns, fmt)
        if out is None:
            self._reply(name, 500, b"Server was not able to process your request", "text/plain")
            return
        self._reply(name, 200, out[0], out[1])

    def _ep_getCollectionValues(self, q: dict[str, str], form: dict) -> None:
        rows = [{"Collection": c} for c in self.fake.collections()]
        self._rows("getCollectionValues", rows, ("Collection",), q.get("format"))

    def _series_of(self, collection: str | None) -> Iterable[_Series]:
        cat = self.fake._catalogue
        if collection is None:
            return cat.all_series()
        return cat.by_collection.get(collection, [])

    def _ep_getPatient(self, q: dict[str, str], form: dict) -> None:
        seen: dict[tuple[str, str], dict] = {}
        for s in self._series_of(q.get("Collection")):
            r = s.record
            if "PatientId" in q and r["PatientID"] != q["PatientId"]:
                continue
            seen.setdefault((r["Collection"], r["PatientID"]), {
                "PatientId": r["PatientID"], "PatientName": s.patient_name,
                "PatientSex": s.extra.get("PatientSex"), "Collection": r["Collection"],
                "Phantom": "NO", "SpeciesCode": "337915000", "SpeciesDescription": "Homo sapiens"})
        self._rows("getPatient", list(seen.values()), PATIENT_COLUMNS, q.get("format"))

    def _ep_getPatientStudy(self, q: dict[str, str], form: dict) -> None:
        studies: dict[str, dict] = {}
        for s in self._series_of(q.get("Collection")):
            r = s.record
            if "PatientID" in q and r["PatientID"] != q["PatientID"]:
                continue
            if "StudyInstanceUID" in q and r["StudyInstanceUID"] != q["StudyInstanceUID"]:
                continue
            row = studies.setdefault(r["StudyInstanceUID"], {
                "StudyInstanceUID": r["StudyInstanceUID"], "StudyDate": r.get("StudyDate"),
                "StudyDescription": r.get("StudyDesc"), "StudyID": s.study_id,
                "PatientAge": s.extra.get("PatientAge"), "PatientID": r["PatientID"],
                "PatientName": s.patient_name, "PatientSex": s.extra.get("PatientSex"),
                "Collection": r["Collection"], "SeriesCount": 0})
            row["SeriesCount"] += 1
        self._rows("getPatientStudy", list(studies.values()), STUDY_COLUMNS, q.get("format"))

    def _ep_getSeries(self, q: dict[str, str], form: dict) -> None:
        filters = [(k, v) for k, v in q.items() if k not in ("format", "Collection")]
        rows = [s.record for s in self._series_of(q.get("Collection"))
                if all(str(s.record.get(k)) == v for k, v in filters)]
        hook = self.fake.config.series_rows_hook
        if hook is not None and (q.get("format") or "json").lower() == "json":
            served = hook([dict(r) for r in rows])            # copies: the hook may mutate them
            if isinstance(served, list) and not served:
                self._reply("getSeries", 200)                 # empty result: 200, empty body
            else:
                self._reply("getSeries", 200, json.dumps(served, ensure_ascii=False).encode(),
                            "application/json")
            return
        self._rows("getSeries", rows, SERIES_COLUMNS, q.get("format"))

    def _ep_getUpdatedSeries(self, q: dict[str, str], form: dict) -> None:
        if "fromDate" not in q:
            self._reply("getUpdatedSeries", 400, b"A parameter, fromDate, is required for this API call.",
                        "application/json")
            return
        try:
            since = _parse_v4_date(q["fromDate"])
        except ValueError:
            self._reply("getUpdatedSeries", 400, b"fromDate must be MM-DD-YYYY", "text/plain")
            return
        rows = [s.record for s in self.fake._catalogue.all_series()
                if _parse_v4_date(s.record["DateReleased"]) >= since]
        self._rows("getUpdatedSeries", rows, SERIES_COLUMNS, q.get("format"))

    def _known_series(self, name: str, q: dict[str, str]) -> _Series | None:
        """The series named by SeriesInstanceUID, or None after answering the 400s."""
        uid = q.get("SeriesInstanceUID")
        if uid is None:
            self._reply(name, 400, MISSING_UID.encode(), "application/json")
            return None
        s = self.fake._catalogue.series.get(uid)
        if s is None:
            self._reply(name, 400, NOT_GRANTED.format(uid=uid).encode(), "application/json")
        return s

    def _ep_getSeriesSize(self, q: dict[str, str], form: dict) -> None:
        uid = q.get("SeriesInstanceUID")
        if uid is None:
            self._reply("getSeriesSize", 400, MISSING_UID.encode(), "application/json")
            return
        s = self.fake._catalogue.series.get(uid)
        rows = [] if s is None else [{"TotalSizeInBytes": s.record["FileSize"], "ObjectCount": s.n}]
        self._rows("getSeriesSize", rows, ("TotalSizeInBytes", "ObjectCount"), q.get("format"))

    def _ep_getSOPInstanceUIDs(self, q: dict[str, str], form: dict) -> None:
        uid = q.get("SeriesInstanceUID")
        if uid is None:
            self._reply("getSOPInstanceUIDs", 400, MISSING_UID.encode(), "application/json")
            return
        s = self.fake._catalogue.series.get(uid)
        rows = [] if s is None else [{"SOPInstanceUID": u} for u in s.sop_uids]
        self._rows("getSOPInstanceUIDs", rows, ("SOPInstanceUID",), q.get("format"))

    def _ep_getSeriesMetadata(self, q: dict[str, str], form: dict[str, list[str]]) -> None:
        uids = [u.strip() for v in form.get("list", []) for u in v.split(",") if u.strip()]
        if not uids:
            self._reply("getSeriesMetadata", 400,
                        b"A form parameter, list, containing at least one SeriesInstanceUID is required.",
                        "application/json")
            return
        cat = self.fake._catalogue
        compact = self.fake.config.metadata_headers == "compact"
        rows = []
        for uid in uids:
            s = cat.series.get(uid)
            if s is None:
                continue                                      # unknown UIDs silently dropped
            spacing, thickness, _, _ = _Generator.GEOMETRY.get(s.record.get("Modality", ""),
                                                               _Generator.GEOMETRY["CT"])
            src = {**s.record, "PatientName": s.patient_name, "StudyID": s.study_id, **s.extra,
                   "Phantom": "NO", "SpeciesCode": "337915000", "SpeciesDescription": "Homo sapiens",
                   "PixelSpacing": spacing, "SliceThickness": thickness}
            rows.append({(key if compact else col): src.get(key) for col, key in METADATA_COLUMNS})
        columns = [key if compact else col for col, key in METADATA_COLUMNS]
        fmt = q.get("format") or (form.get("format") or ["csv"])[0]
        self._rows("getSeriesMetadata", rows, columns, "json" if fmt.lower() == "json" else "csv")

    def _ep_getMD5Hierarchy(self, q: dict[str, str], form: dict[str, list[str]]) -> None:
        fake, cat = self.fake, self.fake._catalogue
        if fake.config.md5_hierarchy == "empty":
            self._reply("getMD5Hierarchy", 200)
            return
        levels = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection")
        given = [(k, form[k][0]) for k in levels if form.get(k)]
        if not given:
            self._reply("getMD5Hierarchy", 400,
                        b"One of SeriesInstanceUID, StudyInstanceUID, PatientID or Collection is required.",
                        "text/plain")
            return
        key, value = given[0]
        members = [s for s in cat.all_series() if s.record.get(key) == value]
        if not members:
            self._reply("getMD5Hierarchy", 200)
            return
        # A series hashes its sorted image hashes; each level up hashes its sorted children.
        def combine(hashes: Iterable[str]) -> str:
            return _md5("".join(sorted(hashes)).encode())
        studies: dict[str, list[str]] = collections.defaultdict(list)
        for s in members:
            studies[s.record["StudyInstanceUID"]].append(fake._md5_of_series(s))
        if key == "SeriesInstanceUID" and fake.config.md5_hierarchy == "other":
            result = _md5(",".join(fake._instance_md5(members[0], k) for k in range(members[0].n)).encode())
        elif key == "SeriesInstanceUID":
            result = next(iter(studies.values()))[0]
        else:
            study_hash = {st: combine(h) for st, h in studies.items()}
            if key == "StudyInstanceUID":
                result = study_hash[value]
            else:
                patients: dict[str, set[str]] = collections.defaultdict(set)
                for s in members:
                    patients[s.record["PatientID"]].add(s.record["StudyInstanceUID"])
                patient_hash = {p: combine(study_hash[st] for st in sts) for p, sts in patients.items()}
                result = patient_hash[value] if key == "PatientID" else combine(patient_hash.values())
        self._reply("getMD5Hierarchy", 200, result.encode(), "text/plain")

    # -- image endpoints ----------------------------------------------------------------------------
    def _ep_getSingleImage(self, q: dict[str, str], form: dict) -> None:
        s = self._known_series("getSingleImage", q)
        if s is None:
            return
        sop = q.get("SOPInstanceUID")
        if sop not in s.sop_uids:
            self._reply("getSingleImage", 200)
            return
        self._shaped = True
        if self.fake.config.first_byte_delay > 0:
            self.fake._stop.wait(self.fake.config.first_byte_delay)
        data = self.fake._instance(s, s.sop_uids.index(sop))
        self._reply("getSingleImage", 200, data, "application/dicom",
                    [("Content-Disposition", f'attachment; filename="{sop}.dcm"')])

    def _ep_getImage(self, q: dict[str, str], form: dict) -> None:
        s = self._known_series("getImage", q)
        if s is None:
            return
        mode = self.fake.config.include_md5
        md5 = mode == "honour" and q.get("IncludeMD5", "").lower() == "yes"
        new_names = q.get("NewFileNames", "").lower() == "yes"
        self._zip("getImage", s, license=True, new_names=new_names, md5=md5)

    def _ep_getImageWithMD5Hash(self, q: dict[str, str], form: dict) -> None:
        s = self._known_series("getImageWithMD5Hash", q)
        if s is None:
            return
        self._zip("getImageWithMD5Hash", s, license=False, new_names=False, md5=True)

    def _zip(self, endpoint: str, s: _Series, *, license: bool, new_names: bool, md5: bool) -> None:
        fake, cfg = self.fake, self.fake.config
        self._shaped = True
        fault, h = fake._next_fault(s.uid)
        if cfg.first_byte_delay > 0:
            fake._stop.wait(cfg.first_byte_delay)
        if fake._stop.is_set():
            raise ConnectionAbortedError("server stopping")
        if fault == "not_granted":
            self._reply(endpoint, 400, NOT_GRANTED.format(uid=s.uid).encode(), "application/json")
            return
        if fault == "500":
            self._reply(endpoint, 500, BODY_500, "text/plain")
            return
        if fault in ("429", "retry_after_date"):
            ra = cfg.faults.retry_after
            ra_text = str(int(ra)) if float(ra).is_integer() else f"{ra:g}"
            if fault == "retry_after_date":                    # the other form RFC 9110 allows
                ra_text = email.utils.formatdate(time.time() + ra, usegmt=True)
            self._reply(endpoint, 429, b"", None, [("Retry-After", ra_text)])
            return

        self._count(endpoint, 200)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Disposition", f'attachment; filename="{s.uid}.zip"')
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if fault == "endless":
            self._endless(h)
        if fault == "trickle":
            self._trickle_rate, self._trickle_free = cfg.faults.trickle_rate, TRICKLE_FREE

        wire = _ChunkedWire(self._write)
        if fault in ("reset", "stall"):
            estimate = sum(s.sizes) // (3 if cfg.zip_deflate else 1)
            wire.cut = 1 + int((0.2 + 0.5 * h[8] / 255) * max(estimate, 2))
            wire.cut_kind = fault
        try:
            if fault in PATCHED_KINDS:
                self._write_patched_zip(wire, s, fault, h, license=license, new_names=new_names, md5=md5)
            else:
                self._write_zip(wire, s, fault, h, license=license, new_names=new_names, md5=md5)
        except _Abort as abort:
            self._break_off(abort.kind, cfg.faults.stall_seconds)
            raise
        if fault == "truncate":
            self._write(b"0\r\n\r\n")                          # a clean HTTP end, a broken zip
            return
        fake.counters.add_complete(s.uid)                      # counted before the last bytes so a
        try:                                                   # client that has read them sees it
            self._write(b"0\r\n\r\n")
        except OSError:
            fake.counters.add_complete(s.uid, -1)
            raise

    def _endless(self, h: bytes) -> NoReturn:
        """An "endless" body: one random-looking block as chunk after chunk. It ends only by the
        client hanging up or stop(), both raising, so it is never counted as complete."""
        block = random.Random(h).randbytes(ENDLESS_BLOCK)
        chunk = b"%x\r\n" % len(block) + block + b"\r\n"
        while not self.fake._stop.is_set():
            self._write(chunk)
        raise ConnectionAbortedError("server stopping")

    def _write_patched_zip(self, wire: _ChunkedWire, s: _Series, fault: str, h: bytes, *,
                           license: bool, new_names: bool, md5: bool) -> None:
        """PATCHED_KINDS: the zip is built in memory (test series are small), then one DICOM
        entry is marked encrypted or given method 99, and the result goes out as usual."""
        mem = _MemoryWire()
        self._write_zip(mem, s, fault, h, license=license, new_names=new_names, md5=md5)
        k = h[9] % s.n
        name = s.new_file_name(k) if new_names else s.old_file_name(k)
        if fault == "encrypted_entry":
            _patch_entry(mem.data, name, flag_bits=0x1)
        else:
            _patch_entry(mem.data, name, method=ZIP_AES_METHOD)
        wire.write(bytes(mem.data))
        wire.drain()

    def _write_zip(self, wire: _ChunkedWire | _MemoryWire, s: _Series, fault: str | None, h: bytes, *,
                   license: bool, new_names: bool, md5: bool) -> None:
        fake, cfg = self.fake, self.fake.config
        nasty = cfg.nasty if s.demo else frozenset()
        # Deflate level 1: the same wire format as NBIA's (level 6) deflate at ~8x the speed, so
        # the fake does not become the bottleneck of a benchmark on a 2-core machine.
        method, level = (zipfile.ZIP_DEFLATED, 1) if cfg.zip_deflate else (zipfile.ZIP_STORED, None)

        def put(zf: zipfile.ZipFile, name: str, data: bytes | str) -> None:
            # Fixed timestamps keep zips byte-identical across runs.
            zf.writestr(zipfile.ZipInfo(name, ZIP_DATE), data, compress_type=method, compresslevel=level)

        def put_stream(zf: zipfile.ZipFile, name: str, pieces: Iterable[bytes]) -> str:
            """A huge entry written piece by piece (zip64: its size is not known up front);
            returns its MD5, computed on the way."""
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type, info._compresslevel = method, level   # what writestr would set
            digest = hashlib.md5()
            with zf.open(info, "w", force_zip64=True) as f:
                for piece in pieces:
                    digest.update(piece)
                    f.write(piece)
            return digest.hexdigest()

        def name_of(k: int) -> str:
            return s.new_file_name(k) if new_names else s.old_file_name(k)

        huge = cfg.faults.huge_entry_bytes
        rows: list[tuple[str, str]] = []
        corrupt_k = h[9] % s.n if fault == "corrupt" else -1
        with zipfile.ZipFile(wire, "w", compression=method) as zf:
            if fault == "huge_license":
                put_stream(zf, "LICENSE", _repeated(self._license_text(s).encode(), huge))
            elif license:
                put(zf, "LICENSE", self._license_text(s))
            for k in range(s.n):
                name = s.new_file_name(k) if new_names else s.old_file_name(k)
                data = fake._instance(s, k)
                rows.append((name, _md5(data)))
                if k == corrupt_k:
                    # Alter pixel bytes before zipping: CRCs match, only the MD5 reveals it.
                    data = bytearray(data)
                    for i in range(len(data) - 64, len(data) - 32):
                        data[i] ^= 0x5A
                    data = bytes(data)
                put(zf, name, data)
            if fault == "huge_dicom":                          # a real header, then zeros
                name = name_of(s.n + 1)
                head = fake._instance(s, 0)
                rows.append((name, put_stream(zf, name, itertools.chain(
                    [head], _repeated(b"\0", huge - len(head))))))
            if fault == "control_names":
                put(zf, CONTROL_NAME, fake._instance(s, 0))   # not in md5hashes.csv
            if "junk" in nasty:
                junk_name, junk = self._junk(s)
                put(zf, junk_name, junk)
                rows.append((junk_name, _md5(junk)))          # listed, with its correct hash
            if "contaminate" in nasty:
                other = self._neighbour(s)
                if other is not None:
                    name = s.new_file_name(s.n) if new_names else s.old_file_name(s.n)
                    put(zf, name, fake._instance(other, 0))   # not in md5hashes.csv
            if md5 or fault == "huge_md5_table":
                order = list(rows)
                random.Random(h).shuffle(order)                # arbitrary row order, like a HashMap
                if fault == "bad_md5_row" and order:
                    i = h[10] % len(order)
                    order[i] = (order[i][0], _md5(order[i][1].encode()))
                csv = "Filename,MD5Hash\n" + "".join(f"{n},{m}\n" for n, m in order)
                if fault == "huge_md5_table":                  # whole filler rows, >= huge bytes
                    filler = f"x.dcm,{_digest('filler', s.uid).hex()[:32]}\n".encode()
                    total = -(-huge // len(filler)) * len(filler)
                    put_stream(zf, "md5hashes.csv", itertools.chain([csv.encode()], _repeated(filler, total)))
                else:
                    put(zf, "md5hashes.csv", csv)
            if fault in ("reset", "stall"):
                wire.trip()                                    # never let these zips complete
            if fault == "truncate":
                wire.drain()
                wire.discard = True                            # no central directory
        wire.drain()

    def _break_off(self, kind: str, stall_seconds: float) -> None:
        if kind == "stall":
            self.fake._stop.wait(stall_seconds)                # connection open, no bytes
            self.close_connection = True
            return
        # reset: SO_LINGER 0 makes close() send RST. The rfile holds a reference to the socket,
        # so it is closed first, or the descriptor would stay open and no RST would go out.
        conn = self.connection
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            conn.close()
        except OSError:
            pass
        self.close_connection = True

    def _license_text(self, s: _Series) -> str:
        r = s.record
        name = r.get("LicenseName", "Creative Commons Attribution 4.0 International License")
        uri = r.get("LicenseURI") or _license_uri(name)
        return (f"License Information. The {s.collection} collection is distributed under the {name} "
                f"at {uri}. By downloading the data, you agree to abide by terms of this license.\n")

    def _junk(self, s: _Series) -> tuple[str, bytes]:
        if s.idx % 2:
            return "Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + _digest("thumbs", s.uid) * 16
        return "notes.txt", f"Notes for {s.uid}: scanned twice, see second series.\n".encode()

    def _neighbour(self, s: _Series) -> _Series | None:
        demo = self.fake._catalogue.by_collection.get(s.collection, [])
        others = [o for o in demo if o.uid != s.uid and not o.sample_files]
        if not others:
            return None
        i = demo.index(s)
        return others[i % len(others)]

    # -- tokens ---------------------------------------------------------------------------------------------
    def _token(self, method: str, form: dict[str, list[str]]) -> None:
        fake, cfg = self.fake, self.fake.config
        if method != "POST":
            self._reply("token", 405, b"Method Not Allowed", "text/plain")
            return
        f = {k: v[0] for k, v in form.items()}

        def error(status: int, err: str, desc: str) -> None:
            self._reply("token", status, json.dumps({"error": err, "error_description": desc}).encode(),
                        "application/json")

        if f.get("client_id") != "NBIA":
            error(401, "invalid_client", "Invalid client or Invalid client credentials")
            return
        grant = f.get("grant_type")
        if grant == "password":
            user = f.get("username")
            if user is None or user not in cfg.users or cfg.users[user] != f.get("password", ""):
                error(401, "invalid_grant", "Invalid user credentials")
                return
        elif grant == "refresh_token":
            user = fake._tokens.refresh_user(f.get("refresh_token", ""))
            if user is None:
                error(400, "invalid_grant", "Invalid refresh token")
                return
        else:
            error(400, "unsupported_grant_type", "Unsupported grant_type")
            return
        answer = fake._tokens.issue(user, cfg.token_lifetime, cfg.refresh_lifetime)
        self._reply("token", 200, json.dumps(answer).encode(), "application/json")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    d = FakeConfig()
    fd = Faults()
    p = argparse.ArgumentParser(
        prog="fake_nbia.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="A fake of TCIA's NBIA v4 REST service. Prints 'READY <base url>' on the first "
                    "line of stdout once it listens, then serves until killed (SIGINT/SIGTERM).",
        epilog="Nastiness kinds (DEMO collection only): contaminate = each zip carries a DICOM file "
               "of another series that md5hashes.csv does not list; junk = each zip carries "
               "Thumbs.db or notes.txt, listed in md5hashes.csv with its correct hash; "
               "hostile_names = extra series whose SeriesDescription/StudyDesc hold '/', '..', "
               "leading dots, unicode, control characters and 300 characters; "
               "duplicate_series_numbers = extra series sharing SeriesNumber and description in "
               "one study (two with SeriesInstanceUIDs ending in the same 5 characters) and two "
               "studies of one patient with the same date, description, StudyID and last 5 "
               "characters of StudyInstanceUID; missing_dates = extra series without SeriesDate, "
               "in a study without StudyDate. "
               "Test hooks: GET /_fake/counters (JSON), POST /_fake/expire_tokens. "
               "From Python only: hostile image faults by script_faults (" + ", ".join(HOSTILE_KINDS) +
               "), FakeConfig.series_rows_hook, FakeNbia.override_metadata.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one")
    g = p.add_argument_group("data")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of all generated data and fault draws")
    g.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                   help="folder of *.series.json real metadata (default: tests/data)")
    g.add_argument("--no-real-collections", action="store_true",
                   help="serve only DEMO, not the collections of the *.series.json files")
    g.add_argument("--demo-series", type=int, default=d.demo_series, help="series in the generated DEMO collection")
    g.add_argument("--demo-patients", type=int, default=d.demo_patients, help="patients in DEMO")
    g.add_argument("--instances", type=int, default=d.instances,
                   help="instances per DEMO series; cap per real-metadata series")
    g.add_argument("--image-size", type=int, default=d.image_size, help="rows = columns of generated slices")
    g.add_argument("--zip-deflate", action=argparse.BooleanOptionalAction, default=d.zip_deflate,
                   help="deflate zip entries (default) or store them")
    g.add_argument("--metadata-headers", choices=("spaced", "compact"), default=d.metadata_headers,
                   help="getSeriesMetadata column names: 'Patient ID' as NBIA's source (default) or 'PatientID'")
    g.add_argument("--nasty", action="append", default=[], metavar="KIND",
                   help=f"DEMO nastiness, repeatable or 'all': {', '.join(sorted(NASTY_KINDS))}")
    g = p.add_argument_group("behaviour")
    g.add_argument("--include-md5", choices=INCLUDE_MD5_MODES, default=d.include_md5,
                   help="getImage IncludeMD5=Yes: honour, ignore (default) or refuse with 400")
    g.add_argument("--metadata-hang", choices=METADATA_HANGS, default=argparse.SUPPRESS,
                   help="metadata requests: 'silent' = never answered, 'trickle' = 1 byte/s (default: neither)")
    g.add_argument("--require-token", action="store_true",
                   help="a private server: 401 without a valid Bearer token")
    g.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                   help="accepted user for /nbia-api/oauth/token (repeatable; nbia_guest with an empty "
                        "password is always accepted)")
    g.add_argument("--token-lifetime", type=float, default=d.token_lifetime, help="access token seconds")
    g.add_argument("--refresh-lifetime", type=float, default=d.refresh_lifetime, help="refresh token seconds")
    g = p.add_argument_group("faults (probabilities per getImage/getImageWithMD5Hash request)")
    g.add_argument("--fault-500", type=float, default=fd.p500, metavar="P", help="500 with the real body")
    g.add_argument("--fault-429", type=float, default=fd.p429, metavar="P", help="429 with Retry-After")
    g.add_argument("--retry-after", type=float, default=fd.retry_after, metavar="S", help="Retry-After seconds")
    g.add_argument("--fault-reset", type=float, default=fd.reset, metavar="P", help="part of the zip, then RST")
    g.add_argument("--fault-stall", type=float, default=fd.stall, metavar="P",
                   help="part of the zip, then silence for --stall-seconds, then close")
    g.add_argument("--stall-seconds", type=float, default=fd.stall_seconds, metavar="S",
                   help="how long a stalled response stays silent before the connection closes")
    g.add_argument("--fault-corrupt", type=float, default=fd.corrupt, metavar="P",
                   help="one DICOM entry altered (zip CRCs fine, MD5 wrong)")
    g.add_argument("--fault-truncate", type=float, default=fd.truncate, metavar="P",
                   help="clean HTTP end, zip without central directory")
    g.add_argument("--fault-bad-md5-row", type=float, default=fd.bad_md5_row, metavar="P",
                   help="one wrong row in md5hashes.csv")
    g = p.add_argument_group("WAN shaping")
    g.add_argument("--first-byte-delay", type=float, default=d.first_byte_delay, metavar="S",
                   help="seconds before the first byte of each image response")
    g.add_argument("--conn-bandwidth", type=float, default=argparse.SUPPRESS, metavar="BYTES",
                   help="bytes/s per connection (default: unlimited)")
    g.add_argument("--total-bandwidth", type=float, default=argparse.SUPPRESS, metavar="BYTES",
                   help="bytes/s over all connections (default: unlimited)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    return p


def config_from_args(args: argparse.Namespace) -> FakeConfig:
    users = {"nbia_guest": ""}
    for spec in args.user:
        name, sep, password = spec.partition(":")
        if not sep:
            raise SystemExit(f"--user wants NAME:PASSWORD, got {spec!r}")
        users[name] = password
    nasty = set(args.nasty)
    if "all" in nasty:
        nasty = set(NASTY_KINDS)
    return FakeConfig(
        seed=args.seed, data_dir=getattr(args, "data_dir", None), real_collections=not args.no_real_collections,
        demo_series=args.demo_series, demo_patients=args.demo_patients, instances=args.instances,
        image_size=args.image_size, include_md5=args.include_md5, zip_deflate=args.zip_deflate,
        require_token=args.require_token, users=users, token_lifetime=args.token_lifetime,
        refresh_lifetime=args.refresh_lifetime, nasty=frozenset(nasty),
        faults=Faults(p500=args.fault_500, p429=args.fault_429, retry_after=args.retry_after,
                      reset=args.fault_reset, stall=args.fault_stall, stall_seconds=args.stall_seconds,
                      corrupt=args.fault_corrupt, truncate=args.fault_truncate,
                      bad_md5_row=args.fault_bad_md5_row),
        first_byte_delay=args.first_byte_delay, conn_bandwidth=getattr(args, "conn_bandwidth", None),
        total_bandwidth=getattr(args, "total_bandwidth", None), metadata_headers=args.metadata_headers, verbose=args.verbose,
        metadata_hang=getattr(args, "metadata_hang", None))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        fake = FakeNbia(config_from_args(args))
    except ValueError as exc:
        print(f"fake_nbia: {exc}", file=sys.stderr)
        return 2
    serve_until_signalled(fake, args.host, args.port)
    return 0


def serve_until_signalled(fake: FakeNbia, host: str, port: int) -> None:
    """Listen, print the READY line, serve until SIGTERM or SIGINT (programs, not tests)."""
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    fake.start(port=port, host=host)
    print(f"READY {fake.url}", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        fake.stop()


if __name__ == "__main__":
    sys.exit(main())
