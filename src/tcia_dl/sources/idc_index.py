"""IDC's offline index (duckdb over parquet) and its records."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..collection_files import license_url
from ..errors import EXIT_USAGE, FatalRunError


def idc_install_hint() -> str:
    """What to install for IDC, for the way this copy runs. The .pyz carries pure-Python
    packages only: duckdb (compiled) goes into the Python that runs it, whose site-packages
    the .pyz still sees. A checkout has requirements-idc.txt; an installed copy has the
    [idc] extra. idc-index-data needs Python 3.10 (on 3.9: --idc-index FILE)."""
    packages = "duckdb idc-index-data" if sys.version_info >= (3, 10) else "duckdb"
    if zipfile.is_zipfile(sys.argv[0]):
        user = "" if sys.prefix != sys.base_prefix else " --user"      # no --user in a venv
        return (f"install it for the Python that runs the .pyz, which carries pure-Python "
                f"packages only: {sys.executable} -m pip install{user} {packages} (or run the "
                f".pyz with the python of a venv that has them)")
    checkout = Path(__file__).resolve().parents[3] / "requirements-idc.txt"
    if checkout.is_file():
        return f"pip install -r {checkout}"
    return "pip install 'tcia-downloader[idc]'"


def idc_installed() -> bool:
    """Whether --mode idc could open here: duckdb, and IDC's index (idc-index-data, or a
    file named by $TCIA_IDC_INDEX). Asked without importing them (duckdb alone takes
    0.1-0.2 s to import)."""
    if importlib.util.find_spec("duckdb") is None:
        return False
    return bool(os.environ.get("TCIA_IDC_INDEX")) or \
        importlib.util.find_spec("idc_index_data") is not None


IDC_INDEX_COLUMNS = {"collection_id", "analysis_result_id", "PatientID", "SeriesInstanceUID",
                     "StudyInstanceUID", "instanceCount", "aws_bucket", "crdc_series_uuid",
                     "series_size_MB", "license_short_name", "source_DOI"}


def idc_date(value: object) -> Optional[str]:
    """IDC's YYYY-MM-DD as NBIA's MM-DD-YYYY: one archive, one way of writing dates."""
    match = re.match(r"^(\d{4})-(\d{2})-(\d{2})", str(value or ""))
    return f"{match[2]}-{match[3]}-{match[1]}" if match else None


@dataclass(frozen=True)
class IdcCollection:
    name: str                     # TCIA's: Pancreas-CT
    id: str                       # IDC's: pancreas_ct
    licenses: dict[str, str]      # source DOI -> license URL


class IdcIndex:
    """IDC's offline index: idc-index-data's parquet of one row per series (or another of
    the same schema), read with duckdb (measured: a collection out of 1 M rows in 0.27 s,
    pyarrow 0.7-1.2 s), and its collections index (TCIA's names, DOIs, licenses)."""

    def __init__(self, path: Optional[Path]):
        try:
            import duckdb
        except ImportError:
            raise FatalRunError(f"IDC (--mode idc or auto) needs duckdb: {idc_install_hint()}",
                                EXIT_USAGE) from None
        collections_path: Optional[Path] = None
        if path is None:
            try:
                import idc_index_data
            except ImportError:
                raise FatalRunError(f"IDC (--mode idc or auto) needs IDC's index "
                                    f"(idc-index-data), or --idc-index FILE: {idc_install_hint()}",
                                    EXIT_USAGE) from None
            path = Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
            collections_path = Path(idc_index_data.INDEX_METADATA["collections_index"]
                                    ["parquet_filepath"])
            self.version = f"idc-index-data {getattr(idc_index_data, '__version__', '?')}"
        else:
            beside = path.with_name("collections_index.parquet")
            collections_path = beside if beside.is_file() else None
            self.version = str(path)
        self.path = path
        self._db = duckdb.connect()
        try:
            self._db.execute(f"CREATE VIEW series AS SELECT * FROM read_parquet({sql_text(path)})")
            columns = {row[0] for row in self._db.execute("DESCRIBE series").fetchall()}
        except duckdb.Error as exc:
            raise FatalRunError(f"{path}: not a parquet file duckdb can read ({exc})",
                                EXIT_USAGE) from None
        missing = sorted(IDC_INDEX_COLUMNS - columns)
        if missing:
            raise FatalRunError(f"{path} is not an IDC index: it has no {', '.join(missing)} "
                                "column(s)", EXIT_USAGE)
        self.collections = self._read_collections(collections_path)

    def _read_collections(self, path: Optional[Path]) -> dict[str, IdcCollection]:
        """collection_id -> its TCIA name and licenses; without a collections index the
        IDC id stands in for the name."""
        found: dict[str, IdcCollection] = {}
        if path is not None:
            rows = self._db.execute(f"SELECT collection_id, collection_name, sources FROM "
                                    f"read_parquet({sql_text(path)})").fetchall()
            for collection_id, name, sources in rows:
                licenses = {str(s.get("source_doi") or "").lower():
                            str((s.get("license") or {}).get("license_url") or "")
                            for s in (sources or []) if isinstance(s, dict)}
                found[collection_id] = IdcCollection(name or collection_id, collection_id,
                                                     licenses)
        for (collection_id,) in self._db.execute("SELECT DISTINCT collection_id FROM series"
                                                 ).fetchall():
            found.setdefault(collection_id, IdcCollection(collection_id, collection_id, {}))
        return found

    def collection(self, name: str) -> Optional[IdcCollection]:
        """By TCIA's name (any case) or IDC's id."""
        wanted = name.casefold()
        return next((c for c in self.collections.values()
                     if wanted in (c.name.casefold(), c.id.casefold())), None)

    def rows(self, conditions: list[tuple[str, list[str]]], original_only: bool) -> list[dict]:
        """The series whose column is one of the values, for every (column, values)."""
        where = self._where(conditions) + (["analysis_result_id IS NULL"] if original_only
                                           else [])
        condition = " WHERE " + " AND ".join(where) if where else ""
        # Whether any series matches, on the conditions' columns alone, before reading every
        # column: 416 UIDs that IDC does not have (--mode auto on a collection only NBIA
        # serves) cost 0.47 s with SELECT *, 0.08 s so; a match costs 0.09 s more.
        if where and not self._db.execute(f"SELECT 1 FROM series{condition} LIMIT 1"
                                          ).fetchall():
            return []
        cursor = self._db.execute("SELECT * FROM series" + condition)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def analysis_results(self, conditions: list[tuple[str, list[str]]]) -> dict[str, int]:
        """analysis_result_id -> how many of its series meet the conditions: what a
        selection of original series leaves out."""
        where = self._where(conditions) + ["analysis_result_id IS NOT NULL"]
        return dict(self._db.execute(
            "SELECT analysis_result_id, count(*) FROM series WHERE " + " AND ".join(where) +
            " GROUP BY analysis_result_id ORDER BY analysis_result_id").fetchall())

    def series_of_uuids(self, uuids: list[str]) -> dict[str, str]:
        """crdc_series_uuid -> SeriesInstanceUID, of the uuids the index has."""
        # Two columns, not every one (the parquet is columnar): 10,000 uuids of the 25.0.5
        # index in 1.6 s instead of 4.9 s (measured on a loaded 2-core machine).
        where = self._where([("crdc_series_uuid", uuids)])
        return dict(self._db.execute("SELECT crdc_series_uuid, SeriesInstanceUID FROM series "
                                     "WHERE " + " AND ".join(where)).fetchall())

    @staticmethod
    def _where(conditions: list[tuple[str, list[str]]]) -> list[str]:
        where = [f'"{column}" IN {sql_values(values)}' for column, values in conditions if values]
        return where + ["FALSE" for _, values in conditions if not values]

    def close(self) -> None:
        self._db.close()


# Joins the values of one string literal; a value that holds it is never split.
VALUE_SEPARATOR = "\x1f"


def sql_values(values: list[str]) -> str:
    """A subquery of the values, for `column IN ...`. Literals, not bound parameters:
    duckdb imports pandas to bind a Python value (measured: 87 -> 165 MB of RSS, most of an
    IDC run's peak). One string literal that duckdb splits rather than a literal per value,
    which duckdb parses slowly: 200,000 UIDs (--mode auto on a 200,000-series collection)
    looked up in the 25.0.5 index in 0.45 s instead of 1.13 s; 10 in 0.09 s instead of
    0.48 s, reading every column of the matches."""
    texts = [str(value) for value in values]
    if any(VALUE_SEPARATOR in text for text in texts):
        return f"({', '.join(sql_text(text) for text in texts)})"
    return (f"(SELECT unnest(string_split({sql_text(VALUE_SEPARATOR.join(texts))}, "
            f"chr({ord(VALUE_SEPARATOR)}))))")


def sql_text(text: object) -> str:
    """A string literal of SQL (duckdb: quotes doubled, no backslash escapes)."""
    if "\0" in str(text):
        raise FatalRunError(f"{str(text)[:40]!r}: a NUL character cannot be in a query",
                            EXIT_USAGE)
    return "'" + str(text).replace("'", "''") + "'"


def idc_record(row: dict, collection: IdcCollection) -> dict:
    """An index row in the shape of NBIA's getSeries record, so that planning, folder names,
    metadata.csv, LICENSE and CITATION.md are the same whichever source served a series."""
    doi = str(row.get("source_DOI") or "").strip()
    license_name = str(row.get("license_short_name") or "")
    size_mb = row.get("series_size_MB")
    return {
        "SeriesInstanceUID": row["SeriesInstanceUID"],
        "StudyInstanceUID": row.get("StudyInstanceUID"),
        "Modality": row.get("Modality"), "SeriesDate": idc_date(row.get("SeriesDate")),
        "SeriesDescription": row.get("SeriesDescription"),
        "BodyPartExamined": row.get("BodyPartExamined"),
        "SeriesNumber": row.get("SeriesNumber"), "Collection": collection.name,
        "PatientID": row.get("PatientID"), "PatientSex": row.get("PatientSex"),
        "PatientAge": row.get("PatientAge"), "Manufacturer": row.get("Manufacturer"),
        "ManufacturerModelName": row.get("ManufacturerModelName"),
        "ImageCount": row.get("instanceCount"),
        "LicenseName": license_name,
        "LicenseURI": collection.licenses.get(doi.lower()) or license_url(license_name, None),
        "DataDescriptionURI": f"https://doi.org/{doi}" if doi else None,
        "FileSize": int(float(size_mb) * 1e6) if size_mb else None,
        "StudyDesc": row.get("StudyDescription"), "StudyDate": idc_date(row.get("StudyDate")),
        "Source": "idc", "crdc_series_uuid": row.get("crdc_series_uuid"),
        "aws_bucket": row.get("aws_bucket"),
        "analysis_result_id": row.get("analysis_result_id"),
    }
