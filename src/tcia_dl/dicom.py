"""The DICOM header reader and the naming check."""

from __future__ import annotations

import io
import re
import struct
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
    try:
        start = source.tell()
        fields = plain_naming_fields(source.read(PLAIN_HEAD_SIZE))
        if fields is not None:
            return fields
        source.seek(start)
    except (OSError, ValueError):   # unreadable, closed: what read_partial makes None too
        return None
    return naming_fields_by_pydicom(source)


def naming_fields_by_pydicom(source: io.BufferedIOBase) -> Optional[DicomNaming]:
    """dicom_naming_fields by pydicom alone: every file the plain reader declines."""
    # The package whole first: threads importing its modules at once see them half made
    import pydicom  # noqa: F401
    from pydicom.errors import BytesLengthException, InvalidDicomError
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
    except (InvalidDicomError, BytesLengthException, OSError, ValueError, KeyError,
            EOFError, TypeError, AttributeError, IndexError):
        # (BytesLengthException: a value whose length its VR cannot have, e.g. a cut
        # (0002,0000): a head that is no DICOM we can name, not a traceback)
        return None


# -- The plain reader: the common head, read directly ---------------------------------------
# pydicom's read_partial costs 0.35-0.57 ms per object, the largest part of IDC's per-object
# CPU (#20, bench/idc_cpu.py --breakdown). Read directly: 0.067 ms on a 137 kB CT object
# (tests/helpers.dicom_bytes' CT_small head, 256x256 pixels; pydicom 0.57 ms on it; process
# time of 10,000 calls, median of 3, pydicom 3.0.2, Python 3.11). It answers only where pydicom 2.4/3.0 provably answers the same (filereader.py
# read_partial, _read_file_meta_info, _is_implicit_vr, data_element_generator; values.py
# convert_UI, convert_IS_string; valuerep.IS) and returns None, "ask pydicom", for anything
# else: tests/test_dicom_header.py compares both on every pydicom test file and on
# truncated and mutated heads.
PLAIN_HEAD_SIZE = 8 * 1024      # the four tags of a CT/MR head lie within its first 2 kB

# Encodings of the data set that read_partial reads as explicit VR little endian (its "any
# other syntax" branch): explicit VR LE itself and the encapsulated pixel data syntaxes.
# Implicit VR LE (1.2.840.10008.1.2) is read as such. Deflated and big endian: pydicom.
EXPLICIT_LE_SYNTAXES = frozenset(b"1.2.840.10008." + suffix for suffix in (
    b"1.2.1", b"1.2.4.50", b"1.2.4.51", b"1.2.4.57", b"1.2.4.70", b"1.2.4.80", b"1.2.4.81",
    b"1.2.4.90", b"1.2.4.91", b"1.2.4.201", b"1.2.4.202", b"1.2.4.203", b"1.2.5"))
IMPLICIT_LE_SYNTAX = b"1.2.840.10008.1.2"

