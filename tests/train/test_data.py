"""medsearch.train.data: the test split of an npz is never read."""

from __future__ import annotations

from train.tiny import FAST

from medsearch.train import train_encoder


def test_never_reads_the_test_split(tiny_npz, tmp_path, monkeypatch):
    import medsearch.train.data as train_module

    seen = []
    real = train_module.load_npz_split

    def spy(path, split, **kwargs):
        seen.append(split)
        return real(path, split, **kwargs)

    monkeypatch.setattr(train_module, "load_npz_split", spy)
    train_encoder(tiny_npz, out=tmp_path / "e.pt", epochs=1, **{**FAST, "steps_per_epoch": 1})
    assert sorted(seen) == ["train", "val"]
