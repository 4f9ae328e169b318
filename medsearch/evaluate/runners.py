"""The three evaluations a user runs: an ``.npz`` file, an index's own labeled cases, a query folder.

* :func:`evaluate_npz`: a MedMNIST-format ``.npz`` file. The gallery split (default ``train``) and
  the query split (default ``test``) are embedded through the same preprocessing and encoder as
  ``medsearch index``/``query`` (each image is a volume of one slice, or a 3D volume).
* :func:`evaluate_index`: an index built with a labels CSV. Every labeled case queries all the
  others (leave-one-out); with ``exclude_same_patient`` the cases of the query's patient
  pseudonym are left out too, so a patient's second slice does not count as a find.
* :func:`evaluate_queries`: a folder of query studies with a labels CSV, against an index.

Each embeds (or reads) vectors and calls :func:`~medsearch.evaluate.scoring.evaluate_embeddings`.
These are the functions behind ``medsearch evaluate``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm  # plain text bars: notebooks need no widget package

from medsearch.config import Config, EncoderConfig, load_config
from medsearch.deid import SiteKey, case_id, patient_pseudonym
from medsearch.embedding import SliceSet, embed_volume
from medsearch.encoders import load_encoder
from medsearch.errors import ConfigError, InvalidStudyError, KeyFileError
from medsearch.evaluate.npz import embed_cached, embed_npz_split, encoder_record, resolve_encoders
from medsearch.evaluate.protocols import Protocol, resolve_ks, resolve_protocol
from medsearch.evaluate.results import EvaluationReport, compare_results
from medsearch.evaluate.scoring import evaluate_embeddings
from medsearch.io import LoadFailure, NpzLayout, find_files, load_npz_split, load_volume, scan
from medsearch.io.labels import labels_for_case, read_labels
from medsearch.rerank import reorder_by_slices
from medsearch.search import Searcher
from medsearch.store import IndexStore, SliceTable

__all__ = ["evaluate_index", "evaluate_npz", "evaluate_queries"]


def evaluate_npz(
    path: str | Path,
    *,
    protocol: Protocol | str | None = None,
    gallery_split: str | None = None,
    query_split: str | None = None,
    ks: Iterable[int] | None = None,
    config: Config | str | Path | None = None,
    encoders: Sequence[str | EncoderConfig] | None = None,
    modality: str = "OT",
    layout: NpzLayout | str | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int | None = 64,
    main_metric: str | None = None,
    n_resamples: int = 1000,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    rerank: bool = False,
) -> EvaluationReport:
    """Evaluate retrieval on a MedMNIST-format ``.npz``: query split against gallery split.

    Parameters
    ----------
    path : str or Path
        The ``.npz`` file (see :mod:`medsearch.io.npz`).
    protocol : Protocol or str, optional
        ``"mahbod2024"`` or ``"medmnistplus"`` (see :data:`~medsearch.evaluate.protocols.PROTOCOLS`); sets the splits, cut-offs
        and headline metrics.
    gallery_split, query_split : str, optional
        Default ``train`` and ``test`` (or the protocol's, which may not be changed). The same
        split for both gives leave-one-out within that split.
    ks : iterable of int, optional
        Cut-offs, added to the protocol's; default (1, 5, 10) without a protocol.
    config : Config, str or Path, optional
        Preprocessing and encoder settings (a TOML file or preset name; default ``default``).
    encoders : sequence of str or EncoderConfig, optional
        Several encoders (``"name"`` or ``"name:checkpoint"``) to compare on the same split; the
        first is the baseline. Default: the config's encoder.
    modality : str, default "OT"
        Modality the preprocessing assumes; ``OT`` scales intensities by percentiles.
    layout : NpzLayout or str, optional
        Image layout; inferred by default (see :func:`~medsearch.io.load_npz_split`).
    limit : int, optional
        Evaluate a seeded random subset of this many queries (a quick run).
    seed : int, default 0
        Seed of the subset and of the bootstrap.
    batch_size : int, default 64
        Images per encoder call. Larger batches are faster on a CPU; the embeddings do not depend
        on it (``None``: the config's ``encoder.batch_size``).
    main_metric : str, optional
        Metric of the paired test (default: the protocol's, else ``map@r``).
    n_resamples : int, default 1000
        Bootstrap resamples of the 95% intervals.
    cache_dir : str or Path, optional
        Keep embeddings here, keyed by data, encoder and preprocessing hashes; nothing is cached
        without it.
    progress : bool
        Progress bars on stderr while embedding.
    rerank : bool
        Also score each encoder with late-interaction re-ranking (:mod:`medsearch.rerank`): the
        first :data:`~medsearch.rerank.DEFAULT_CANDIDATES` gallery items of each query re-ordered
        by their slice vectors. The report then holds, per encoder, the pooled ranking and the
        re-ranked one (named ``... + late interaction``), compared by a paired test. Slice vectors
        are not cached (``cache_dir`` keeps the case vectors only).

    Returns
    -------
    EvaluationReport

    Raises
    ------
    InvalidStudyError
        The file or a split is missing or malformed.
    ConfigError
        Bad options: unknown protocol, splits that contradict it, ``k`` larger than the gallery,
        an unknown encoder or checkpoint.
    """
    started = time.perf_counter()
    path = Path(path)
    spec = resolve_protocol(protocol)
    if spec is not None:
        for given, fixed, what in ((gallery_split, spec.gallery_split, "gallery"), (query_split, spec.query_split, "query")):
            if given is not None and given != fixed:
                raise ConfigError(
                    f"protocol {spec.name} uses the {fixed} split as {what}, not {given}; "
                    "drop the split option or the protocol"
                )
    gallery_name = gallery_split or (spec.gallery_split if spec else "train")
    query_name = query_split or (spec.query_split if spec else "test")
    ks_all = resolve_ks(ks, spec)
    cfg = config if isinstance(config, Config) else load_config(config)
    encoder_configs = resolve_encoders(encoders, cfg.encoder, batch_size)

    t0 = time.perf_counter()
    gallery = load_npz_split(path, gallery_name, layout=layout)
    queries = gallery if query_name == gallery_name else load_npz_split(path, query_name, layout=layout)
    q_rows = _subsample(len(queries), limit, seed)
    load_s = time.perf_counter() - t0
    loo = query_name == gallery_name

    results = []
    for enc_cfg in encoder_configs:
        encoder = load_encoder(enc_cfg)
        run_cfg = Config(preprocess=cfg.preprocess, encoder=enc_cfg, index=cfg.index)
        timings: dict[str, float] = {"load_s": load_s}

        options: dict[str, Any] = {
            "modality": modality,
            "images_per_batch": enc_cfg.batch_size,
            "progress": progress,
            "timings": timings,
            "cache_dir": Path(cache_dir) if cache_dir else None,
        }
        g_slices: list[SliceSet | None] | None = None
        q_slices: list[SliceSet | None] | None = None
        if rerank:  # the slice vectors too: embedded here, the cache keeps case vectors only
            g_slices, q_slices = [], []
            plain_options = {k: v for k, v in options.items() if k != "cache_dir"}
            g_vectors = embed_npz_split(gallery, encoder, run_cfg, keep_slices=g_slices, **plain_options)
            if loo:
                q_vectors, q_slices = g_vectors[q_rows], [g_slices[int(i)] for i in q_rows]
            else:
                q_vectors = embed_npz_split(queries, encoder, run_cfg, indices=q_rows, keep_slices=q_slices, **plain_options)
        else:
            g_vectors = embed_cached(gallery, None, encoder, run_cfg, **options)
            q_vectors = g_vectors[q_rows] if loo else embed_cached(queries, q_rows, encoder, run_cfg, **options)
        stages: list[tuple[str, Any]] = [("", None)]
        if g_slices is not None and q_slices is not None:
            table = SliceTable(encoder.dim)
            table.add(g_slices)
            stages.append((" + late interaction", reorder_by_slices(table, q_slices)))
        q_labels = queries.labels[q_rows]
        for suffix, reorder in stages:
            record = encoder_record(encoder, enc_cfg)
            record["name"] = f"{record.get('name', 'encoder')}{suffix}"
            result = evaluate_embeddings(
                g_vectors,
                gallery.labels,
                q_vectors,
                q_labels,
                ks=ks_all,
                metric=cfg.index.metric,
                query_rows=q_rows if loo else None,
                protocol=spec.name if spec else None,
                main_metric=main_metric,
                n_resamples=n_resamples,
                seed=seed,
                dataset=path.name,
                encoder=record,
                reorder=reorder,
                settings={
                    "ranking": "late interaction" if reorder is not None else "case vector",
                    "input": "npz",
                    "gallery_split": gallery_name,
                    "query_split": query_name,
                    "leave_one_out": loo,
                    "layout": gallery.layout.value,
                    "image_shape": list(gallery.images.shape[1:]),
                    "modality": modality,
                    "preprocess": run_cfg.to_dict()["preprocess"],
                    "limit": limit,
                    "seed": seed,
                },
            )
            result.timings = {**timings, **result.timings, "total_s": time.perf_counter() - started}
            results.append(result)
    return EvaluationReport(results, compare_results(results, metric=main_metric, seed=seed))


def evaluate_index(
    index_dir: str | Path,
    *,
    label: str | None = None,
    exclude_same_patient: bool = False,
    ks: Iterable[int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    main_metric: str | None = None,
    n_resamples: int = 1000,
) -> EvaluationReport:
    """Leave-one-out evaluation of an index built with labels.

    Every labeled case queries all other labeled cases of the index (exact search on the stored
    vectors); cases without a label take no part. With ``exclude_same_patient`` the cases of the
    query's patient pseudonym are left out as well, so that another slice or series of the same
    patient does not count as a find: real archives hold several images per patient.

    Parameters
    ----------
    index_dir : str or Path
        An index built with ``labels=`` (``medsearch index --labels``).
    label : str, optional
        The label column; may be left out when the index has exactly one.
    exclude_same_patient : bool, default False
        Leave out every case of the query's patient, not only the query itself.
    ks, limit, seed, main_metric, n_resamples
        As :func:`evaluate_npz`.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    IndexNotFoundError, IndexCorruptError
        ``index_dir`` is not a readable index.
    ConfigError
        No such label column, fewer than two labeled cases, or ``k`` larger than the cases left.
    """
    started = time.perf_counter()
    store = IndexStore.open(index_dir)
    column = _label_column(label, store)
    labels, keep = _case_labels(store.cases[column])
    if keep.sum() < 2:
        raise ConfigError(f"index {index_dir} has {int(keep.sum())} case(s) labeled in {column!r}; leave-one-out needs at least 2")
    vectors = store.vectors()[keep]
    groups = None
    if exclude_same_patient:
        if "patient" not in store.cases:
            raise ConfigError(f"index {index_dir} has no patient column; rebuild it with this medsearch version to exclude same-patient cases")
        groups = store.cases["patient"].to_numpy(dtype=object)[keep]
    q_rows = _subsample(int(keep.sum()), limit, seed)
    result = evaluate_embeddings(
        vectors,
        labels,
        vectors[q_rows],
        labels[q_rows],
        ks=ks,
        metric=store.metric,
        query_rows=q_rows,
        gallery_groups=groups,
        query_groups=None if groups is None else groups[q_rows],
        main_metric=main_metric,
        n_resamples=n_resamples,
        seed=seed,
        dataset=str(index_dir),
        encoder={k: store.manifest.encoder.get(k) for k in ("name", "dim", "weights_sha256")},
        settings={
            "input": "index",
            "label": column,
            "leave_one_out": True,
            "exclude_same_patient": exclude_same_patient,
            "n_cases": len(store),
            "n_unlabeled": int((~keep).sum()),
            "n_patients": None if groups is None else len(set(groups)),
            "preprocess": store.manifest.preprocess,
            "limit": limit,
            "seed": seed,
        },
    )
    result.timings["total_s"] = time.perf_counter() - started
    return EvaluationReport([result])


def evaluate_queries(
    query_folder: str | Path,
    labels_csv: str | Path,
    index_dir: str | Path,
    *,
    label: str | None = None,
    label_key: str | None = None,
    key: SiteKey | str | Path | None = None,
    exclude_same_patient: bool = False,
    ks: Iterable[int] | None = None,
    limit: int | None = None,
    seed: int = 0,
    main_metric: str | None = None,
    n_resamples: int = 1000,
    progress: bool = False,
) -> EvaluationReport:
    """Evaluate an index with a folder of labeled query studies.

    Each case (series) under ``query_folder`` is embedded with the index's own settings and
    searched against the labeled cases of the index; its label comes from ``labels_csv``, matched
    as ``medsearch index --labels`` matches (by file name, relative path or SeriesInstanceUID).
    Query cases without a label or that cannot be decoded are skipped and counted.

    With the site key the index was built with (``key``, or the default key when it matches), a
    query that is itself in the index never retrieves its own case, and with
    ``exclude_same_patient`` never a case of its patient.

    Parameters
    ----------
    query_folder : str or Path
        Studies to use as queries (any depth).
    labels_csv : str or Path
        Labels per file or series of the query studies.
    index_dir : str or Path
        The index to search; it must hold the same label column.
    label : str, optional
        The label column; may be left out when the index has exactly one.
    label_key : str, optional
        Column of ``labels_csv`` naming the file or series (as for ``medsearch index``).
    key : SiteKey, str or Path, optional
        The index's site key (for case ids and patient pseudonyms of the queries).
    exclude_same_patient : bool, default False
        Leave out gallery cases of the query's patient (needs the key).
    ks, limit, seed, main_metric, n_resamples, progress
        As :func:`evaluate_npz`.

    Returns
    -------
    EvaluationReport

    Raises
    ------
    InvalidStudyError
        The folder holds no labeled, decodable query case.
    ConfigError
        Labels file or column missing, or ``k`` larger than the labeled gallery.
    KeyFileError
        ``exclude_same_patient`` without the index's site key.
    IndexNotFoundError, IndexCorruptError, EncoderMismatchError
        As :class:`~medsearch.search.Searcher`.
    """
    started = time.perf_counter()
    query_folder = Path(query_folder)
    if not query_folder.exists():
        raise InvalidStudyError(f"query folder {query_folder} does not exist; give a folder of labeled studies")
    searcher = Searcher(index_dir)
    store = searcher.store
    column = _label_column(label, store)
    table = read_labels(labels_csv, label_key, [column])
    site_key = _matching_key(key, store, required=exclude_same_patient)

    found = scan(find_files(query_folder))
    vectors, labels, case_ids, patients = [], [], [], []
    skipped: dict[str, int] = {"unlabeled": 0, "undecodable": 0, "files_not_images": len(found.skipped)}
    t0 = time.perf_counter()
    for case in tqdm(found.cases, desc="embedding queries", unit="case", disable=not progress, leave=False):
        value = labels_for_case(case, table, query_folder).get(column)
        if value is None or str(value).strip() == "":
            skipped["unlabeled"] += 1
            continue
        try:
            volume, _ = load_volume(case)
        except LoadFailure:
            skipped["undecodable"] += 1
            continue
        vectors.append(embed_volume(volume, searcher.encoder, searcher.config))
        labels.append(str(value))
        if site_key is not None:
            case_ids.append(case_id(site_key, case.study_uid, case.series_uid, case.part))
            patients.append(patient_pseudonym(site_key, case.header))
    embed_s = time.perf_counter() - t0
    if not vectors:
        raise InvalidStudyError(
            f"no labeled query case found in {query_folder} ({skipped['unlabeled']} unlabeled, "
            f"{skipped['undecodable']} undecodable); check that {labels_csv} names these files"
        )
    pick = _subsample(len(vectors), limit, seed)
    q_vectors = np.stack(vectors)[pick]
    q_labels = np.asarray(labels, dtype=str)[pick]

    g_labels, keep = _case_labels(store.cases[column])
    g_vectors = store.vectors()[keep]
    g_ids = store.cases["case_id"].to_numpy(dtype=object)[keep]
    query_rows = None
    gallery_groups = query_groups = None
    if site_key is not None:
        position = {cid: i for i, cid in enumerate(g_ids)}
        query_rows = np.array([position.get(case_ids[i], -1) for i in pick], dtype=np.int64)
        if exclude_same_patient:
            if "patient" not in store.cases:
                raise ConfigError(f"index {index_dir} has no patient column; rebuild it with this medsearch version to exclude same-patient cases")
            gallery_groups = store.cases["patient"].to_numpy(dtype=object)[keep]
            query_groups = np.asarray(patients, dtype=object)[pick]
    result = evaluate_embeddings(
        g_vectors,
        g_labels,
        q_vectors,
        q_labels,
        ks=ks,
        metric=store.metric,
        query_rows=query_rows,
        gallery_groups=gallery_groups,
        query_groups=query_groups,
        main_metric=main_metric,
        n_resamples=n_resamples,
        seed=seed,
        dataset=str(query_folder),
        encoder={k: store.manifest.encoder.get(k) for k in ("name", "dim", "weights_sha256")},
        settings={
            "input": "queries",
            "index": str(index_dir),
            "label": column,
            "exclude_own_case": site_key is not None,
            "exclude_same_patient": exclude_same_patient,
            "n_queries_in_index": int((query_rows >= 0).sum()) if query_rows is not None else None,
            "skipped": skipped,
            "limit": limit,
            "seed": seed,
        },
    )
    result.timings.update({"embed_s": embed_s, "total_s": time.perf_counter() - started})
    return EvaluationReport([result])


def _subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All rows, or a seeded random subset of ``limit`` rows in ascending order."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def _label_column(label: str | None, store: IndexStore) -> str:
    columns = list(store.manifest.label_columns)
    if label is None:
        if len(columns) == 1:
            return columns[0]
        if not columns:
            raise ConfigError(
                f"index {store.path} holds no labels; build it with --labels LABELS.csv to evaluate it"
            )
        raise ConfigError(f"index {store.path} holds several label columns ({', '.join(columns)}); pick one with --label")
    if label not in store.cases:
        raise ConfigError(
            f"index {store.path} has no label column {label!r}; its label columns: {', '.join(columns) or 'none'}"
        )
    return label


def _case_labels(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Labels as strings (``True`` -> ``"True"``) and the mask of cases that have one."""
    keep = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
    return values[keep].astype(str).to_numpy(dtype=str), keep


def _matching_key(key: SiteKey | str | Path | None, store: IndexStore, *, required: bool) -> SiteKey | None:
    """The site key the index was built with, or None when it is not at hand (and not required)."""
    try:
        site_key = key if isinstance(key, SiteKey) else SiteKey.load(key)
    except KeyFileError:
        if required or key is not None:
            raise
        return None
    if site_key.check_value() != store.manifest.key_check:
        if required or key is not None:
            raise KeyFileError(
                f"index {store.path} was built with another site key than {site_key}; give the key it was "
                "built with (--key) to recognize the queries' own cases and patients"
            )
        return None
    return site_key
