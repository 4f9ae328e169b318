"""The ONNX Runtime path: same embeddings as eager torch, a cache that survives damage, runtime choice."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from conftest import SAMPLE
from torch import nn

from medsearch.config import Config, EncoderConfig, PreprocessConfig
from medsearch.encoders import EncoderInfo, OnnxEncoder, load_encoder, resolve_runtime
from medsearch.errors import ConfigError
from medsearch.transforms import preprocess_volume

QUERY = SAMPLE / "tcga-luad-ct" / "ID_0050_AGE_0074_CONTRAST_0_CT.dcm"


def _ct_batch() -> torch.Tensor:
    """Two real CT slices (pydicom's CT and a sample slice) and one image of noise, as the encoder sees them."""
    batches = []
    for ds in (pydicom.examples.ct, pydicom.dcmread(QUERY)):
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        batches.append(preprocess_volume(hu[None], config=PreprocessConfig(), modality="CT", rgb=False))
    noise = torch.rand(1, 3, 224, 224) * 2 - 1
    return torch.cat([*batches, noise])


@pytest.fixture(scope="module")
def lite0_onnx() -> OnnxEncoder:
    """The default encoder as ``load_encoder`` gives it on the CPU: ONNX Runtime, from the user's cache."""
    encoder = load_encoder(EncoderConfig(device="cpu"), input_size=224)
    assert isinstance(encoder, OnnxEncoder) and encoder.cached_file((3, 224, 224)).is_file()
    return encoder


def test_onnx_embeddings_match_eager_torch(lite0_onnx):
    batch = _ct_batch()
    eager = load_encoder(EncoderConfig(device="cpu", runtime="torch")).embed(batch)
    onnx = lite0_onnx.embed(batch)
    assert onnx.shape == eager.shape == (3, 1280) and onnx.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)
    assert float((onnx * eager).sum(axis=1).min()) >= 0.9999
    # numpy input and batches larger than batch_size give the same rows
    many = np.concatenate([batch.numpy()] * 7)
    np.testing.assert_allclose(lite0_onnx.embed(many)[-3:], onnx, atol=1e-5)
    assert lite0_onnx.embed(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 1280)


def test_a_warm_cache_needs_no_torch_network(lite0_onnx):
    def no_torch() -> nn.Module:
        raise AssertionError("the cached export should have been used")

    again = OnnxEncoder(lite0_onnx.info, no_torch, cache=lite0_onnx.cache)
    again.prepare((3, 224, 224))
    batch = _ct_batch()[:1]
    np.testing.assert_array_equal(again.embed(batch), lite0_onnx.embed(batch))


def test_the_runtime_does_not_change_the_encoder_identity():
    onnx = load_encoder(EncoderConfig(device="cpu", runtime="onnx"))
    eager = load_encoder(EncoderConfig(device="cpu", runtime="torch"))
    assert onnx.runtime == "onnx" and eager.runtime == "torch"
    assert onnx.info == eager.info


def test_an_index_is_queried_alike_through_either_runtime(sample_index):
    from medsearch.search import Searcher

    searchers = {}
    for runtime in ("torch", "onnx"):
        searcher = Searcher(sample_index)
        config = searcher.config.replace(encoder={"runtime": runtime})
        searchers[runtime] = Searcher(sample_index, config=config)
        assert searchers[runtime].encoder.runtime == runtime
    results = {name: s.search(QUERY, k=4).to_dict()["results"] for name, s in searchers.items()}
    assert [m["case_id"] for m in results["torch"]] == [m["case_id"] for m in results["onnx"]]
    np.testing.assert_allclose(
        [m["distance"] for m in results["torch"]], [m["distance"] for m in results["onnx"]], atol=1e-4
    )


# -- the cache, with a tiny network so that each export takes a fraction of a second -----------------


class _Tiny(nn.Module):
    def __init__(self, fail_export: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.fail_export = fail_export

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail_export and torch.onnx.is_in_onnx_export():
            raise RuntimeError("this network cannot be exported")
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


TINY = EncoderInfo(name="tiny", dim=8, weights_sha256="ab" * 32)


class _Builder:
    """Builds the tiny network and counts how often it was asked to."""

    def __init__(self, fail_export: bool = False) -> None:
        self.calls = 0
        self.fail_export = fail_export

    def __call__(self) -> nn.Module:
        self.calls += 1
        return _Tiny(self.fail_export)


def test_export_is_cached_per_input_shape(tmp_path):
    build = _Builder()
    encoder = OnnxEncoder(TINY, build, cache=tmp_path)
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    out = encoder.embed(x)
    reference = torch.nn.functional.normalize(_Tiny()(torch.from_numpy(x)), dim=1).detach().numpy()
    assert float((out * reference).sum(axis=1).min()) >= 0.9999
    encoder.embed(np.zeros((1, 3, 24, 24), np.float32))
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".onnx", ".json"))
    assert names == [
        f"tiny-{'ab' * 10}-3x16x16-v1.json", f"tiny-{'ab' * 10}-3x16x16-v1.onnx",
        f"tiny-{'ab' * 10}-3x24x24-v1.json", f"tiny-{'ab' * 10}-3x24x24-v1.onnx",
    ]
    assert not list(tmp_path.glob("*.tmp")), "a temporary export was left behind"
    fresh = _Builder()
    OnnxEncoder(TINY, fresh, cache=tmp_path).embed(x)
    assert fresh.calls == 0


