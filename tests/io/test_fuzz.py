"""Fuzzed DICOM bytes fed to the loader: a bad file is skipped with a reason, never a crash or a hang.

Real files are truncated, have bytes flipped, inserted or deleted (mostly in the header, where the
parser lives); random bytes get a DICM preamble. Uncompressed seeds are decoded in this process
(pydicom's own decoder); compressed ones go through ``build_index`` with worker processes only, so
that a C decoder that crashes on a broken stream costs one case and not the test run.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from medsearch import Config, build_index
from medsearch.errors import InvalidStudyError
from medsearch.indexing import SKIP_REPORT
from medsearch.io import (
    HeaderSummary,
    LoadFailure,
    SkippedFile,
    SkipReason,
    load_study,
    load_volume,
    scan,
    summarize_file,
)

# Decoded here: pydicom's own decoder for native pixel data (and a multi-frame, an RGB, big endian,
# implicit VR, a headerless file, a CT of the sample archive).
NATIVE = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "SC_rgb.dcm", "MR_small_bigendian.dcm",
          "MR_small_implicit.dcm", "rtdose.dcm", "OBXXXX1A.dcm"]
# Decoded in worker processes only.
COMPRESSED = ["MR_small_RLE.dcm", "JPEG2000.dcm", "JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm",
              "MR_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_2k_lossless.dcm"]
FAST = Config().replace(preprocess={"size": 64, "slices": 1})
PREAMBLE = b"\0" * 128 + b"DICM"


def _seed_bytes(names: list[str]) -> list[bytes]:
    """The bytes of the pydicom test files that are installed (pydicom-data adds some)."""
    return [Path(path).read_bytes() for path in map(get_testdata_file, names) if path is not None]


NATIVE_SEEDS = _seed_bytes(NATIVE) + [min((SAMPLE / "tcga-luad-ct").glob("*.dcm")).read_bytes()]
ALL_SEEDS = NATIVE_SEEDS + _seed_bytes(COMPRESSED)


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    out = bytearray(data)
    for op, offset, arg in ops:
        offset = min(offset, len(out))
        if op == "truncate":
            del out[offset:]
        elif op == "flip" and offset < len(out):
            out[offset] ^= arg
        elif op == "insert":
            out[offset:offset] = arg
        elif op == "delete":
            del out[offset : offset + arg]
    return bytes(out)


# Offsets mostly in the first 2 KiB (preamble, file meta, header), sometimes anywhere.
_offset = st.one_of(st.integers(0, 2048), st.integers(0, 600_000))
_op = st.one_of(
    st.tuples(st.just("truncate"), _offset, st.just(0)),
    st.tuples(st.just("flip"), _offset, st.integers(1, 255)),
    st.tuples(st.just("insert"), _offset, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _offset, st.integers(1, 64)),
)
mutated_files = st.one_of(
    st.builds(_mutate, st.sampled_from(NATIVE_SEEDS), st.lists(_op, min_size=1, max_size=4)),
    st.builds(lambda tail: PREAMBLE + tail, st.binary(max_size=600)),
    # a plausible file meta group, then noise
    st.builds(lambda tail: _seed_head() + tail, st.binary(max_size=400)),
)


def _seed_head() -> bytes:
    """Preamble and file meta group of a real file: (0002,0000) gives the group's length."""
    data = NATIVE_SEEDS[0]
    return data[: 144 + int.from_bytes(data[140:144], "little")]


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the test run) when the body takes longer than ``seconds``."""

    def hung(signum, frame):
        raise TimeoutError(f"the loader hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated_files)
def test_fuzzed_files_are_read_or_skipped_with_a_reason_never_a_crash(data, tmp_path):
    path = tmp_path / "fuzzed.dcm"
    path.write_bytes(data)
    with _time_limit(30):
        summary = summarize_file(path)
        result = scan([path])
        assert result.n_files == 1 and len(result.skipped) + sum(len(c.files) for c in result.cases) == 1
        if isinstance(summary, SkippedFile):
            assert result.skipped == [summary] and summary.detail
        else:
            assert isinstance(summary, HeaderSummary) and len(result.cases) == 1
        for case in result.cases:
            try:
                volume, skipped = load_volume(case)
            except LoadFailure as e:
                assert [s.path for s in e.skipped] == [path]
                assert isinstance(e.skipped[0].reason, SkipReason) and e.skipped[0].detail
            else:
                assert volume.pixels.dtype == np.float32 and volume.pixels.ndim in (3, 4) and skipped == []
        try:
            load_study(path)
        except InvalidStudyError as e:
            assert "\n" not in str(e)


def test_an_archive_of_fuzzed_files_is_indexed_with_every_file_accounted_for(tmp_path, sample_key):
    """Compressed seeds too: their decoders run in worker processes."""
    rng = random.Random(5)
    archive = tmp_path / "archive"
    archive.mkdir()
    for i in range(40):
        seed = ALL_SEEDS[i % len(ALL_SEEDS)]
        ops = []
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(["truncate", "flip", "flip", "insert", "delete"])
            offset = rng.randrange(0, 2048) if rng.random() < 0.6 else rng.randrange(0, len(seed))
            arg = {"truncate": 0, "flip": rng.randint(1, 255), "insert": rng.randbytes(rng.randint(1, 16)),
                   "delete": rng.randint(1, 64)}[op]
            ops.append((op, offset, arg))
        (archive / f"fuzzed{i:02d}.dcm").write_bytes(_mutate(seed, ops))
    for i in range(6):
        (archive / f"noise{i}.dcm").write_bytes(PREAMBLE + rng.randbytes(rng.randint(0, 3000)))
    for i, seed in enumerate(ALL_SEEDS):  # first in path order: a fuzzed copy is their duplicate
        (archive / f"a-intact{i:02d}.dcm").write_bytes(seed)

    report = build_index(archive, tmp_path / "index", key=sample_key, config=FAST, workers=2, case_timeout=120)
    n_files = sum(1 for _ in archive.iterdir())
    assert report.n_files == n_files and report.accounted
    skipped = pd.read_csv(tmp_path / "index" / SKIP_REPORT, keep_default_na=False)
    assert len(skipped) == len(report.skipped) and skipped["path"].is_unique
    assert skipped["reason"].isin([r.value for r in SkipReason]).all() and (skipped["detail"] != "").all()
    # an intact file is indexed, or it is the same instance as another intact one, or (RT Dose) not an image
    intact = skipped[skipped["path"].str.startswith("a-intact")]
    assert intact["reason"].isin(["duplicate", "not_an_image"]).all() and report.n_cases_added >= 4
    # the same archive again: nothing added, the same report
    again = build_index(archive, tmp_path / "index", key=sample_key, workers=2)
    assert again.n_cases_added == 0 and again.accounted
    assert again.skipped_by_reason == report.skipped_by_reason


def test_a_decoder_panic_is_a_decode_error(tmp_path):
    """Found by fuzzing: pylibjpeg-rle panics (a Rust panic is a BaseException) on a shortened stream."""
    seed = get_testdata_file("MR_small_RLE.dcm")
    if seed is None:
        pytest.skip("MR_small_RLE.dcm is not installed")
    path = tmp_path / "rle.dcm"
    path.write_bytes(_mutate(Path(seed).read_bytes(), [("delete", 5424, 6)]))
    (case,) = scan([path]).cases
    with pytest.raises(LoadFailure) as info:
        load_volume(case)
    (skip,) = info.value.skipped
    assert skip.reason is SkipReason.DECODE_ERROR and "index out of bounds" in skip.detail


@pytest.mark.parametrize("size", [0, 1, 131, 132, 133, 140, 500])
def test_short_files_with_a_preamble_are_skipped(tmp_path, size):
    path = tmp_path / "short.dcm"
    path.write_bytes((PREAMBLE + b"\x02\x00\x00\x00UL\x04\x00")[:size])
    result = scan([path])
    assert result.cases == [] and len(result.skipped) == 1
    assert result.skipped[0].reason in {SkipReason.NOT_DICOM, SkipReason.TRUNCATED, SkipReason.UNREADABLE}
