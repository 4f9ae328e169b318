"""Index types (flat, hnsw, ivfpq, auto) and metadata filters, checked against exact search."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import SAMPLE
from faiss.contrib.evaluation import check_ref_knn_with_draws
from typer.testing import CliRunner

from medsearch.cli import app
from medsearch.config import IndexType
from medsearch.errors import FilterError, IndexCorruptError
from medsearch.filters import filter_mask, parse_filters
from medsearch.store import MANIFEST, IndexStore, choose_index_type
from medsearch.store import faiss_index as faiss_module
from medsearch.store import files as files_module

DIM = 16
N = 12_000  # enough to train ivfpq (IVFPQ_MIN_VECTORS)
QUERY = SAMPLE / "tcga-luad-ct" / "ID_0000_AGE_0060_CONTRAST_1_CT.dcm"


def _clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """Vectors around 50 centres, like embeddings of a few kinds of images (not uniform noise)."""
    centres = np.random.default_rng(1234).normal(size=(50, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return centres[rng.integers(0, 50, n)] + rng.normal(scale=0.6, size=(n, dim)).astype(np.float32)


def _table(n: int) -> pd.DataFrame:
    i = np.arange(n)
    decade = (i % 10) * 10
    return pd.DataFrame({
        "case_id": [f"c-{j:05d}" for j in i],
        "modality": np.where(i % 3 == 0, "CT", "MR"),
        "age_band": [f"{d}-{d + 9}" if d < 90 else "90+" for d in decade],
        "Contrast": i % 2 == 0,
        "n_slices": i % 7,
        "model": np.where(i % 5 == 0, "LightSpeed Ultra", "Discovery STE"),
    })


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(data: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None):
    """Independent reference: an IndexFlatIP over (a subset of) the normalized data."""
    rows = np.arange(len(data)) if rows is None else rows
    ref = faiss.IndexFlatIP(data.shape[1])
    ref.add(_unit(data[rows]))
    sims, ids = ref.search(_unit(queries), k)
    return (1 - sims).astype(np.float32), rows[ids]


def _recall(ids: np.ndarray, ref_ids: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / ref_ids.shape[1] for a, b in zip(ids, ref_ids)]))


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return _clustered(N)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return _clustered(40, seed=7)


@pytest.fixture(autouse=True, scope="module")
def quick_opq():
    """Fewer OPQ rounds: the same code path, a fraction of the training time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(faiss_module, "_OPQ_ROUNDS", 3)
        yield


@pytest.fixture(scope="module")
def stores(tmp_path_factory, data) -> dict[str, IndexStore]:
    """One committed store per index type over the same data (built once: ivfpq trains)."""
    out = {}
    for kind in ("flat", "hnsw", "ivfpq"):
        path = tmp_path_factory.mktemp(kind) / "ix"
        store = IndexStore.create(path, dim=DIM, encoder={}, preprocess={}, index_type=kind)
        store.add(data, _table(N))
        store.commit()
        out[kind] = store
    return out


# -- the auto rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, dim, budget_mb, expected", [
    (0, 1280, 8192, IndexType.FLAT),
    (10_000, 1280, 8192, IndexType.FLAT),  # 49 MB of vectors: exact
    (100_000, 1280, 8192, IndexType.HNSW),
    (1_000_000, 1280, 8192, IndexType.HNSW),  # 5.4 GB fits 8 GB
    (1_000_000, 1280, 4096, IndexType.IVFPQ),
    (2_000_000, 1280, 8192, IndexType.IVFPQ),
    (20_000, 512, 8192, IndexType.FLAT),  # 41 MB
    (5_000, 1280, 10, IndexType.FLAT),  # nothing smaller can be trained on 5,000 vectors
])
def test_auto_rule(n, dim, budget_mb, expected):
    assert choose_index_type(n, dim, memory_budget_mb=budget_mb) is expected


