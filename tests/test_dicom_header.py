"""The header reader's plain path (dicom.plain_naming_fields) answers exactly as pydicom's
read_partial does, or not at all (#20): on every pydicom test file, on the fakes' objects, on
every truncation of their first 2 kB and on thousands of single-byte changes."""
from __future__ import annotations

import io
import os
import random
import warnings
from typing import Callable, Optional

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset

from fakes.fake_nbia import dicom_file_bytes
from fakes.fake_s3 import synthetic_dicom
from helpers import dicom_bytes
from tcia_dl import dicom
from tcia_dl.dicom import DicomNaming

MUTATED_FILES = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm", "JPEG2000.dcm",
                 "rtplan.dcm")


def outcome(read: Callable[[io.BytesIO], Optional[DicomNaming]], data: bytes) -> object:
    """What `read` makes of `data`: its answer, or the class of what it raised (pydicom
    raises a few errors dicom_naming_fields does not catch, e.g. BytesLengthException on
    a truncated (0002,0000): the reader must then raise the same)."""
    with warnings.catch_warnings():      # pydicom warns on the broken heads made below
        warnings.simplefilter("ignore")
        try:
            return read(io.BytesIO(data))
        except Exception as error:      # noqa: BLE001 (compared, not hidden)
            return type(error)


def by_pydicom(data: bytes) -> object:
    return outcome(dicom.naming_fields_by_pydicom, data)


def by_reader(data: bytes) -> object:
    return outcome(dicom.dicom_naming_fields, data)


def plain(data: bytes) -> Optional[DicomNaming]:
    return dicom.plain_naming_fields(data[:dicom.PLAIN_HEAD_SIZE])


def same_answer(data: bytes, reader_too: bool = True) -> bool:
    """Whether the reader answers as pydicom does; True also where the plain path declines
    (then the reader is pydicom), and the plain path's answer is checked on its own."""
    expected = by_pydicom(data)
    answer = plain(data)
    if answer is None:      # the reader is pydicom after a rewind: read again where it matters
        return not reader_too or by_reader(data) == expected
    return answer == expected and by_reader(data) == expected


def pydicom_test_files() -> list[str]:
    return sorted(path for path in get_testdata_files() if os.path.isfile(path))


