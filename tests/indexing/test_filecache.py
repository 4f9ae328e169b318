"""The local file-state cache (medsearch.indexing.filecache): owner-only, never exported, no UID in
it; it keeps each file's slice geometry, and any file name exactly (a name that is not UTF-8 too)."""

from __future__ import annotations

import math
import os
import sqlite3
import stat
from contextlib import closing

import pydicom
from hostile import paths
from indexing.archives import CT

from medsearch.indexing import FILE_STATE
from medsearch.io import find_files
from medsearch.io.dicom.scan import printable_path
from medsearch.sharing import export_index, shareability_problems

# -- the file-state cache ---------------------------------------------------------------------------


def test_the_file_state_cache_is_local_owner_only_and_holds_no_uid(serial_index, mixed_archive, tmp_path):
    index = serial_index[0]
    cache = index / FILE_STATE
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700 and cache.parent == index / "local"
    content = cache.read_bytes()
    uids = set()
    for path in find_files(mixed_archive):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001, S112 - not DICOM: no UID to look for
            continue
        uids |= {str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    uids.discard("")
    assert uids and not [u for u in uids if u.encode() in content]
    assert shareability_problems(index) == []
    exported = export_index(index, tmp_path / "shared")
    assert not (tmp_path / "shared" / FILE_STATE).exists() and not (tmp_path / "shared" / "local").exists()
    assert not [f for f in exported.files if "file-state" in f or f.startswith("local")]


def test_the_file_state_cache_keeps_slice_geometry(tmp_path):
    from medsearch.indexing.filecache import FileStateCache, _file_states
    from medsearch.io import HeaderSummary, SliceGeometry

    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for f in files:
        f.write_bytes(b"x")
    states = _file_states(files)
    geometry = SliceGeometry(512, 512, (0.0, -1.5, 2.25), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), 3.0, math.inf)
    items = [HeaderSummary(files[0], "st", "se", "sop1", 1, geometry), HeaderSummary(files[1], "st", "se", "sop2", 4)]
    cache = FileStateCache(tmp_path / FILE_STATE)
    cache.put_headers([(states[i.path], i) for i in items])
    cache.close()
    cache = FileStateCache(tmp_path / FILE_STATE)
    found = cache.lookup(states)
    cache.close()
    assert [found[f].item for f in files] == items


def test_a_name_that_is_not_utf8_is_kept_exactly(tmp_path):
    from medsearch.indexing.filecache import FileStateCache, _file_states
    from medsearch.io import HeaderSummary, SkippedFile, SkipReason

    odd = paths.non_utf8_copy(CT[0], tmp_path / "archive")
    other = paths.non_utf8_copy(CT[0], tmp_path / "archive", b"caf\xc3\xa9.dcm")  # the same letters, in UTF-8
    states = _file_states([odd, other])
    items = [HeaderSummary(odd, "st", "se", "sop1", 1),
             SkippedFile(other, SkipReason.NOT_DICOM, f"not DICOM, unlike {odd}")]
    cache = FileStateCache(tmp_path / FILE_STATE)
    cache.put_headers([(states[i.path], i) for i in items])
    cache.put_cases([("c-1", [states[odd]], [(states[odd], SkippedFile(odd, SkipReason.DECODE_ERROR, f"{odd} failed"))])])
    cache.close()
    cache = FileStateCache(tmp_path / FILE_STATE)
    found, decoded = cache.lookup(states), cache.decode_skips(states)
    cache.prune(tmp_path / "archive", states)  # both files are there: both are kept
    assert len(cache.lookup(states)) == 2
    cache.close()
    assert found[odd].item == items[0]
    assert found[other].item.detail == "not DICOM, unlike " + printable_path(odd)  # readable, never a surrogate
    assert decoded[odd][1].detail == printable_path(odd) + " failed"


def test_a_version_3_cache_keeps_its_entries(tmp_path):
    """A cache written before paths were kept as bytes still spares the reading of every header."""
    from medsearch.indexing.filecache import FileStateCache, _file_states
    from medsearch.io import HeaderSummary

    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for f in files:
        f.write_bytes(b"x")
    states = _file_states(files)
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("INSERT INTO meta VALUES ('version', '3')")
        db.execute("CREATE TABLE headers (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, study TEXT, series TEXT, "
                   "sop TEXT, frames INTEGER, reason TEXT, detail TEXT, case_id TEXT, part TEXT, geometry TEXT)")
        db.execute("CREATE TABLE decoded (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, case_id TEXT, reason TEXT, "
                   "detail TEXT)")
        for i, f in enumerate(files):
            s = states[f]
            db.execute("INSERT INTO headers VALUES (?, ?, ?, 'st', 'se', ?, 1, NULL, NULL, 'c-1', '', NULL)",
                       (os.fsdecode(s.key), s.size, s.mtime_ns, f"sop{i}"))
        db.execute("INSERT INTO decoded VALUES (?, ?, ?, 'c-1', 'decode_error', 'bad')",
                   (os.fsdecode(states[files[1]].key), states[files[1]].size, states[files[1]].mtime_ns))
    cache = FileStateCache(path)
    found, decoded = cache.lookup(states), cache.decode_skips(states)
    cache.close()
    assert [found[f].item for f in files] == [HeaderSummary(f, "st", "se", f"sop{i}", 1) for i, f in enumerate(files)]
    assert found[files[0]].case_id == "c-1" and list(decoded) == [files[1]]
