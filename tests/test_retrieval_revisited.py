"""Revisited Oxford/Paris protocol against hand-worked APs and revisitop's own loop."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from compatzoo.errors import DatasetError
from compatzoo.retrieval import evaluate_revisited, load_revisited_gnd
from fixtures_retrieval import assert_no_near_ties, reference_rankings


def at_cosines(cosines) -> np.ndarray:
    c = np.asarray(cosines, dtype=np.float64)
    return np.stack([c, np.sqrt(1 - c**2)], axis=1).astype(np.float32)


# For the query [1, 0] the gallery ranks 1, 0, 2, 3, 4, 5 (best first).
GALLERY = at_cosines([0.9, 0.95, 0.8, 0.7, 0.6, 0.5])
QUERIES = np.array([[1, 0], [1, 0]], dtype=np.float32)
GND = [
    {"easy": [0, 3], "hard": [4], "junk": [1], "bbx": [0, 0, 10, 10]},
    {"easy": [5], "hard": [], "junk": [], "bbx": [0, 0, 10, 10]},
]


def write_gnd(path, gnd=GND, n_images=6):
    data = {"imlist": [f"im{i}" for i in range(n_images)],
            "qimlist": [f"q{i}" for i in range(len(gnd))], "gnd": gnd}
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    return path


def revisitop_compute_map(ranks: np.ndarray, gnd: list[dict]) -> float:
    """revisitop's compute_map (mAP part), transcribed; ranks: (n_images, n_queries)."""
    total, nempty = 0.0, 0
    for i in range(len(gnd)):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap, recall_step = 0.0, 1.0 / len(qgnd)
        for j, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else j / rank
            precision_1 = (j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        total += ap
    return total / (len(gnd) - nempty)


def test_hand_worked_protocols(tmp_path):
    gnd = load_revisited_gnd(write_gnd(tmp_path / "gnd_roxford5k.pkl"))
    result = evaluate_revisited(QUERIES, GALLERY, gnd)
    # Query 0, ranking 1,0,2,3,4,5:
    #  easy: ok {0,3}, junk {1,4}: positions 1,3 -> minus junk before -> 0,2.
    #        AP = [(1+1)/2 + (1/2+2/3)/2] / 2 = 19/24
    #  medium: ok {0,3,4}, junk {1}: positions 1,3,4 -> 0,2,3.
    #        AP = [(1+1)/2 + (1/2+2/3)/2 + (2/3+3/4)/2] / 3 = 55/72
    #  hard: ok {4}, junk {1,0,3}: position 4 -> 1. AP = (0 + 1/2)/2 = 1/4
    # Query 1: ok {5} at position 5 (easy, medium): AP = (0/5 + 1/6)/2 = 1/12; no hard positives.
    assert result["easy"] == pytest.approx((19 / 24 + 1 / 12) / 2)
    assert result["medium"] == pytest.approx((55 / 72 + 1 / 12) / 2)
    assert result["hard"] == pytest.approx(1 / 4)


def test_matches_revisitop_on_random_data():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((80, 8)).astype(np.float32)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    gnd = []
    for _ in range(6):
        ids = rng.permutation(80)
        gnd.append({"easy": ids[:rng.integers(0, 6)].tolist(),
                    "hard": ids[10:10 + rng.integers(1, 6)].tolist(),
                    "junk": ids[20:20 + rng.integers(0, 8)].tolist()})
    # Chunked scoring ranks like the full matrix only if no near-tie mixes easy, hard,
    # junk and unlisted items (every protocol sees only those four kinds).
    kinds = np.zeros((6, 80), dtype=int)
    for i, g in enumerate(gnd):
        for kind, key in enumerate(("easy", "hard", "junk"), start=1):
            kinds[i, g[key]] = kind
    assert_no_near_ties(queries, gallery, kinds)
    ranks = np.stack(reference_rankings(queries, gallery), axis=1)
    protocols = {
        "easy": [{"ok": g["easy"], "junk": g["junk"] + g["hard"]} for g in gnd],
        "medium": [{"ok": g["easy"] + g["hard"], "junk": g["junk"]} for g in gnd],
        "hard": [{"ok": g["hard"], "junk": g["junk"] + g["easy"]} for g in gnd],
    }
    result = evaluate_revisited(queries, gallery, gnd, chunk_size=9)
    for protocol, protocol_gnd in protocols.items():
        assert result[protocol] == pytest.approx(revisitop_compute_map(ranks, protocol_gnd))


def test_loader_rejects_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="expected a file"):
        load_revisited_gnd(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as fh:
        pickle.dump({"imlist": []}, fh)
    with pytest.raises(DatasetError, match="qimlist"):
        load_revisited_gnd(bad)
    with pytest.raises(DatasetError, match="outside"):
        load_revisited_gnd(write_gnd(tmp_path / "small.pkl", n_images=3))
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as fh:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [], "x": np.random.default_rng}, fh)
    with pytest.raises(DatasetError, match="not a data-only pickle"):
        load_revisited_gnd(evil)


def test_gallery_must_match_imlist(tmp_path):
    gnd = load_revisited_gnd(write_gnd(tmp_path / "gnd.pkl"))
    with pytest.raises(DatasetError, match="imlist"):
        evaluate_revisited(QUERIES, GALLERY[:5], gnd)