DAMAGE = [
    ("truncated", lambda onnx, record: onnx.write_bytes(onnx.read_bytes()[:100])),
    ("flipped byte", lambda onnx, record: onnx.write_bytes(onnx.read_bytes()[:-1] + b"\x00")),
    ("record missing", lambda onnx, record: record.unlink()),
    ("record garbage", lambda onnx, record: record.write_text("{not json")),
    ("model missing", lambda onnx, record: onnx.unlink()),
]


@pytest.mark.parametrize(("name", "damage"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_cache_is_exported_again(tmp_path, name, damage):
    x = np.ones((1, 3, 16, 16), np.float32)
    first = OnnxEncoder(TINY, _Builder(), cache=tmp_path)
    expected = first.embed(x)
    onnx = first.cached_file((3, 16, 16))
    damage(onnx, onnx.with_suffix(".json"))
    build = _Builder()
    np.testing.assert_allclose(OnnxEncoder(TINY, build, cache=tmp_path).embed(x), expected, atol=1e-6)
    assert build.calls == 1


def test_a_failed_export_raises_or_falls_back_to_torch(tmp_path):
    x = np.ones((2, 3, 16, 16), np.float32)
    strict = OnnxEncoder(TINY, _Builder(fail_export=True), cache=tmp_path, strict=True)
    with pytest.raises(ConfigError, match="cannot export encoder tiny to ONNX.*use encoder.runtime 'torch'"):
        strict.embed(x)
    lenient = OnnxEncoder(TINY, _Builder(fail_export=True), cache=tmp_path, strict=False)
    out = lenient.embed(x)
    reference = torch.nn.functional.normalize(_Tiny()(torch.from_numpy(x)), dim=1).detach().numpy()
    np.testing.assert_allclose(out, reference, atol=1e-5)
    assert not list(tmp_path.glob("*.onnx"))


# -- choosing the runtime -----------------------------------------------------------------------------


def test_auto_picks_onnx_on_the_cpu_when_onnxruntime_is_installed(monkeypatch):
    import medsearch.encoders.onnx as onnx_runtime

    assert resolve_runtime("auto", "cpu") == ("onnx", "cpu")
    assert resolve_runtime("torch", "cpu") == ("torch", "cpu")
    assert resolve_runtime("onnx", "auto") == ("onnx", "cpu")
    monkeypatch.setattr(onnx_runtime, "_have_onnxruntime", lambda: False)
    assert resolve_runtime("auto", "cpu") == ("torch", "cpu")
    with pytest.raises(ConfigError, match="onnxruntime is not installed; pip install onnxruntime"):
        resolve_runtime("onnx", "cpu")


BAD_RUNTIMES = [
    (dict(runtime="tensorrt"), "encoder.runtime must be 'auto', 'torch' or 'onnx', got 'tensorrt'"),
    (dict(cuda_precision="int4"), "encoder.cuda_precision must be"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_RUNTIMES)
def test_bad_runtime_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EncoderConfig(**kwargs)


def test_onnx_on_cuda_is_refused():
    with pytest.raises(ConfigError, match="runs on the CPU; use device 'cpu' or 'auto'"):
        resolve_runtime("onnx", "cuda")


def test_runtime_is_recorded_but_not_compared():
    # The index check compares the encoder's identity and the preprocessing only.
    a = Config().replace(encoder={"runtime": "torch"})
    b = Config().replace(encoder={"runtime": "onnx"})
    assert a.preprocess_hash() == b.preprocess_hash()
    assert a.to_dict()["encoder"]["runtime"] == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "float32"])
def test_cuda_autocast_matches_the_cpu(precision):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batch = _ct_batch()
    cpu = load_encoder(EncoderConfig(device="cpu", runtime="torch")).embed(batch)
    gpu = load_encoder(EncoderConfig(device="cuda", runtime="torch", cuda_precision=precision, batch_size=2))
    assert gpu.runtime == "torch" and gpu.device.type == "cuda"
    out = gpu.embed(batch)
    assert out.dtype == np.float32 and out.shape == cpu.shape
    assert float((out * cpu).sum(axis=1).min()) > (0.9999 if precision == "float32" else 0.999)
    # a numpy batch and a batch already on the GPU give the same rows
    np.testing.assert_allclose(gpu.embed(batch.numpy()), out, atol=1e-3)
    np.testing.assert_allclose(gpu.embed(batch.cuda()), out, atol=1e-3)


def test_an_unwritable_cache_falls_back_or_says_what_to_do(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    x = np.ones((1, 3, 16, 16), np.float32)
    with pytest.raises(ConfigError, match="cannot write the ONNX cache.*set XDG_CACHE_HOME"):
        OnnxEncoder(TINY, _Builder(), cache=blocker / "onnx").embed(x)
    out = OnnxEncoder(TINY, _Builder(), cache=blocker / "onnx", strict=False).embed(x)
    assert out.shape == (1, 8)