def test_an_on_disk_index_keeps_twice_the_dimensions_for_its_coarse_quantizer():
    # ivfpq-disk is built as ivfpq in memory; only the OPQ output differs (512 of 1280 against 256)
    kind, disk, _ = faiss_module.plan(IndexType.IVFPQ_DISK, 2_000_000, 1280, memory_budget_mb=140)
    _, memory, _ = faiss_module.plan(IndexType.IVFPQ, 2_000_000, 1280, memory_budget_mb=140)  # 64-byte codes
    assert kind is IndexType.IVFPQ and disk["m"] == memory["m"] == 64
    assert (disk["opq_dim"], memory["opq_dim"]) == (512, 256)
    assert (disk["rerank"], memory["rerank"]) == (faiss_module.DISK_RERANK, faiss_module.IVFPQ_RERANK)
    assert faiss_module.opq_dim(48, 64, on_disk=True) == 48  # never more than the vectors have


# -- search against an exact reference ----------------------------------------------------------------

def test_flat_is_exact_with_and_without_a_filter(stores, data, queries):
    store = stores["flat"]
    hits = store.search(queries, 10)
    check_ref_knn_with_draws(*_exact(data, queries, 10), hits.distances, hits.ids)
    where = ["modality=CT", "age>=60"]
    rows = np.flatnonzero(store.matching(where))
    hits = store.search(queries, 10, where=where)
    check_ref_knn_with_draws(*_exact(data, queries, 10, rows), hits.distances, hits.ids)


@pytest.mark.parametrize("kind, floor", [("hnsw", 0.95), ("ivfpq", 0.9)])
def test_approximate_types_find_most_exact_neighbours(stores, data, queries, kind, floor):
    store = stores[kind]
    assert store.index_type is IndexType(kind)
    ref_dist, ref_ids = _exact(data, queries, 10)
    hits = store.search(queries, 10)
    assert _recall(hits.ids, ref_ids) >= floor
    # distances keep their meaning: 1 - cosine of the case returned (ivfpq re-ranks exactly)
    np.testing.assert_allclose(hits.distances, 1 - np.einsum("qd,qkd->qk", _unit(queries), _unit(data)[hits.ids]), atol=1e-4)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
@pytest.mark.parametrize("where", [["modality=CT", "age>=60"], ["n_slices=3", "age<30", "Contrast=True"]])
def test_filtered_searches_return_only_matches_and_agree_with_exact(stores, data, queries, kind, where):
    store = stores[kind]
    mask = store.matching(where)
    rows = np.flatnonzero(mask)
    hits = store.search(queries, 10, where=where)
    assert hits.ids.shape == (len(queries), 10) and (hits.ids >= 0).all()
    assert mask[hits.ids].all()
    _, ref_ids = _exact(data, queries, 10, rows)
    assert _recall(hits.ids, ref_ids) >= (1.0 if kind == "flat" else 0.9)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_a_filtered_query_returns_k_whenever_k_cases_match(stores, queries, kind):
    store = stores[kind]
    # a rare subset spread over the whole collection: 1 case in 210
    where = ["modality=CT", "age>=90", "n_slices=6", "Contrast=False"]
    n_match = int(store.matching(where).sum())
    assert 10 < n_match < 100
    hits = store.search(queries, 10, where=where)
    assert (hits.ids >= 0).all() and hits.ids.shape == (len(queries), 10)
    # fewer matches than k: all of them
    few = store.search(queries[:3], 50, where=where + ["age_band=90+", "n_slices>5", "case_id~c-0"])
    expected = int(store.matching(where + ["case_id~c-0"]).sum())
    assert few.ids.shape == (3, expected) and (few.ids >= 0).all()
    # none: an empty result, not an error
    assert store.search(queries[:2], 5, where="modality=PT").ids.shape == (2, 0)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_a_filter_over_many_cases_goes_through_the_faiss_selector(stores, queries, kind, monkeypatch):
    store = stores[kind]
    monkeypatch.setattr(faiss_module, "_EXACT_FILTER_MAX", 10)
    calls = []
    original = faiss_module.exact_search
    monkeypatch.setattr(faiss_module, "exact_search", lambda *a, **kw: calls.append(a) or original(*a, **kw))
    hits = store.search(queries, 10, where=["modality=MR"])
    assert store.matching("modality=MR")[hits.ids].all() and (hits.ids >= 0).all()
    assert not calls  # found by the index itself, not by the exact fallback


