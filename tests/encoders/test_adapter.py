"""medsearch.encoders.adapter: the adapter file round trip, its checks, and an encoder that applies it
with an identity of its own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medsearch.config import EncoderConfig, config_from_dict
from medsearch.encoders import AdaptedEncoder, Adapter, load_adapter, load_encoder, save_adapter
from medsearch.errors import ConfigError


def _adapter(kind: str = "linear", members: int = 3, in_dim: int = 1280) -> Adapter:
    torch.manual_seed(0)
    return Adapter(kind, in_dim, 16, hidden=32, members=members)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_file_round_trip_and_unit_rows(tmp_path, kind):
    adapter = _adapter(kind)
    path = tmp_path / "a.adapter.pt"
    sha = save_adapter(adapter, path, record={"trained_on": "x.npz"})
    loaded = load_adapter(path, sha256=sha)
    assert loaded.spec() == adapter.spec() and loaded.dim == 48
    x = np.random.default_rng(0).normal(size=(5, 1280)).astype(np.float32)
    out = loaded.project(x)
    np.testing.assert_allclose(out, adapter.project(x), atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (5, 48)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the cosine of two outputs is the mean of the members' cosines
    parts = [out[:, i * 16 : (i + 1) * 16] * np.sqrt(3) for i in range(3)]
    assert float(out[0] @ out[1]) == pytest.approx(np.mean([p[0] @ p[1] for p in parts]), abs=1e-5)


def test_encoder_with_adapter_has_its_own_identity(tmp_path):
    path = tmp_path / "a.adapter.pt"
    sha = save_adapter(_adapter(), path)
    plain = load_encoder(EncoderConfig(device="cpu", runtime="torch"))
    adapted = load_encoder(EncoderConfig(device="cpu", runtime="torch", adapter=str(path), adapter_sha256=sha))
    assert isinstance(adapted, AdaptedEncoder) and adapted.dim == 48
    info = adapted.info
    assert info.adapter_sha256 == sha and info.to_dict()["adapter_sha256"] == sha
    assert info.weights_sha256 not in (plain.info.weights_sha256, sha) and len(info.weights_sha256) == 64
    assert (info.name, info.spatial_dims, info.in_channels, info.mean) == (plain.info.name, 2, 3, plain.info.mean)
    assert "adapter_sha256" not in plain.info.to_dict()  # manifests of plain encoders stay as they were
    batch = torch.rand(2, 3, 32, 32) * 2 - 1
    np.testing.assert_allclose(adapted.embed(batch), load_adapter(path).project(plain.embed(batch)), atol=1e-5)
    assert adapted.net is plain.net or isinstance(adapted.net, torch.nn.Module)
    # without the recorded hash the file is still read, and its hash taken
    again = load_encoder(EncoderConfig(device="cpu", runtime="torch", adapter=str(path)))
    assert again.info.weights_sha256 == info.weights_sha256


def test_config_records_the_adapter():
    cfg = config_from_dict({"encoder": {"adapter": "/runs/a.adapter.pt", "adapter_sha256": "a" * 64}})
    assert cfg.to_dict()["encoder"]["adapter"] == "/runs/a.adapter.pt"
    assert dataclasses.replace(cfg.encoder, adapter="", adapter_sha256="") == EncoderConfig()


def _damaged(tmp_path):
    path = tmp_path / "bad.adapter.pt"
    path.write_bytes(b"not a torch file")
    return path


def _other_format(tmp_path):
    path = tmp_path / "old.adapter.pt"
    torch.save({"format": 99, "kind": "linear", "state": {}}, path)
    return path


def _not_adapter(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    return path


BAD_FILES = [
    ("missing", lambda tmp: tmp / "none.adapter.pt", {}, "does not exist"),
    ("damaged", _damaged, {}, "cannot read adapter file"),
    ("other format", _other_format, {}, "has format 99"),
    ("not an adapter", _not_adapter, {}, "is not a medsearch adapter file"),
    ("swapped", lambda tmp: (save_adapter(_adapter(), tmp / "s.pt"), tmp / "s.pt")[1], {"sha256": "0" * 64}, "is not the one this config records"),
]


@pytest.mark.parametrize(("make", "kwargs", "match"), [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_adapter_files_raise_one_line_errors(tmp_path, make, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_adapter(make(tmp_path), **kwargs)
    assert "\n" not in str(info.value)


BAD_SETTINGS = [
    ({"adapter_sha256": "a" * 64}, "adapter_sha256 is set without encoder.adapter"),
    ({"adapter": "a.pt", "adapter_sha256": "xyz"}, "must be the 64 hex digits"),
]


@pytest.mark.parametrize(("settings", "match"), BAD_SETTINGS, ids=["hash alone", "bad hash"])
def test_bad_adapter_settings_raise(settings, match):
    with pytest.raises(ConfigError, match=match):
        EncoderConfig(**settings)


def test_adapter_of_another_dimension_is_refused(tmp_path):
    path = tmp_path / "small.adapter.pt"
    save_adapter(_adapter(in_dim=64), path)
    with pytest.raises(ConfigError, match="takes 64-d embeddings but encoder efficientnet-lite0 gives 1280-d"):
        load_encoder(EncoderConfig(device="cpu", runtime="torch", adapter=str(path)))
    with pytest.raises(ConfigError, match="adapter kind must be one of linear, mlp"):
        Adapter("conv", 8, 4)
