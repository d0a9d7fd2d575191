"""Folder names: sanitising, dates, collisions, on hostile input and on real TCIA metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcia_dl import plan

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("text", [
    "../../etc/passwd", "..", ".", ".hidden", "a/b\\c", "nul\x00byte", "bell\x07 tab\t new\nline",
    "x" * 300, "Thorax ä ö ü 胸部", "/", "", None, "   ", "-leading-dash", "...dots...",
])
def test_clean_component_never_yields_a_dangerous_name(text):
    name = plan.clean_component(text)
    assert name
    assert "/" not in name and "\\" not in name
    assert not any(ord(c) < 32 or ord(c) > 126 for c in name)
    assert not name.startswith((".", "-"))
    assert name not in (".", "..")
    assert len(name) <= 64


def test_clean_component_keeps_ordinary_descriptions_readable():
    assert plan.clean_component("CT Abdomen w/ contrast 1.5mm") == "CT_Abdomen_w_contrast_1.5mm"
    assert plan.clean_component("Thorax ä") == "Thorax_a"
    assert plan.clean_component("") == "NA"
    assert plan.clean_component("..") == "NA"


@pytest.mark.parametrize("value, count", [
    (12, 12), (0, 0), (12.0, 12), ("12", 12), (2 ** 63 - 1, 2 ** 63 - 1),
    (-1, None), (-0.5, None), (2 ** 63, None), (True, None), (False, None),
    ("12.5MB", None), (None, None), ([3], None), (float("nan"), None), (float("inf"), None)])
def test_counts_are_whole_non_negative_numbers_of_any_json_spelling(value, count):
    """FileSize and ImageCount as a server sends them: a number (an int takes a shortcut,
    the commonest case), a numeric string, or something a hostile server made up."""
    assert plan.as_count(value) == count and type(plan.as_count(value)) is type(count)


def test_nbia_dates_become_sortable_iso_dates():
    assert plan.iso_date("11-24-2015") == "2015-11-24"
    assert plan.iso_date("2015-11-24 00:00:00.0") is None
    assert plan.iso_date(None) is None


def test_study_date_prefers_study_date_then_earliest_series_date():
    assert plan.study_date([{"StudyDate": "01-02-2010", "SeriesDate": "12-31-2009"}]) == "2010-01-02"
    assert plan.study_date([{"SeriesDate": "03-05-2011"}, {"SeriesDate": "03-04-2011"},
                          {}]) == "2011-03-04"
    assert plan.study_date([{}, {"SeriesDescription": "x"}]) == "unknown_date"


def test_unique_names_lengthen_the_uid_suffix_only_where_names_collide():
    names = plan.unique_names([
        ("a", "1-CT", "1.2.3.4.55555"),
        ("b", "1-CT", "1.2.3.9.55555"),     # same last 5 -> must grow
        ("c", "2-CT", "1.2.3.4.55555"),     # other stem: keeps 5
    ])
    assert names["c"] == "2-CT-55555"
    assert names["a"] != names["b"]
    assert names["a"].endswith("4.55555") and names["b"].endswith("9.55555")


def test_unique_names_treat_case_as_a_collision():
    names = plan.unique_names([("a", "1-ct", "9.1.11111"), ("b", "1-CT", "9.2.11111")])
    assert names["a"].casefold() != names["b"].casefold()


def series_record(uid, study, patient="P1", number=1, desc="CT", **extra):
    return {"SeriesInstanceUID": uid, "StudyInstanceUID": study, "PatientID": patient,
            "SeriesNumber": number, "SeriesDescription": desc, "StudyDesc": "Study",
            "StudyDate": "01-02-2020", "ImageCount": 1, "FileSize": 10, **extra}


def test_plan_gives_duplicate_series_numbers_and_suffixes_their_own_folders():
    records = [series_record("1.2.840.1.12345", "1.2.9.1"),
               series_record("1.2.840.2.12345", "1.2.9.1"),
               series_record("1.2.840.3.99999", "1.2.9.2"),
               series_record("1.2.840.4.88888", "1.3.9.2")]   # two studies end in "9.2"
    planned = plan.plan_collection("C", records)
    paths = [p.path for p in planned]
    assert len(set(p.casefold() for p in paths)) == len(paths)
    studies = {p.path.split("/")[1] for p in planned}
    assert len(studies) == 3


def test_plan_of_hostile_patient_ids_keeps_patients_apart():
    records = [series_record("1.1", "2.1", patient="A/B"), series_record("1.2", "2.2", patient="A_B"),
               series_record("1.3", "2.3", patient="../..")]
    planned = plan.plan_collection("C", records)
    patients = {p.path.split("/")[0] for p in planned}
    assert len(patients) == 3
    assert all(not p.startswith(".") for p in patients)


@pytest.mark.parametrize("collection", ["Pancreas-CT", "CPTAC-GBM"])
def test_plan_of_real_collections_gives_every_series_its_own_readable_folder(collection):
    records = json.loads((DATA / f"{collection}.series.json").read_text())
    planned = plan.plan_collection(collection, records)
    assert len(planned) == len(records)
    paths = [p.path for p in planned]
    assert len({p.casefold() for p in paths}) == len(paths)
    by_uid = {p.uid: p for p in planned}
    for record in records:
        patient, study, series = by_uid[record["SeriesInstanceUID"]].path.split("/")
        assert patient == plan.clean_component(record["PatientID"])
        month, day, year = record["StudyDate"].split("-")
        assert study.startswith(f"{year}-{month}-{day}-")
        assert series.startswith(f"{record.get('SeriesNumber', 'NA')}-")
        assert series.endswith(plan.clean_component(record["SeriesInstanceUID"][-5:]))


def test_real_metadata_without_series_date_still_lands_in_the_study_date_folder():
    records = json.loads((DATA / "Pancreas-CT.series.json").read_text())
    undated = [r for r in records if "SeriesDate" not in r]
    assert undated, "the fixture is supposed to contain series without SeriesDate"
    planned = {p.uid: p for p in plan.plan_collection("Pancreas-CT", records)}
    for record in undated:
        assert "unknown_date" not in planned[record["SeriesInstanceUID"]].path


def test_suggestions_catch_case_and_punctuation_mistakes():
    known = ["Pancreas-CT", "CPTAC-GBM", "LIDC-IDRI", "4D-Lung"]
    assert plan.suggest_collections("pancreas_ct", known) == ["Pancreas-CT"]
    assert plan.suggest_collections("LIDC IDRI", known) == ["LIDC-IDRI"]
    assert "CPTAC-GBM" in plan.suggest_collections("CPTAC-GMB", known)
    assert plan.suggest_collections("completely-different", known) == []