# Explicit VR with a 2 reserved bytes + 4-byte length, as both pydicom 2.4 and 3.0 have it.
# OV, SV, UV (2019) are left out, so are unknown VRs: pydicom's versions differ on them.
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"))
SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"))
CHARSET_TAG = 0x00080005
# Specific Character Sets convert_encodings takes without a word (it warns, or raises in
# RAISE mode, on others). They change nothing in UI/IS values, which are read as Latin-1.
PLAIN_CHARSETS = frozenset((b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"))
UID_VALUE = re.compile(rb"[0-9.]+")
# Digits, leading spaces allowed (int() takes them); at most 9: exact through float()
COUNT_VALUE = re.compile(rb" *[0-9]{1,9}")
# The VR each naming tag has (and the charset, whose value is checked)
NAMING_VRS = {0x00080018: b"UI", 0x0020000E: b"UI", 0x00200012: b"IS", 0x00200013: b"IS",
              CHARSET_TAG: b"CS"}
ELEMENT_HEADER = struct.Struct("<HH2sH").unpack_from    # group, element, VR, 2-byte length
LENGTH_32 = struct.Struct("<L").unpack_from


class PlainElement(NamedTuple):
    tag: int
    vr: bytes                  # b"" in implicit VR
    value_start: int
    length: int                # the value lies within the head


def tag_at(head: bytes, at: int) -> Optional[int]:
    """The tag of the element at `at`, where 12 bytes are there: all that read_partial reads
    of the element it stops at (8, or 12 for a VR with a 4-byte length), whatever its VR."""
    if at + 12 > len(head):
        return None
    return int.from_bytes(head[at:at + 2], "little") << 16 | \
        int.from_bytes(head[at + 2:at + 4], "little")


def plain_element(head: bytes, at: int, explicit: bool) -> Optional[PlainElement]:
    """The element at `at` (12 bytes there: tag_at), or None where it is not plain: an
    unknown VR, a value past the end of `head` (an undefined length 0xFFFFFFFF too)."""
    tag = int.from_bytes(head[at:at + 2], "little") << 16 | \
        int.from_bytes(head[at + 2:at + 4], "little")
    if not explicit:
        length = int.from_bytes(head[at + 4:at + 8], "little")
        value_start, vr = at + 8, b""
    else:
        vr = head[at + 4:at + 6]
        if vr in SHORT_VRS:
            length = int.from_bytes(head[at + 6:at + 8], "little")
            value_start = at + 8
        elif vr in LONG_VRS:
            length = int.from_bytes(head[at + 8:at + 12], "little")
            value_start = at + 12
        else:
            return None
    if value_start + length > len(head):
        return None
    return PlainElement(tag, vr, value_start, length)


def plain_file_meta(head: bytes) -> Optional[tuple[int, bool]]:
    """(where the data set starts, whether it is explicit VR) from a plain File Meta group:
    "DICM", (0002,0000) UL first, tags rising, a transfer syntax named above; else None."""
    if head[128:132] != b"DICM":
        return None
    at, last_tag, syntax = 132, 0, None
    while True:
        tag = tag_at(head, at)
        if tag is None:
            return None
        if tag >> 16 != 2:      # where _read_file_meta_info stops, whatever the VR
            break
        element = plain_element(head, at, explicit=True)
        if element is None:
            return None
        end = element.value_start + element.length
        if element.tag <= last_tag or \
                (last_tag == 0 and (element.tag, element.vr, element.length)
                 != (0x00020000, b"UL", 4)):
            return None
        if element.tag == 0x00020010:
            if element.vr != b"UI":
                return None
            syntax = head[element.value_start:end].rstrip(b"\0 ")
        last_tag, at = element.tag, end
    if syntax in EXPLICIT_LE_SYNTAXES:
        return at, True
    if syntax == IMPLICIT_LE_SYNTAX:
        # pydicom reads an implicit data set as explicit where its first element's length
        # bytes look like a VR (two of A-Z)
        if at + 6 > len(head) or (0x40 < head[at + 4] < 0x5B and 0x40 < head[at + 5] < 0x5B):
            return None
        return at, False
    return None


def plain_naming_fields(head: bytes) -> Optional[DicomNaming]:
    """DicomNaming read directly from a plain head, or None: then pydicom must read it."""
    meta = plain_file_meta(head)
    if meta is None:
        return None
    at, explicit = meta
    values = plain_data_set(head, at, explicit)
    return None if values is None else plain_naming(values)


def plain_data_set(head: bytes, at: int, explicit: bool) -> Optional[dict[int, bytes]]:
    """The naming tags' values (padding stripped) in the data set from `at` up to the
    element read_partial stops at, or None where it is not plain. One loop without calls:
    CT_small.dcm's head has 135 elements before (0020,0013): tag_at + plain_element per
    element cost 0.29 ms a head, this loop 0.06 ms (process time, median of 3 x 10,000)."""
    size, last_tag = len(head), 0x0002FFFF
    values: dict[int, bytes] = {}
    while True:
        if at + 12 > size:                     # as tag_at
            return None
        group, element, vr, short_length = ELEMENT_HEADER(head, at)
        tag = group << 16 | element
        if tag <= last_tag:
            return None
        if tag > 0x00200013:       # where read_partial stops (after_instance_number)
            return None if last_tag == 0x0002FFFF else values   # an empty data set: not plain
        if not explicit:
            length, value_start, vr = LENGTH_32(head, at + 4)[0], at + 8, b""
        elif vr in SHORT_VRS:
            length, value_start = short_length, at + 8
        elif vr in LONG_VRS:
            length, value_start = LENGTH_32(head, at + 8)[0], at + 12
        else:
            return None
        end = value_start + length
        if end > size:
            return None
        if tag in NAMING_VRS:
            value = head[value_start:end].rstrip(b" \0")
            if tag == CHARSET_TAG:
                if value not in PLAIN_CHARSETS:
                    return None
            elif explicit and vr != NAMING_VRS[tag]:
                return None
            else:
                values[tag] = value
        # Any other element, a sequence of defined length too, is skipped unread by
        # read_partial with specific_tags (data_element_generator seeks past its value)
        last_tag, at = tag, end


def plain_naming(values: dict[int, bytes]) -> Optional[DicomNaming]:
    """The values as pydicom's path gives them: a UID as it is (absent: ""), a count as int
    (absent or empty: None); anything less plain (multi-valued, signs, empty UIDs): None."""
    uids = []
    for tag in (0x0020000E, 0x00080018):
        value = values.get(tag)
        if value is not None and not UID_VALUE.fullmatch(value):
            return None
        uids.append("" if value is None else value.decode("ascii"))
    counts = []
    for tag in (0x00200013, 0x00200012):
        value = values.get(tag)
        if value and not COUNT_VALUE.fullmatch(value):
            return None
        counts.append(int(value) if value else None)
    return DicomNaming(uids[0], uids[1], counts[0], counts[1])


HEAD_SIZE = 64 * 1024          # enough for nearly every DICOM header; more is read if not


def read_head(entry: io.BufferedIOBase, size: int) -> bytes:
    return entry.read(min(size, HEAD_SIZE))


def series_uid_in(head: bytes) -> Optional[str]:
    """SeriesInstanceUID from the first bytes of a DICOM file (pixels never parsed), or
    None when these bytes do not reach it or are no DICOM."""
    fields = dicom_naming_fields(io.BytesIO(head))
    return fields.series_uid if fields is not None and fields.series_uid else None