def test_unknown_filter_field_lists_the_fields(stores, queries):
    with pytest.raises(FilterError, match="no field 'weight' in this index; its fields: age_band, case_id, Contrast"):
        stores["hnsw"].search(queries, 5, where="weight>70")


# -- save / load, fallback, conversion --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_then_load_gives_identical_results(stores, queries, kind):
    store = stores[kind]
    loaded = IndexStore.open(store.path)
    assert loaded.index_type is IndexType(kind)
    assert loaded.manifest.index.kind.value == kind and loaded.manifest.index.params == store.manifest.index.params
    for where in (None, ["modality=CT", "age>=60"]):
        a, b = store.search(queries, 10, where=where), loaded.search(queries, 10, where=where)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.distances, b.distances)
    np.testing.assert_allclose(loaded.vectors(), _unit(_clustered(N)), atol=1e-6)


def test_one_query_at_a_time_gives_the_batch_results(stores, queries):
    # an ivfpq index scans one query's lists on every core (faiss parallel_mode 1): same results
    store = stores["ivfpq"]
    assert faiss.extract_index_ivf(store.index).parallel_mode == 1
    batch = store.search(queries, 10)
    for i in range(len(queries)):
        one = store.search(queries[i : i + 1], 10)
        np.testing.assert_array_equal(one.ids[0], batch.ids[i])
        np.testing.assert_allclose(one.distances[0], batch.distances[i], atol=1e-6)


def test_ivfpq_keeps_the_exact_vectors_beside_its_codes(stores):
    store = stores["ivfpq"]
    files = store.manifest.files
    assert files["raw"].name.startswith("raw-") and files["raw"].size > N * DIM * 4
    assert files["vectors"].size < files["raw"].size / 2


def test_too_few_vectors_for_ivfpq_fall_back_to_flat_then_convert(tmp_path, data, queries):
    store = IndexStore.create(tmp_path / "ix", dim=DIM, encoder={}, preprocess={}, index_type="ivfpq")
    store.add(data[:500], _table(500))
    assert store.index_type is IndexType.FLAT
    assert "ivfpq needs at least 10000 vectors to train and the index holds 500" in store.manifest.index.note
    store.commit()
    hits = IndexStore.open(tmp_path / "ix").search(queries, 5)
    check_ref_knn_with_draws(*_exact(data[:500], queries, 5), hits.distances, hits.ids)
    # the collection grows past the minimum: the next addition trains ivfpq from the stored vectors
    table = _table(N)
    store.add(data[500:], table.iloc[500:])
    assert store.index_type is IndexType.IVFPQ and store.manifest.index.note == ""
    assert store.manifest.index.built_for == N
    _, ref_ids = _exact(data, queries, 10)
    assert _recall(store.search(queries, 10).ids, ref_ids) >= 0.9


def test_auto_converts_when_the_collection_crosses_the_flat_threshold(tmp_path, data, queries, monkeypatch):
    monkeypatch.setattr(faiss_module, "FLAT_MAX_MB", 0.53)  # about 8,680 16-d vectors
    store = IndexStore.create(tmp_path / "ix", dim=DIM, encoder={}, preprocess={}, index_type="auto")
    store.add(data[:8000], _table(8000))
    assert store.index_type is IndexType.FLAT
    store.add(data[8000:9000], _table(9000).iloc[8000:])
    assert store.index_type is IndexType.HNSW
    _, ref_ids = _exact(data[:9000], queries, 10)
    assert _recall(store.search(queries, 10).ids, ref_ids) >= 0.95
    store.commit()
    assert IndexStore.open(tmp_path / "ix").manifest.index.requested.value == "auto"


