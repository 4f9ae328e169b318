"""Tests of medsearch.evaluate.protocols: the published protocol presets."""

from __future__ import annotations

from medsearch.evaluate import PROTOCOLS, Protocol


def test_protocol_presets_name_their_source():
    assert set(PROTOCOLS) == set(Protocol)
    mahbod, plus = PROTOCOLS[Protocol.MAHBOD2024], PROTOCOLS[Protocol.MEDMNISTPLUS]
    assert (mahbod.gallery_split, mahbod.query_split, mahbod.vote_k, mahbod.main_metric) == ("train", "test", 5, "map_hits@5")
    assert mahbod.headline == ("map_hits@5", "mmv@5", "hit@1") and "2409.09430" in mahbod.source
    assert (plus.vote_k, plus.main_metric) == (11, "knn_acc@11") and "2404.15786" in plus.source
