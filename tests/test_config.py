from __future__ import annotations

from pathlib import Path

import pytest

from medsearch.config import Config, IndexConfig, IndexType, Metric, SliceMode, load_config, preset_names
from medsearch.errors import ConfigError


def test_presets_ship_default_and_chest_ct():
    assert {"default", "chest-ct", "regions"} <= set(preset_names())
    regions = load_config("regions")  # every slice up to 2 mm, with tiles: slabs in layout, boxes against tiles
    assert regions.preprocess.slice_spacing_mm == 2.0 and regions.index.crop_grid == 2
    assert regions.preprocess.ct_window == load_config("default").preprocess.ct_window
    assert load_config() == Config()
    chest = load_config("chest-ct")
    assert chest.preprocess.ct_window == (-600.0, 1500.0)
    assert chest.preprocess_hash() != Config().preprocess_hash()


def test_top_level_configs_folder_is_the_presets():
    root = Path(__file__).resolve().parents[1]
    assert sorted(p.stem for p in (root / "configs").glob("*.toml")) == preset_names()


def test_enums_accept_their_string_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[preprocess]\nslice_mode = "triplanar"\n[index]\nmetric = "l2"\n')
    cfg = load_config(path)
    assert cfg.preprocess.slice_mode is SliceMode.TRIPLANAR
    assert cfg.index.metric is Metric.L2
    assert cfg.to_dict()["index"]["metric"] == "l2"


BAD_CONFIGS = [
    ("[preprocess]\nsize = 4\n", "preprocess.size"),
    ("[preprocess]\nct_window = [40, -1]\n", "width must be positive"),
    ("[preprocess]\npercentiles = [99, 1]\n", "percentiles"),
    ("[preprocess]\nslice_mode = \"diagonal\"\n", "slice_mode must be one of"),
    ("[preprocess]\nbogus = 1\n", "unknown key"),
    ("[whatever]\na = 1\n", "unknown section"),
    ("[index]\nmetric = \"hamming\"\n", "index.metric"),
    ("[encoder]\ndevice = \"tpu\"\n", "encoder.device"),
    ("not toml = = =", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_says_which_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_and_unknown_preset():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere/x.toml")
    with pytest.raises(ConfigError, match="presets: chest-ct, ct3d, default, regions"):
        load_config("no-such-preset")


def test_replace_changes_one_key():
    cfg = Config().replace(encoder={"device": "cpu"})
    assert cfg.encoder.device == "cpu"
    assert cfg.preprocess == Config().preprocess


@pytest.mark.parametrize("values, message", [
    ({"index_type": "annoy"}, "index.index_type must be one of 'auto', 'flat', 'hnsw', 'ivfpq', 'ivfpq-disk', got 'annoy'"),
    ({"nprobe": 0}, "index.nprobe must be a whole number of at least 1, got 0"),
    ({"memory_budget_mb": "lots"}, "index.memory_budget_mb must be a whole number"),
    ({"crop_grid": 1}, r"index.crop_grid must be 0 \(no crop vectors\), 2, 3 or 4 \(tiles a side\), got 1"),
    ({"crop_grid": True}, "index.crop_grid must be 0"),
])
def test_index_config_rejects_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        IndexConfig(**values)


def test_index_type_accepts_its_string_value():
    assert IndexConfig(index_type="hnsw").index_type is IndexType.HNSW
