"""medsearch.web.pictures: a case's matched slice read through the link table, its headers kept a
while; files that change or go are read again or refused, never served stale."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medsearch.config import load_config
from medsearch.errors import ConfigError
from medsearch.sharing import LinkTable
from medsearch.sheets import matched_picture
from medsearch.web import pictures
from medsearch.web.pictures import CaseSlices

PREPROCESS = load_config("default").preprocess


def _moved_links(phantom_index, tmp_path):
    """The phantom archive copied to tmp_path, and a link table that points there."""
    archive, index = phantom_index
    copy = tmp_path / "archive"
    shutil.copytree(archive, copy)
    links = tmp_path / "links.csv"
    links.write_text((index.parent / "links.csv").read_text().replace(str(archive), str(copy)))
    return copy, links


def test_a_second_picture_of_a_case_reads_its_headers_once(phantom_index, tmp_path, monkeypatch):
    copy, links = _moved_links(phantom_index, tmp_path)
    table = LinkTable(links)
    ids = sorted(table.rows)
    slices = CaseSlices(links)
    first = slices.picture(ids[0], 5, PREPROCESS, 64)
    again = slices.picture(ids[0], 5, PREPROCESS, 64, (0, 0, 32, 32))
    assert first is not None and again is not None and again.shape == (64, 64, 3)
    np.testing.assert_array_equal(first, matched_picture(table.resolve(ids[0]), 5, PREPROCESS, 64))
    assert list(slices._cases) == [ids[0]]
    monkeypatch.setattr(pictures, "CASES_KEPT", 1)
    assert slices.picture(ids[1], 5, PREPROCESS, 64) is not None
    assert list(slices._cases) == [ids[1]]  # the oldest dropped
    # the files go: the kept headers are not trusted, the case is scanned again and refused
    source = table.resolve(ids[1])
    for name in source["files"]:
        Path(name).unlink()
    assert slices.picture(ids[1], 5, PREPROCESS, 64) is None and ids[1] not in slices._cases


def test_a_missing_link_table_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="link table .* does not exist; it is written by: medsearch index"):
        CaseSlices(tmp_path / "nothing.csv")


def test_a_case_missing_one_file_shows_no_slice_rather_than_the_wrong_one(phantom_index, tmp_path):
    """With one file of a series gone, slice N of what is left is another slice than the one that
    matched: the picture is refused (the stored thumbnail stands in), not drawn one off."""
    copy, links = _moved_links(phantom_index, tmp_path)
    table = LinkTable(links)
    case_id = sorted(table.rows)[0]
    Path(table.resolve(case_id)["files"][2]).unlink()
    assert CaseSlices(links).picture(case_id, 5, PREPROCESS, 64) is None
