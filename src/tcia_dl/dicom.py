"""The DICOM header reader and the naming check."""

from __future__ import annotations

import io
from typing import NamedTuple, Optional

from .plan import as_count

# SOPInstanceUID, SeriesInstanceUID, AcquisitionNumber, InstanceNumber: all a name needs
NAMING_TAGS = [0x00080018, 0x0020000E, 0x00200012, 0x00200013]


def after_instance_number(tag: int, vr: Optional[str], length: int) -> bool:
    return tag > 0x00200013


class DicomNaming(NamedTuple):
    series_uid: str
    sop_uid: str
    instance: Optional[int]        # InstanceNumber and AcquisitionNumber name the file
    acquisition: Optional[int]


def dicom_naming_fields(region: io.RawIOBase) -> Optional[DicomNaming]:
    """What names and places a file, from its DICOM header; None when the bytes are no
    DICOM, or DICOM without the UIDs of an instance."""
    # The package whole first: threads importing its modules at once see them half made
    import pydicom  # noqa: F401
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial
    try:
        # Only as far as the last of the four tags (0020,0013): what follows (an enhanced
        # image's per-frame sequences: megabytes) is never parsed.
        dataset = read_partial(io.BufferedReader(region), stop_when=after_instance_number,
                               specific_tags=NAMING_TAGS)
        series_uid = str(dataset.get("SeriesInstanceUID", ""))
        sop_uid = str(dataset.get("SOPInstanceUID", ""))
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError,
            AttributeError, IndexError):
        return None
    if not series_uid or not sop_uid:
        return None
    return DicomNaming(series_uid, sop_uid, as_count(dataset.get("InstanceNumber")),
                       as_count(dataset.get("AcquisitionNumber")))


HEAD_SIZE = 64 * 1024          # enough for nearly every DICOM header; more is read if not


def read_head(entry: io.BufferedIOBase, size: int) -> bytes:
    return entry.read(min(size, HEAD_SIZE))


def series_uid_in(head: bytes) -> Optional[str]:
    """SeriesInstanceUID from the first bytes of a DICOM file (pixels never parsed), or
    None when these bytes do not reach it or are no DICOM."""
    import pydicom  # imported here: pydicom takes a while to import and --help needs none of it
    from pydicom.errors import InvalidDicomError
    try:
        dataset = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True,
                                  specific_tags=["SeriesInstanceUID"])
        return str(dataset.get("SeriesInstanceUID", "")) or None
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError,
            AttributeError, IndexError):
        return None
