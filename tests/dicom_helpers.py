"""Small DICOM and zip builders for tests that need no server."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from fake_nbia import dicom_file_bytes


def dicom_bytes(series_uid: str, instance: int) -> bytes:
    """pydicom's CT_small.dcm re-labelled as instance `instance` of `series_uid`."""
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = f"{series_uid}.{instance}"
    dataset.InstanceNumber = instance
    return dicom_file_bytes(dataset)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_series_zip(path: Path, files: dict[str, bytes], *, listed: dict[str, str] | None = None,
                     license_text: str | None = "License Information. Test.",
                     with_md5_table: bool = True) -> Path:
    """A zip laid out like NBIA's: LICENSE first, the files, md5hashes.csv last.
    `listed` overrides the md5hashes.csv rows (default: every file with its true MD5)."""
    rows = listed if listed is not None else {name: md5(data) for name, data in files.items()}
    with zipfile.ZipFile(path, "w") as archive:
        if license_text is not None:
            archive.writestr("LICENSE", license_text)
        for name, data in files.items():
            archive.writestr(name, data)
        if with_md5_table:
            table = "Filename,MD5Hash\n" + "".join(f"{n},{h}\n" for n, h in rows.items())
            archive.writestr("md5hashes.csv", table)
    return path
