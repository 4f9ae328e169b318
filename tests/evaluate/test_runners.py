"""Tests of medsearch.evaluate.runners and ``medsearch evaluate``: npz files in every layout, leave-one-out
on the sample index, queries against it, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import Config
from medsearch.deid import SiteKey
from medsearch.errors import ConfigError, InvalidStudyError, KeyFileError
from medsearch.evaluate import EvaluationReport, evaluate_index, evaluate_npz, evaluate_queries

# The exact encoder input does not matter for these tests: small images keep them quick.
SMALL = Config().replace(preprocess={"size": 32})
DOCUMENTED_KEYS = {"dataset", "protocol", "encoder", "n_gallery", "n_queries", "metrics", "per_class", "ci95"}

# --------------------------------------------------------------------------------------------------
# npz files end to end (real encoder, small input)


@pytest.mark.parametrize(
    "shape", [(20, 20), (20, 20, 3), (6, 16, 16)], ids=["gray", "rgb", "volume-3d"]
)
def test_npz_duplicates_are_found_first(tmp_path, shape, make_npz):
    path = make_npz(tmp_path / "d.npz", shape, label_shape=(-1, 1))
    report = evaluate_npz(path, protocol="mahbod2024", config=SMALL, n_resamples=50)
    result = report.result
    assert isinstance(report, EvaluationReport) and report.comparisons == []
    assert (result.n_gallery, result.n_queries, result.protocol) == (12, 4, "mahbod2024")
    assert result.metrics["hit@1"] == 1.0 and result.metrics["map_hits@1"] == 1.0 and result.metrics["precision@1"] == 1.0
    assert result.settings["layout"] == {2: "gray", 3: "rgb" if shape[-1] == 3 else "volume"}[len(shape)]
    assert result.timings["images"] == 16 and result.timings["encode_s"] > 0
    data = report.to_dict()
    assert DOCUMENTED_KEYS <= set(data) and data["headline"] == ["map_hits@5", "mmv@5", "hit@1"]
    json.dumps(data)


def test_npz_volumes_pooled_and_re_ranked_side_by_side(tmp_path, make_npz):
    """``rerank=True``: each 3D volume's slice vectors re-rank its candidates; twins stay first, and the
    report compares the re-ranked run with the pooled one on the same queries."""
    path = make_npz(tmp_path / "v.npz", (6, 16, 16), label_shape=(-1, 1))
    report = evaluate_npz(path, protocol="mahbod2024", config=SMALL.replace(preprocess={"slices": 6}), n_resamples=50, rerank=True)
    pooled, late = report.results
    assert late.name.endswith("+ late interaction") and late.settings["ranking"] == "late interaction"
    assert pooled.settings["ranking"] == "case vector" and late.metrics["hit@1"] == pooled.metrics["hit@1"] == 1.0
    assert len(report.comparisons) == 1 and report.comparisons[0]["encoder"] == late.name


def test_npz_same_split_is_leave_one_out(tmp_path):
    # Each image twice, with its label: leaving the query out, its twin is the only relevant item.
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, (6, 20, 20), dtype=np.uint8)
    path = tmp_path / "pairs.npz"
    np.savez(path, test_images=np.concatenate([images, images]), test_labels=np.tile(np.arange(6), 2))
    result = evaluate_npz(path, gallery_split="test", query_split="test", ks=(1,), config=SMALL, n_resamples=20).result
    assert result.settings["leave_one_out"] is True and result.n_gallery == 12
    assert result.metrics["hit@1"] == 1.0 and result.metrics["recall@1"] == 1.0 and result.metrics["map@r"] == 1.0


NPZ_ERRORS = [
    ("missing-file", {"path": "nope.npz"}, InvalidStudyError, "does not exist"),
    ("protocol-split", {"protocol": "medmnistplus", "query_split": "val"}, ConfigError, "protocol medmnistplus uses the test split as query, not val"),
    ("missing-split", {"gallery_split": "val", "query_split": "train", "layout": "rgb"}, InvalidStudyError, "not the rgb layout"),
    ("twice", {"encoders": ["efficientnet-lite0", "EfficientNet-Lite0"]}, ConfigError, "is given twice"),
    ("unknown-encoder", {"encoders": ["vgg16"]}, ConfigError, "unknown encoder 'vgg16'"),
    ("k-too-large", {"ks": (50,)}, ConfigError, "k = 50 is larger than the gallery searched"),
]


@pytest.mark.parametrize("options, error, message", [c[1:] for c in NPZ_ERRORS], ids=[c[0] for c in NPZ_ERRORS])
def test_npz_errors(tmp_path, options, error, message, make_npz):
    path = make_npz(tmp_path / "x.npz", (20, 20))
    options = dict(options)
    target = tmp_path / options.pop("path") if "path" in options else path
    with pytest.raises(error, match=message):
        evaluate_npz(target, config=SMALL, **options)


def test_real_breastmnist_quick(medmnist_dir):
    # val (78 images) as the gallery keeps it quick; the protocols use train (docs/benchmarks/retrieval.md).
    report = evaluate_npz(
        medmnist_dir / "breastmnist.npz", gallery_split="val", ks=(1, 5), config=SMALL, limit=20, n_resamples=50
    )
    result = report.result
    assert (result.n_gallery, result.n_queries) == (78, 20)
    assert set(result.support) <= {0, 1} and 0.0 <= result.metrics["hit@5"] <= 1.0


# --------------------------------------------------------------------------------------------------
# an index of the sample archive: leave-one-out, and queries against it


def _index_arrays(index_dir):
    from medsearch.store import IndexStore

    store = IndexStore.open(index_dir)
    return store.vectors(), store.cases["Contrast"].astype(str).to_numpy(), store.cases["patient"].to_numpy(dtype=object)


@pytest.mark.parametrize("same_patient", [False, True], ids=["own-case", "same-patient"])
def test_index_leave_one_out(labeled_index, same_patient, brute_force):
    index_dir, _ = labeled_index
    result = evaluate_index(index_dir, label="Contrast", exclude_same_patient=same_patient, ks=(1, 5), n_resamples=50).result
    vectors, labels, patients = _index_arrays(index_dir)
    n = len(labels)
    assert (result.n_gallery, result.n_queries) == (n, n) == (12, 12)
    assert set(result.support) == {"True", "False"} and result.settings["exclude_same_patient"] is same_patient
    expected = brute_force(vectors, labels, vectors, labels, np.arange(n), patients, patients if same_patient else None, 5)
    np.testing.assert_allclose(result.per_query["recall@5"], expected["recall"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["map@r"], expected["map@r"], atol=1e-9)
    np.testing.assert_allclose(result.per_query["mrr"], expected["rr"], atol=1e-9)
    # The sample has one patient with two cases (both without contrast): excluding the patient
    # removes one relevant item from each of their queries.
    shared = [p for p in set(patients) if (patients == p).sum() > 1]
    assert result.settings["n_patients"] == (11 if same_patient else None) and len(shared) == 1


def test_index_default_label_and_errors(labeled_index, tmp_path):
    index_dir, _ = labeled_index
    assert evaluate_index(index_dir, ks=(1,), n_resamples=10).result.settings["label"] == "Contrast"
    with pytest.raises(ConfigError, match="has no label column 'Age'; its label columns: Contrast"):
        evaluate_index(index_dir, label="Age")
    with pytest.raises(ConfigError, match=r"k = 12 is larger than the gallery searched \(11 items"):
        evaluate_index(index_dir, ks=(12,))


def test_queries_against_the_index_leave_their_own_case_out(labeled_index):
    index_dir, key = labeled_index
    report = evaluate_queries(SAMPLE / "tcga-luad-ct", SAMPLE / "labels.csv", index_dir, key=key, ks=(1, 5), n_resamples=50)
    result = report.result
    assert result.n_queries == 12 and result.settings["n_queries_in_index"] == 12
    assert result.settings["exclude_own_case"] is True
    # The queries are the indexed cases themselves: the same as leave-one-out over the index.
    loo = evaluate_index(index_dir, ks=(1, 5), n_resamples=50).result
    for name in ("hit@1", "recall@5", "map@r", "mrr"):
        assert result.metrics[name] == pytest.approx(loo.metrics[name], abs=1e-6), name
    other_key = SiteKey.load(Path(str(index_dir) + "-other.key"), create=True)
    with pytest.raises(KeyFileError, match="built with another site key"):
        evaluate_queries(SAMPLE / "tcga-luad-ct", SAMPLE / "labels.csv", index_dir, key=other_key)


# --------------------------------------------------------------------------------------------------
# the command


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def small_config(tmp_path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text("[preprocess]\nsize = 32\n")
    return path


def test_cli_npz_writes_json_csv_and_figure(runner, tmp_path, small_config, make_npz):
    data = make_npz(tmp_path / "d.npz", (6, 16, 16))  # a 3D file, end to end
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "evaluate", str(data), "--protocol", "mahbod2024", "--config", str(small_config), "--quiet",
        "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--figure", str(out / "r.png"),
    ])
    assert result.exit_code == 0, result.output
    assert "map_hits@5" in result.stdout and "mahbod2024" in result.stdout and "per class" in result.stdout
    data_json = json.loads((out / "r.json").read_text())
    assert DOCUMENTED_KEYS <= set(data_json)
    assert data_json["metrics"]["hit@1"] == 1.0 and data_json["settings"]["layout"] == "volume"
    assert set(data_json["ci95"]) == set(data_json["metrics"]) and "0" in data_json["per_class"]
    assert (out / "r.csv").read_text().startswith("dataset,protocol,encoder,metric,scope,value")
    assert (out / "r.png").stat().st_size > 1000


def test_cli_two_encoders_side_by_side(runner, tmp_path, small_config, make_npz):
    import torch
    from monai.networks import nets

    checkpoint = tmp_path / "r10.pt"
    torch.manual_seed(0)
    torch.save(nets.resnet10(spatial_dims=2, n_input_channels=3, num_classes=2).state_dict(), checkpoint)
    data = make_npz(tmp_path / "d.npz", (20, 20), n_train=15, n_test=6)
    result = runner.invoke(app, [
        "evaluate", str(data), "-k", "1,3", "--config", str(small_config), "--quiet", "--limit", "5",
        "--encoder", "efficientnet-lite0", "--encoder", f"resnet10:{checkpoint}", "--json", str(tmp_path / "two.json"),
    ])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "efficientnet-lite0" in line and "resnet10:r10.pt" in line)
    assert "metric" in header
    assert "resnet10:r10.pt - efficientnet-lite0 on map@r:" in result.stdout and "p = " in result.stdout
    data_json = json.loads((tmp_path / "two.json").read_text())
    assert data_json["n_queries"] == 5 and data_json["other_encoders"][0]["encoder"]["checkpoint"] == str(checkpoint)
    assert data_json["comparisons"][0]["encoder"] == "resnet10:r10.pt"


def test_cli_index_leave_one_out(runner, labeled_index, tmp_path):
    index_dir, _ = labeled_index
    result = runner.invoke(app, [
        "evaluate", "--index", str(index_dir), "--label", "Contrast", "--exclude-same-patient", "-k", "1,5",
        "--json", str(tmp_path / "loo.json"),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "loo.json").read_text())
    assert data["n_queries"] == 12 and data["ks"] == [1, 5] and data["settings"]["exclude_same_patient"] is True


CLI_ERRORS = [
    ("bad-npz", lambda p, npz: ["evaluate", str(p / "missing.npz")], "missing.npz does not exist"),
    ("nothing", lambda p, npz: ["evaluate"], "nothing to evaluate"),
    ("bad-k", lambda p, npz: ["evaluate", str(npz(p / "x.npz", (8, 8))), "-k", "1,five"], "-k takes whole numbers"),
    ("npz-only-option", lambda p, npz: ["evaluate", "--index", str(p), "--protocol", "mahbod2024"], "--protocol apply to a DATA.npz evaluation only"),
    ("queries-without-labels", lambda p, npz: ["evaluate", "--index", str(p), "--queries", str(p)], "--queries needs --labels"),
    ("not-an-index", lambda p, npz: ["evaluate", "--index", str(p)], "is not a medsearch index"),
    ("bad-protocol", lambda p, npz: ["evaluate", str(npz(p / "x.npz", (8, 8))), "--protocol", "trec"], "unknown protocol 'trec'"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CLI_ERRORS], ids=[c[0] for c in CLI_ERRORS])
def test_cli_errors_are_one_line(runner, tmp_path, args, message, make_npz):
    result = runner.invoke(app, args(tmp_path, make_npz))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
