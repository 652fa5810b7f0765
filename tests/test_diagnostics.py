"""Diagnostics of backfill orders and side information: each function against a direct
computation on small arrays, then one tiny run whose results carry them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from compatzoo import diagnostics as dg
from compatzoo.components import OracleDistanceParams, OracleDistanceScheduler
from compatzoo.interfaces import BackfillState


# --------------------------------------------------------------------------- Spearman
def written_out_spearman(a, b) -> float:
    """Average ranks by counting (rank = 1 + #smaller + (#equal - 1) / 2), then Pearson's
    formula written as sums."""
    def ranks(x):
        return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]

    ra, rb = ranks(list(a)), ranks(list(b))
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    den = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return num / den


def test_spearman_with_ties_matches_the_written_out_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.integers(0, 4, size=15).astype(float)   # many ties
        b = rng.integers(0, 3, size=15).astype(float)
        assert dg.spearman(a, b) == pytest.approx(written_out_spearman(a, b), abs=1e-12)
    a, b = [1, 2, 2, 3], [10, 30, 20, 40]   # by hand: ranks (1, 2.5, 2.5, 4), (1, 3, 2, 4)
    assert dg.average_ranks(a).tolist() == [1, 2.5, 2.5, 4]
    assert dg.spearman(a, b) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_spearman_without_ties_is_the_classic_d_squared_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=20), rng.normal(size=20)
    d = dg.average_ranks(a) - dg.average_ranks(b)
    n = len(a)
    assert dg.spearman(a, b) == pytest.approx(1 - 6 * (d @ d) / (n * (n * n - 1)), abs=1e-12)


def test_spearman_agrees_with_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 5, size=30), rng.normal(size=30)
    assert dg.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_edge_cases():
    x = np.array([3.0, 1.0, 2.0, 5.0])
    assert dg.spearman(x, 2 * x + 1) == 1.0          # exactly
    assert dg.spearman(x, -x) == -1.0
    assert math.isnan(dg.spearman(x, np.zeros(4)))   # a constant has no ranking
    assert math.isnan(dg.spearman([1.0], [2.0]))
    with pytest.raises(ValueError):
        dg.spearman([1, 2], [1, 2, 3])


def test_priority_is_minus_the_position():
    assert dg.priority(np.array([2, 0, 1])).tolist() == [-1.0, -2.0, 0.0]


# --------------------------------------------------------------------------- true error
def test_true_error_and_the_oracle_order_it_explains():
    rng = np.random.default_rng(3)
    stored, new = rng.normal(size=(12, 5)), rng.normal(size=(12, 5))
    direct = [math.sqrt(sum((n - s) ** 2 for n, s in zip(nr, sr))) for nr, sr in zip(new, stored)]
    assert dg.true_error(stored, new) == pytest.approx(direct, rel=1e-5)
    cos = np.sum(stored * new, 1) / np.linalg.norm(stored, axis=1) / np.linalg.norm(new, axis=1)
    assert dg.true_error(stored, new, normalize=True) ** 2 == pytest.approx(2 - 2 * cos, abs=1e-5)
    for normalize in (False, True):
        order = OracleDistanceScheduler(OracleDistanceParams(normalize=normalize)).order(
            BackfillState(old_features=stored, new_features=new))
        error = dg.true_error(stored, new, normalize=normalize)
        assert dg.spearman(dg.priority(order), error) == 1.0


# --------------------------------------------------------------------------- flips
def brute_force_flips(qn, gs, qo, go, ql, gl, loo):
    def nn(q, g, i):
        best, arg = -np.inf, None
        for j in range(len(g)):
            if loo and j == i:
                continue
            s = q @ g[j] / np.linalg.norm(q) / np.linalg.norm(g[j])
            if s > best:
                best, arg = s, j
        return arg

    count = np.zeros(len(gl), dtype=int)
    for i in range(len(ql)):
        was_right = gl[nn(qo[i], go, i)] == ql[i]
        j = nn(qn[i], gs, i)
        if was_right and gl[j] != ql[i]:
            count[j] += 1
    return count


@pytest.mark.parametrize("loo", [False, True])
def test_flip_involvement_matches_a_brute_force_count(loo):
    rng = np.random.default_rng(4)
    n_q, n_g = (20, 20) if loo else (15, 25)
    gl = rng.integers(0, 4, size=n_g)
    ql = gl.copy() if loo else rng.integers(0, 4, size=n_q)
    centres = rng.normal(size=(4, 6))
    go = (centres[gl] + 0.8 * rng.normal(size=(n_g, 6))).astype(np.float32)   # o2o decent
    qo = go.copy() if loo else (centres[ql] + 0.8 * rng.normal(size=(n_q, 6))).astype(np.float32)
    gs = rng.normal(size=(n_g, 6)).astype(np.float32)                          # stored: noise
    qn = gs.copy() if loo else rng.normal(size=(n_q, 6)).astype(np.float32)
    got = dg.flip_involvement(qn, gs, qo, go, ql, gl, leave_one_out=loo)
    expected = brute_force_flips(qn, gs, qo, go, ql, gl, loo)
    assert expected.sum() > 0 and got.tolist() == expected.tolist()


# --------------------------------------------------------------------------- AUC gain
def test_oracle_gain_captured_arithmetic_and_undefined_cases():
    assert dg.oracle_gain_captured(0.6, 0.5, 0.7)[0] == pytest.approx(0.5)
    assert dg.oracle_gain_captured(0.7, 0.5, 0.7) == (1.0, None)
    assert dg.oracle_gain_captured(0.4, 0.5, 0.7)[0] == pytest.approx(-0.5)
    value, why = dg.oracle_gain_captured(0.6, 0.5, 0.5)
    assert value is None and "no gain to capture" in why
    value, why = dg.oracle_gain_captured(0.6, 0.5, 0.45)              # oracle below random
    assert value is None and "no gain" in why
    assert dg.oracle_gain_captured(None, 0.5, 0.7) == (None, "an AUC is undefined")


def test_backfill_diagnostics_skips_random_and_explains_nulls():
    rng = np.random.default_rng(5)
    error = rng.random(8)
    oracle = np.argsort(-error, kind="stable")
    orders = {"random": rng.permutation(8), "oracle": oracle, "mine": rng.permutation(8)}
    aucs = {"random": 0.5, "oracle": 0.7, "mine": 0.55}
    out = dg.backfill_diagnostics(orders, aucs, {"true_error": error}, np.zeros(8, int),
                                  "random", "oracle")
    assert set(out) == {"oracle", "mine"}
    assert out["oracle"]["spearman_true_error"] == 1.0
    assert out["oracle"]["oracle_gain_captured"] == 1.0
    assert out["mine"]["oracle_gain_captured"] == pytest.approx(0.25)
    assert out["mine"]["spearman_flips"] is None and out["mine"]["flips_at_start"] == 0
    assert "no negative flip" in out["mine"]["reasons"]["spearman_flips"]
    alone = dg.backfill_diagnostics({"mine": orders["mine"]}, aucs, {}, None, None, None)
    assert alone["mine"]["oracle_gain_captured"] is None
    assert set(alone["mine"]["reasons"]) == {"spearman_flips", "oracle_gain_captured"}
    json.dumps(out)


# --------------------------------------------------------------------------- side info
def test_side_knn_accuracy_is_leave_one_out_1nn_by_brute_force():
    rng = np.random.default_rng(6)
    labels = np.r_[rng.integers(0, 3, size=17), 9]      # label 9: one item, left out
    features = rng.normal(size=(18, 4)).astype(np.float32) + labels[:, None] % 3 * 0.7
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    kept = [i for i in range(18) if (labels == labels[i]).sum() > 1]
    correct = [labels[int(np.argmax(sims[i]))] == labels[i] for i in kept]
    assert dg.side_knn_accuracy(features, labels) == pytest.approx(np.mean(correct))
    chance = np.mean([((labels == labels[i]).sum() - 1) / 17 for i in kept])
    assert dg.chance_knn_accuracy(labels) == pytest.approx(chance)
    report = dg.side_information_report(features, features, features, labels)
    assert report["side_knn_accuracy"] == report["stored_knn_accuracy"] == pytest.approx(
        np.mean(correct))
    assert report["k"] == 1 and report["side_dim"] == 4 and report["items"] == 18


# --------------------------------------------------------------------------- a run
def test_a_run_reports_order_and_side_information_diagnostics(tmp_path):
    from test_end_to_end import OLD_ENCODER, tiny_spec
    from test_sequential import FCT

    from compatzoo.experiment import run_experiment
    from compatzoo.report import format_table
    from compatzoo.specs import load_spec

    spec = tiny_spec(OLD_ENCODER)
    spec["seed"] = 1     # here the oracle beats random (on seed 0 it does not: no gain to share)
    spec["new"] = [{"name": "fct", "upgrader": {"name": "fct-transformation", "params": FCT}}]
    spec["evaluation"]["backfill"]["schedulers"] = [
        "random", "oracle-distance", {"name": "oracle-distance", "params": {"normalize": True}}]
    results = run_experiment(load_spec(spec), tmp_path, progress=False)
    evaluation = json.loads((tmp_path / "results.json").read_text())["evaluation"]
    curves = evaluation["backfill"]["fct"]
    raw, unit = "oracle-distance(normalize=False)", "oracle-distance(normalize=True)"
    assert set(curves) == {"random", raw, unit}
    assert "diagnostics" not in curves["random"]
    for label, key in ((raw, "spearman_true_error"), (unit, "spearman_true_error_cosine")):
        diag = curves[label]["diagnostics"]
        assert diag[key] == 1.0                       # it orders by exactly that error
        assert diag["oracle"] == raw and diag["random"] == "random"
    own = curves[raw]["diagnostics"]
    gain = curves[raw]["auc"]["map@100"] - curves["random"]["auc"]["map@100"]
    if gain > dg.GAIN_EPS:
        assert own["oracle_gain_captured"] == 1.0     # captures all of its own gain
    else:
        assert own["oracle_gain_captured"] is None and "oracle_gain_captured" in own["reasons"]
    # flips at 0% are the NFR@1 numerator of the curve's first point
    o2o_right = round(evaluation["table"]["o2o"]["cmc@1"] * 12)      # 12 queries
    nfr0 = curves[raw]["nfr"]["1"][0]
    assert own["flips_at_start"] == (0 if nfr0 is None else round(nfr0 * o2o_right))
    side = evaluation["side_information"]["fct"]
    assert side["side_dim"] == 4 and side["k"] == 1 and side["items"] == 24
    for key in ("side_knn_accuracy", "stored_knn_accuracy", "new_knn_accuracy", "chance"):
        assert 0.0 <= side[key] <= 1.0
    text = format_table(results["evaluation"])
    assert f"fct ({raw}): Spearman vs true error 1.00" in text
    assert "side information of fct: leave-one-out 1-NN accuracy" in text
