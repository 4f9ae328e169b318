"""Tests of medsearch.io.labels: which columns of a labels CSV are labels (issue 17)."""

from __future__ import annotations

import pandas as pd
import pytest

from medsearch.errors import ConfigError
from medsearch.io.labels import label_columns, read_labels


def test_the_real_export_s_paths_ids_and_file_names_are_left_out(shared_dicom):
    """Finding 3 of issue 17: a CSV as a site exports it (an unnamed index, Windows paths, ids, file
    names, exact ages) made every column a label."""
    table = read_labels(shared_dicom / "tcga-luad-ct100" / "labels.csv", None, None)
    assert table.attrs["key"] == "dicom_name" and table.attrs["rows"] == 100
    assert list(table.columns) == ["Age", "Contrast", "ContrastTag"]
    assert table.attrs["dropped"] == {"raw_input_path": "file paths", "id": "identifiers", "tiff_name": "file names"}
    assert table["Age"].iloc[0] == "60"  # as written: text, never 60.0


COLUMN_CASES = [
    # column name, values, why it is not a label (None: it is one)
    ("grade", ["G1", "G2", "G1", "G3", "G2"], None),
    ("Age", ["71", "60", "45", "33", "80"], None),  # numbers, all different: a label
    ("diagnosis", ["benign", "malignant", "benign", "", "benign"], None),
    ("thyroid", ["yes", "no", "no", "yes", "no"], None),  # ends in "id", is not one
    ("source", ["C:\\data\\a.dcm", "C:\\data\\b.dcm", "C:\\data\\c.dcm", "C:\\d.dcm", "D:\\e.dcm"], "file paths"),
    ("image", ["a.png", "b.png", "c.PNG", "d.nii.gz", "e.dcm"], "file names"),
    ("series", ["1.2.840.113619.2.1", "1.2.840.113619.2.2", "1.2.3.4", "1.2.3.5", "1.2.3.6"], "DICOM UIDs"),
    ("scan_day", ["2020-01-02", "2020-01-03", "2021-12-31", "2020-02-02", "2019-05-05"], "dates"),
    ("acquired", ["20200102", "20200103", "20211231", "20200202", "20190505"], "dates"),
    ("PatientID", ["7", "8", "9", "10", "11"], "identifiers"),
    ("subject_id", ["a", "b", "a", "b", "a"], "identifiers"),
    ("Accession Number", ["x"] * 5, "identifiers"),
    ("case", ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003", "LIDC-IDRI-0004", "LIDC-IDRI-0005"], "identifiers"),
]


@pytest.mark.parametrize(("name", "values", "why"), COLUMN_CASES, ids=[c[0] for c in COLUMN_CASES])
def test_label_columns_by_name_and_values(name, values, why):
    table = pd.DataFrame({"file": [f"f{i}.dcm" for i in range(len(values))], name: values})
    kept, dropped = label_columns(table, "file")
    assert (kept, dropped) == (([name], {}) if why is None else ([], {name: why}))


def test_named_columns_are_kept_whatever_they_hold(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("file,PatientID,grade\na.dcm,7,G1\n")
    table = read_labels(csv, None, ["PatientID", "grade"])
    assert list(table.columns) == ["PatientID", "grade"] and table.attrs["dropped"] == {}


def test_a_label_may_not_take_a_case_table_name(tmp_path):
    csv = tmp_path / "clash.csv"
    csv.write_text("file,pixel_hash\na.dcm,x\n")
    with pytest.raises(ConfigError, match=r"label column\(s\) pixel_hash clash with medsearch metadata"):
        read_labels(csv, None, None)
