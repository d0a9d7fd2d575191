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
    series_uid: str                # "" where the header has none
    sop_uid: str
    instance: Optional[int]        # InstanceNumber and AcquisitionNumber name the file
    acquisition: Optional[int]


def dicom_naming_fields(source: io.BufferedIOBase) -> Optional[DicomNaming]:
    """What names and places a file, from its DICOM header: the one header reader of the
    tool (an NBIA zip entry's head, an IDC object). None when the bytes are no DICOM or end
    before the header does (a caller with more bytes may try again with them)."""
    # The package whole first: threads importing its modules at once see them half made
    import pydicom  # noqa: F401
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial
    try:
        # Only as far as the last of the four tags (0020,0013): what follows (an enhanced
        # image's per-frame sequences: megabytes) is never parsed.
        dataset = read_partial(source, stop_when=after_instance_number,
                               specific_tags=NAMING_TAGS)
        return DicomNaming(str(dataset.get("SeriesInstanceUID", "")),
                           str(dataset.get("SOPInstanceUID", "")),
                           as_count(dataset.get("InstanceNumber")),
                           as_count(dataset.get("AcquisitionNumber")))
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError, TypeError,
            AttributeError, IndexError):
        return None


HEAD_SIZE = 64 * 1024          # enough for nearly every DICOM header; more is read if not


def read_head(entry: io.BufferedIOBase, size: int) -> bytes:
    return entry.read(min(size, HEAD_SIZE))


def series_uid_in(head: bytes) -> Optional[str]:
    """SeriesInstanceUID from the first bytes of a DICOM file (pixels never parsed), or
    None when these bytes do not reach it or are no DICOM."""
    fields = dicom_naming_fields(io.BytesIO(head))
    return fields.series_uid if fields is not None and fields.series_uid else None
