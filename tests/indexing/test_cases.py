"""The per-case work (medsearch.indexing.cases): decoding only the slices that are used gives the same
encoder input; which slices those are; a case or a query study that needs more memory than a worker
may use, or meets a bug, fails with a reason that quotes nothing; headers read in this process let no
pydicom log line out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from hostile.files import SEEDED, seeded_value
from indexing.archives import CT, FAST, _derive
from pydicom.uid import generate_uid

from medsearch import Config
from medsearch.embedding import encoder_input
from medsearch.encoders import load_encoder
from medsearch.indexing import IndexOptions, cases
from medsearch.io import SkipReason, find_files, group_headers, load_study, load_volume, summarize_file

# -- only the slices that are used get decoded, and they are the same ------------------------------------


def _load_whole(case):
    """The loader without slice selection (a different function, so prepare_case decodes everything)."""
    return load_volume(case)


def _describe(cid, case, volume):
    """The parts of a case row that depend on the volume (a module-level function: it runs in workers)."""
    return {"case_id": cid, "n_slices": int(volume.pixels.shape[0]), "shape": volume.pixels.shape[1:],
            "spacing": volume.spacing, "modality": volume.modality}


def _series_from_sample(root: Path, n: int) -> Path:
    study, series = generate_uid(entropy_srcs=["used", "study"]), generate_uid(entropy_srcs=["used", "series"])
    for i in range(n):
        _derive(CT[i % len(CT)], root / f"slice{i:02d}.dcm", seed=f"used-{i}", study=study, series=series, z=float(3 * i))
    return root


def _prepared_both_ways(folder: Path, config: Config, encoder, key, limit: int = 4) -> list[tuple]:
    """prepare_case on the first ``limit`` series of several files, with the default loader and whole."""
    groups, _ = group_headers(summarize_file(p) for p in find_files(folder))
    groups = [g for g in groups if len(g.files) > 1][:limit]
    assert groups, f"no series of several files under {folder}"
    describe = _describe
    out = []
    for i, group in enumerate(groups):
        job = cases.CaseJob(i, f"case-{i}", group)
        used = cases.prepare_case(job, cases._Setup(config=config, encoder=encoder.info, describe=describe))
        whole = cases.prepare_case(job, cases._Setup(config=config, encoder=encoder.info, describe=describe,
                                                     options=IndexOptions(load=_load_whole)))
        out.append((used, whole))
    return out


def _check_same(pairs, encoder) -> None:
    for used, whole in pairs:
        assert isinstance(used, cases.PreparedCase) and isinstance(whole, cases.PreparedCase)
        np.testing.assert_array_equal(used.images, whole.images)
        np.testing.assert_array_equal(used.thumbnail, whole.thumbnail)
        assert used.row == whole.row and used.skipped == whole.skipped and used.n_files == whole.n_files
        np.testing.assert_array_equal(encoder.embed(used.images), encoder.embed(whole.images))


@pytest.mark.parametrize("slices", [5, 3])
def test_decoding_only_the_used_slices_gives_the_same_vectors_on_a_sample_series(tmp_path, sample_key, slices):
    config = Config().replace(preprocess={"slices": slices})
    encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
    _check_same(_prepared_both_ways(_series_from_sample(tmp_path / "series", 11), config, encoder, sample_key), encoder)


def test_decoding_only_the_used_slices_gives_the_same_vectors_on_a_real_series(shared_dicom, sample_key):
    config = Config()
    encoder = load_encoder(config.encoder, input_size=config.preprocess.size)
    for folder in ("ct-head-ge-gantry-tilt", "mr-philips-fmri"):
        _check_same(_prepared_both_ways(shared_dicom / folder, config, encoder, sample_key, limit=2), encoder)


@pytest.mark.parametrize(("preprocess", "spatial_dims", "expected"), [
    ({"slices": 5}, 2, [0, 2, 4, 5, 7]),
    ({"slices": 3}, 2, [1, 4, 6]),  # 4: the thumbnail's middle slice
    ({"slice_mode": "triplanar"}, 2, None),
    ({"slices": 5}, 3, None),
])
def test_used_slices_follow_the_preprocessing(preprocess, spatial_dims, expected):
    config = Config().replace(preprocess=preprocess)
    info = load_encoder(FAST.encoder, input_size=64).info
    info = type(info)(**{**info.__dict__, "spatial_dims": spatial_dims})
    select = cases._used_slices(config, info)
    assert (select(8) if select is not None else None) == expected


# -- what does not fit, or meets a bug, fails with a reason -------------------------------------------


def _needs_too_much(case):
    raise MemoryError


def _buggy(case):
    raise RuntimeError("unexpected value 'SLOPEZQX' in the header")


def _setup(**options) -> cases._Setup:
    return cases._Setup(config=FAST, encoder=load_encoder(FAST.encoder, input_size=64).info, describe=None,
                        options=IndexOptions(**options))


def test_a_case_that_needs_more_memory_than_a_worker_may_use_is_too_large(mixed_archive):
    groups, _ = group_headers(summarize_file(p) for p in find_files(mixed_archive / "series4"))
    failed = cases.prepare_case(cases.CaseJob(0, "c0", groups[0]), _setup(load=_needs_too_much))
    assert isinstance(failed, cases.FailedCase) and not failed.transient
    assert {s.reason for s in failed.skipped} == {SkipReason.TOO_LARGE} and len(failed.skipped) == 4
    assert "more memory to decode than a worker process may use" in failed.skipped[0].detail


def test_a_query_study_becomes_the_encoder_input_of_a_search():
    path = min((SAMPLE / "tcga-luad-ct").glob("*.dcm"))
    setup = _setup()
    prepared = cases.prepare_study(path, setup)
    assert isinstance(prepared, cases.PreparedStudy) and prepared.modality == "CT" and prepared.n_slices == 1
    expected = encoder_input(load_study(path)[1], setup.encoder, FAST).numpy()
    np.testing.assert_array_equal(prepared.images, expected)


@pytest.mark.parametrize(("load", "kind", "message"), [
    (None, "InvalidStudyError", "Rescale Slope or Rescale Intercept is not a number"),
    (_needs_too_much, "InvalidStudyError", "needs more memory to decode than the service may use"),
    (_buggy, "internal", "RuntimeError"),
])
def test_a_query_study_that_fails_says_why_and_quotes_nothing(tmp_path, load, kind, message):
    path = seeded_value(tmp_path / "seeded.dcm")
    failed = cases.prepare_study(path, _setup(**({"load": load} if load else {})))
    assert isinstance(failed, cases.StudyError) and failed.kind == kind
    assert message in failed.message and SEEDED not in failed.message


# -- pydicom's log lines --------------------------------------------------------------------------


def test_headers_read_here_leave_no_pydicom_log_lines(mixed_archive, caplog, monkeypatch):
    # pydicom's log lines quote header values; reading headers in this process must not let them out
    def chatty(path, **options):
        logging.getLogger("pydicom").warning("PatientName=Doe^Jane in %s", path)
        return summarize_file(path, **options)

    monkeypatch.setattr(cases, "summarize_file", chatty)
    caplog.set_level(logging.DEBUG)
    logger = logging.getLogger("pydicom")
    level, disabled = logger.level, logger.disabled  # the CLI's tests may have quieted it for good
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    try:
        found, _ = cases._scan_files(list(find_files(mixed_archive))[:3], None)
        assert len(found) == 3
        assert "Doe^Jane" not in caplog.text
        logger.warning("after: Smith")
        assert "after: Smith" in caplog.text  # the logger is given back as it was
    finally:
        logger.setLevel(level)
        logger.disabled = disabled


def test_slices_by_millimetres_decode_only_what_the_encoder_sees(tmp_path):
    """With ``slice_spacing_mm``, the loader is given the ordered stack's gap and reads the slices a
    selection by density takes (and the thumbnail's middle one): the same encoder input as a full decode."""
    from series import phantom, write_series

    from medsearch.config import load_config
    from medsearch.embedding import encoder_array
    from medsearch.encoders import load_encoder
    from medsearch.indexing.cases import _used_slices
    from medsearch.io import load_volume, scan

    config = load_config("default").replace(preprocess={"slice_spacing_mm": 5.0})
    info = load_encoder(config.encoder).info
    case = scan(write_series(tmp_path / "s", phantom(4), gap=2.5)).cases[0]
    fast, _ = load_volume(case, select=_used_slices(config, info))
    full, _ = load_volume(case)
    assert fast.decoded == (1, 3, 5, 7, 9, 11, 12, 13, 15, 17, 19, 21, 23)  # one per 5 mm, and the middle
    np.testing.assert_array_equal(encoder_array(fast, info, config), encoder_array(full, info, config))
