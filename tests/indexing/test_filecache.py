"""The local file-state cache (medsearch.indexing.filecache): owner-only, never exported, no UID in
it; it keeps each file's slice geometry."""

from __future__ import annotations

import math
import stat

import pydicom

from medsearch.indexing import FILE_STATE
from medsearch.io import find_files
from medsearch.sharing import export_index, shareability_problems

# -- the file-state cache ---------------------------------------------------------------------------


def test_the_file_state_cache_is_local_owner_only_and_holds_no_uid(serial_index, mixed_archive, tmp_path):
    index = serial_index[0]
    cache = index / FILE_STATE
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
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
    assert FILE_STATE in exported.left_out and not (tmp_path / "shared" / FILE_STATE).exists()


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
