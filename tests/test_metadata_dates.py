"""metadata.csv gives the study and series dates in ISO form too (#23, point 9): folder
names use YYYY-MM-DD while NBIA serves MM-DD-YYYY. The server's columns keep their values and
every column its place, for readers of earlier archives."""

from __future__ import annotations

import csv
import io

from helpers import Run
from tcia_dl import errors
from tcia_dl.collection_files import GET_SERIES_FIELDS


def test_metadata_csv_has_iso_dates_after_the_columns_it_had(tmp_path, fake_nbia_factory):
    fake = fake_nbia_factory(instances=1)
    run = Run(tmp_path, fake, collection="Pancreas-CT", compression=False)
    assert run.code == errors.EXIT_OK, run.log
    text = (run.output / "Pancreas-CT" / "metadata.csv").read_text()
    header = next(csv.reader(io.StringIO(text)))
    assert header[:len(GET_SERIES_FIELDS)] == GET_SERIES_FIELDS
    assert header[-5:] == ["Path", "FilesInArchive", "BytesInArchive", "StudyDateISO",
                           "SeriesDateISO"]
    served = {r["SeriesInstanceUID"]: r for r in fake.series("Pancreas-CT")}
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(served)
    without_series_date = 0
    for row in rows:
        record = served[row["SeriesInstanceUID"]]
        for column in ("StudyDate", "SeriesDate"):
            value = record.get(column)
            assert row[column] == (value or "")              # as served: MM-DD-YYYY
            month, day, year = value.split("-") if value else ("", "", "")
            assert row[f"{column}ISO"] == (f"{year}-{month}-{day}" if value else "")
        without_series_date += not record.get("SeriesDate")
        # the folder's date is the study's, in the same form
        assert row["Path"].split("/")[1].startswith(row["StudyDateISO"])
    assert without_series_date > 0                       # the empty case is covered too
