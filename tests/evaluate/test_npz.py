"""Tests of medsearch.evaluate.npz: encoder specs, batched embedding of a split, the embedding cache."""

from __future__ import annotations

import numpy as np
import pytest

from medsearch.config import Config
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError
from medsearch.evaluate import embed_npz_split, evaluate_npz, parse_encoder_spec
from medsearch.io import load_npz_split
from medsearch.search import embed_volume

# The exact encoder input does not matter for these tests: small images keep them quick.
SMALL = Config().replace(preprocess={"size": 32})


def test_parse_encoder_spec():
    assert parse_encoder_spec("efficientnet-lite0").name == "efficientnet-lite0"
    spec = parse_encoder_spec("resnet18:/w/r18.pt", SMALL.encoder)
    assert (spec.name, spec.checkpoint) == ("resnet18", "/w/r18.pt")
    with pytest.raises(ConfigError, match="has no name"):
        parse_encoder_spec(":x.pt")


@pytest.mark.parametrize("shape", [(20, 20), (20, 20, 3), (6, 16, 16)], ids=["gray", "rgb", "volume-3d"])
def test_batched_embedding_equals_embed_volume(tmp_path, shape, make_npz):
    split = load_npz_split(make_npz(tmp_path / "e.npz", shape, n_train=5), "train")
    encoder = load_encoder(SMALL.encoder)
    batched = embed_npz_split(split, encoder, SMALL, images_per_batch=3)
    one_by_one = np.stack([embed_volume(v, encoder, SMALL) for v in split.volumes()])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_npz_limit_cache_and_two_encoders(tmp_path, make_npz):
    import torch
    from monai.networks import nets

    path = make_npz(tmp_path / "c.npz", (20, 20), n_train=15, n_test=10)
    checkpoint = tmp_path / "r10.pt"
    torch.manual_seed(0)
    torch.save(nets.resnet10(spatial_dims=2, n_input_channels=3, num_classes=2).state_dict(), checkpoint)
    cache = tmp_path / "cache"
    options = {"ks": (1, 3), "config": SMALL, "limit": 6, "seed": 1, "cache_dir": cache, "n_resamples": 20}
    first = evaluate_npz(path, encoders=["efficientnet-lite0", f"resnet10:{checkpoint}"], **options)
    assert [r.name for r in first.results] == ["efficientnet-lite0", "resnet10:r10.pt"]
    assert all(r.n_queries == 6 for r in first.results)
    (comparison,) = first.comparisons
    assert comparison["metric"] == "map@r" and comparison["encoder"] == "resnet10:r10.pt"
    assert len(list(cache.glob("*.npy"))) == 4  # gallery and queries, per encoder
    second = evaluate_npz(path, encoders=["efficientnet-lite0"], **options)
    assert second.result.timings.get("cache_hits") == 2 and "encode_s" not in second.result.timings
    assert second.result.metrics == first.results[0].metrics
    np.testing.assert_array_equal(second.result.query_labels, first.results[0].query_labels)
    data = first.to_dict()
    assert data["encoder"]["name"] == "efficientnet-lite0" and len(data["other_encoders"]) == 1
    assert data["comparisons"][0]["baseline"] == "efficientnet-lite0"
    frame = first.to_frame()
    assert set(frame["encoder"]) == {"efficientnet-lite0", "resnet10:r10.pt"} and {"all", "macro", "class=0"} <= set(frame["scope"])