def test_configure_converts_an_existing_index_at_commit(tmp_path, data, queries):
    store = IndexStore.create(tmp_path / "ix", dim=DIM, encoder={}, preprocess={})
    store.add(data[:2000], _table(2000))
    store.commit()
    store.configure(index_type="hnsw", ef_search=64)
    store.commit()
    loaded = IndexStore.open(tmp_path / "ix")
    assert loaded.index_type is IndexType.HNSW and loaded.index.hnsw.efSearch == 64
    np.testing.assert_array_equal(loaded.search(queries, 5).ids, store.search(queries, 5).ids)


def test_l2_metric_stays_euclidean_for_hnsw(tmp_path, data, queries):
    store = IndexStore.create(tmp_path / "ix", dim=DIM, metric="l2", encoder={}, preprocess={}, index_type="hnsw")
    store.add(data[:3000], _table(3000))
    hits = store.search(queries, 5)
    np.testing.assert_allclose(hits.distances, np.linalg.norm(data[:3000][hits.ids] - queries[:, None], axis=2), rtol=1e-4)


def test_a_manifest_that_names_another_index_type_is_refused(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["hnsw"].path, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["index"]["type"] = "flat"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="describes a flat cosine index but .* holds a hnsw one; rebuild"):
        IndexStore.open(copy)


def test_a_damaged_raw_file_is_caught(stores, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["ivfpq"].path, copy)
    raw = copy / json.loads((copy / MANIFEST).read_text())["files"]["raw"]["name"]
    data = bytearray(raw.read_bytes())
    data[-1] ^= 0xFF
    raw.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="does not match its checksum"):
        IndexStore.open(copy).vectors()
    raw.write_bytes(bytes(data[:-4]))
    with pytest.raises(IndexCorruptError, match="rebuild the index"):
        IndexStore.open(copy)


# -- the command line on the sample index ------------------------------------------------------------------

def test_cli_where_keeps_matching_cases_only(sample_index):
    runner = CliRunner()
    result = runner.invoke(app, ["query", str(QUERY), "--index", str(sample_index), "-k", "5", "--json",
                                 "--where", "modality=CT", "--where", "Contrast=False", "--where", "age>=60"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    cases = IndexStore.open(sample_index).cases
    expected = int(filter_mask(cases, parse_filters(["Contrast=False", "age>=60"])).sum())
    assert 0 < expected and len(data["results"]) == min(5, expected)
    assert all(r["metadata"]["Contrast"] is False for r in data["results"])
    assert all(int(r["metadata"]["age_band"][:2]) >= 60 for r in data["results"])
    assert data["query"]["where"] == ["modality=CT", "Contrast=False", "age>=60"]


@pytest.mark.parametrize("where, message", [
    ("weight>70", "no field 'weight' in this index; its fields: age_band, body_part, case_id, columns, Contrast"),
    ("age>=old", "compares numbers, and 'old' is not one"),
    ("modality", "has no operator"),
])
def test_cli_bad_where_is_one_line_and_exit_2(sample_index, where, message):
    result = CliRunner().invoke(app, ["query", str(QUERY), "--index", str(sample_index), "--where", where])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_raw_vectors_verified_once_are_not_hashed_at_every_open(stores, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(stores["ivfpq"].path, copy)
    raw = copy / json.loads((copy / MANIFEST).read_text())["files"]["raw"]["name"]
    old = raw.stat().st_mtime_ns - 3600 * 10**9  # written long ago: its times can be trusted
    os.utime(raw, ns=(old, old))
    assert not IndexStore.open(copy)._raw_checked  # unknown here: hashed when first read whole
    IndexStore.open(copy).vectors()
    hashed = []
    monkeypatch.setattr(files_module, "_check_digest", lambda path, entry, digest: hashed.append(path.name))
    store = IndexStore.open(copy)
    assert store._raw_checked and raw.name not in hashed
    IndexStore.open(copy, verify=True)
    assert raw.name in hashed