def implicit_vr(data: bytes) -> bytes:
    """The same object in implicit VR little endian."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buffer = io.BytesIO()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True, implicit_vr=True,
                         little_endian=True)
    else:
        dataset.is_implicit_VR, dataset.is_little_endian = True, True
        pydicom.dcmwrite(buffer, dataset, write_like_original=False)
    return buffer.getvalue()


def fakes_objects() -> list[bytes]:
    """Heads as the fakes serve them: IDC's (fake_s3), NBIA's (helpers.dicom_bytes: CT_small
    re-labelled), and variants a real archive holds: implicit VR, padded values, a charset."""
    rows = [{"PatientID": "ProstateX-0000", "StudyInstanceUID": f"1.3.6.1.4.1.14519.5.2.1.{n}",
             "SeriesInstanceUID": f"1.3.6.1.4.1.14519.5.2.1.7311.5101.{n + 1}", "Modality": "MR",
             "SeriesNumber": n + 4, "SeriesDescription": "t2_tse_tra", "StudyDate": "2011-07-07",
             "StudyDescription": "MR prostaat kanker detectie WDS_mc MCAPRODETW"}
            for n in range(2)]         # rows as IDC's index has them (fake_s3.rows)
    objects = [synthetic_dicom(rows[n % 2], n + 1, f"1.2.826.0.1.3680043.8.498.{n}")
               for n in range(4)]
    objects += [dicom_bytes("1.2.826.0.1.3680043.8.498.77", n) for n in (1, 2, 310)]
    objects.append(implicit_vr(objects[0]))
    objects.append(implicit_vr(objects[-2]))
    dataset = pydicom.dcmread(io.BytesIO(objects[0]))
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.InstanceNumber = "  7"         # IS may carry leading spaces
    dataset.AcquisitionNumber = ""         # empty: None on both paths
    objects.append(dicom_file_bytes(dataset))
    # An element with a 4-byte length right after (0020,0013): read_partial reads 12 bytes
    # of the element it stops at, and raises where fewer are there
    dataset = pydicom.dcmread(io.BytesIO(objects[1]))
    dataset.DimensionOrganizationSequence = [Dataset()]
    objects.append(dicom_file_bytes(dataset))
    return objects


@pytest.fixture(scope="module")
def fakes() -> list[bytes]:
    return fakes_objects()


def test_every_pydicom_test_file_reads_as_by_pydicom():
    paths = pydicom_test_files()
    assert len(paths) > 100
    differing = [os.path.basename(path) for path in paths
                 if not same_answer(open(path, "rb").read())]
    assert differing == []


def test_the_fakes_objects_read_as_by_pydicom_and_by_the_plain_path(fakes):
    for data in fakes:
        expected = by_pydicom(data)
        assert expected is not None and expected.sop_uid
        assert plain(data) == expected          # taken, and the same
        assert by_reader(data) == expected
    padded = by_pydicom(fakes[-2])
    assert (padded.instance, padded.acquisition) == (7, None)


def test_the_plain_path_is_taken_on_the_common_files(fakes):
    """Useless if never taken: taken on explicit (plain, RLE, JPEG-LS) and implicit VR
    little endian test files whose four tags come before any undefined-length element, and
    on every object of the fakes."""
    common = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
              "SC_rgb_rle.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "rtdose.dcm"]
    for name in common:
        data = open(get_testdata_file(name), "rb").read()
        assert plain(data) is not None, name
    taken = sum(plain(open(path, "rb").read()) is not None for path in pydicom_test_files())
    assert taken >= 60              # 71 of 176 with pydicom 3.0.2
    assert all(plain(data) is not None for data in fakes)


def test_it_declines_what_it_does_not_read_as_pydicom():
    for name in ("MR_small_bigendian.dcm", "image_dfl.dcm", "SC_rgb_jpeg.dcm",
                 "liver_1frame.dcm"):   # big endian, deflated, implicit though JPEG, SQ undefined
        assert plain(open(get_testdata_file(name), "rb").read()) is None, name


def mutation_bases(fakes: list[bytes]) -> list[bytes]:
    return [open(get_testdata_file(name), "rb").read() for name in MUTATED_FILES] + \
        [fakes[0], fakes[4], fakes[7], fakes[-2], fakes[-1]]


def test_every_truncation_reads_as_by_pydicom(fakes):
    cases = 0
    for data in mutation_bases(fakes):
        for size in range(0, min(len(data), 2048) + 1):
            assert same_answer(data[:size], reader_too=False), size
            cases += 1
    assert cases > 10000


def test_single_byte_changes_read_as_by_pydicom(fakes):
    generator = random.Random(20)
    cases = taken = 0
    for data in mutation_bases(fakes):
        end = min(len(data), 1200)
        for _ in range(500):
            position = generator.randrange(128, end)
            value = generator.choice((0, 0x20, 0x2E, 0x31, 0x5C, 0xFF, generator.randrange(256)))
            changed = data[:position] + bytes([value]) + data[position + 1:]
            assert same_answer(changed, reader_too=False), (position, value)
            taken += plain(changed) is not None
            cases += 1
    assert cases == 5000 and taken > 1000       # the plain path met most of them


@pytest.mark.parametrize("value, expected", [
    (b"12", 12), (b"12 ", 12), (b" 12", 12), (b"012", 12), (b"", None), (b"  ", None),
    (b"+1", "pydicom"), (b"1.0", "pydicom"), (b"-1", "pydicom"), (b"1\\2", "pydicom"),
    (b"1e3", "pydicom"), (b"1234567890", "pydicom"), (b"12\x00", 12)])
def test_instance_number_values(value, expected, fakes):
    """Each IS value through both paths: the plain path reads digits (spaces, NUL padding)
    and leaves the rest to pydicom."""
    data = with_value(fakes[0], 0x00200013, b"IS", value)
    assert same_answer(data)
    answer = plain(data)
    if expected == "pydicom":
        assert answer is None
    else:
        assert answer is not None and answer.instance == expected


@pytest.mark.parametrize("value, plain_reads", [
    (b"1.2.3\x00", True), (b"1.2.3 ", True), (b"1.2.3", True), (b"", False),
    (b" 1.2.3", False), (b"1.2\\1.3", False), (b"1.2.a", False)])
def test_series_uid_values(value, plain_reads, fakes):
    data = with_value(fakes[0], 0x0020000E, b"UI", value)
    assert same_answer(data)
    answer = plain(data)
    assert (answer is not None) == plain_reads
    if plain_reads:
        assert answer.series_uid == "1.2.3"


def tag_bytes(tag: int) -> bytes:
    return (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")


def with_value(data: bytes, tag: int, vr: bytes, value: bytes,
               new_vr: Optional[bytes] = None) -> bytes:
    """`data` with the explicit VR element `tag` given `value` (its length changed)."""
    at = data.index(tag_bytes(tag) + vr)
    length = int.from_bytes(data[at + 6:at + 8], "little")
    return data[:at] + tag_bytes(tag) + (new_vr or vr) + len(value).to_bytes(2, "little") + \
        value + data[at + 8 + length:]


def test_a_naming_tag_in_another_vr_is_left_to_pydicom(fakes):
    """AE keeps a NUL that UI drops: the plain path reads only the VR the tag has."""
    data = with_value(fakes[0], 0x0020000E, b"UI", b"1.2.3\x00", new_vr=b"AE")
    assert by_pydicom(data).series_uid == "1.2.3\x00"
    assert plain(data) is None and same_answer(data)


def data_set_start(data: bytes) -> int:
    return dicom.plain_file_meta(data)[0]


@pytest.mark.parametrize("element", [
    tag_bytes(0x00000002) + b"UI\x04\x001.2\x00",      # a command set: read in implicit VR
    tag_bytes(0x00020010) + b"UI\x14\x001.2.840.10008.1.2.2\x00",   # file meta again
])
def test_an_element_before_the_data_set_order_is_left_to_pydicom(element, fakes):
    start = data_set_start(fakes[0])
    data = fakes[0][:start] + element + fakes[0][start:]
    assert plain(data) is None and same_answer(data)


def test_the_reader_rewinds_for_pydicom_and_reads_a_region():
    """A head the plain path declines is read by pydicom from where the stream was."""
    data = open(get_testdata_file("liver_1frame.dcm"), "rb").read()
    stream = io.BytesIO(b"xyz" + data)
    stream.read(3)
    assert dicom.dicom_naming_fields(stream) == by_pydicom(data) != None  # noqa: E711


def test_a_dataset_without_the_tags_reads_as_by_pydicom():
    dataset = Dataset()
    dataset.PatientID = "P"
    dataset.Rows = 2
    dataset.BitsAllocated = 8      # past the element read_partial stops at (Rows)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    if int(pydicom.__version__.split(".")[0]) < 3:
        dataset.is_little_endian, dataset.is_implicit_VR = True, False
    data = dicom_file_bytes(dataset)
    assert same_answer(data)
    assert plain(data) == DicomNaming("", "", None, None) == by_pydicom(data)
