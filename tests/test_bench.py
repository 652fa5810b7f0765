"""`compatzoo bench` and `compatzoo leaderboard`: figures over seeds, the claims decided
from them, and the resumable runner end to end on a tiny suite."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml
from test_end_to_end import TRAIN, tiny_spec

from compatzoo import leaderboard as lb
from compatzoo.cli import main

PRIMARY = "map@100"
CLAIMS_FILE = Path(__file__).parent.parent / "benchmarks" / "claims.yaml"
PAPERS = lb.load_claims(CLAIMS_FILE)          # the papers' claims, as shipped


def fake_results(experiment: str, seed: int, o2o: float, models: dict[str, dict],
                 spec: dict | None = None) -> dict:
    """The parts of a results.json the leaderboard reads. ``models[name]``: n2o, n2n and
    optionally n2u, gain (update gain), auc {scheduler: AUC}, nfr {scheduler: [NFR@1 ...]}."""
    table = {"o2o": {PRIMARY: o2o}}
    criterion, backfill = {}, {}
    for name, f in models.items():
        table[f"n2o/{name}"] = {PRIMARY: f["n2o"]}
        if "n2u" in f:
            table[f"n2u/{name}"] = {PRIMARY: f["n2u"]}
        table[f"n2n/{name}"] = {PRIMARY: f["n2n"]}
        criterion[name] = {"compatible": f["n2o"] > o2o,
                           **({"update_gain": f["gain"]} if "gain" in f else {})}
        if "auc" in f:
            backfill[name] = {
                scheduler: {"fractions": [0.0, 0.5, 1.0],
                            "metrics": {PRIMARY: [f["n2o"], auc, f["n2n"]]},
                            "auc": {PRIMARY: auc}, "oracle": False,
                            "nfr": {"1": f.get("nfr", {}).get(scheduler, [0.0, 0.1, 0.2])}}
                for scheduler, auc in f["auc"].items()}
    return {"experiment": experiment, "seed": seed,
            "spec": spec or {"name": experiment, "seed": seed,
                             "new": [{"name": name} for name in models]},
            "evaluation": {"primary": PRIMARY, "metrics": [PRIMARY], "table": table,
                           "criterion": criterion, "backfill": backfill},
            "timing": {"total_s": 10.0 + seed}}


def sample_std(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# --------------------------------------------------------------------------- aggregation
def test_figures_over_seeds_are_mean_and_sample_std():
    n2o, o2o, gains = [0.30, 0.33, 0.27], [0.20, 0.21, 0.19], [0.1, 0.3, 0.2]
    runs = {"bct": {s: fake_results("quick-bct", s, o2o[s], {
        "bct": {"n2o": n2o[s], "n2n": 0.5, "gain": gains[s],
                "auc": {"random": 0.4 + s / 100}}}) for s in range(3)}}
    agg = lb.aggregate(runs)
    row = agg.rows[0]
    assert (row["stem"], row["spec"], row["model"], row["seeds"]) == ("bct", "quick-bct", "bct",
                                                                       [0, 1, 2])
    assert row["n2o"].mean == pytest.approx(sum(n2o) / 3)
    assert row["n2o"].std == pytest.approx(sample_std(n2o))
    assert row["n2o"].values == {0: 0.30, 1: 0.33, 2: 0.27}
    assert row["o2o"].std == pytest.approx(sample_std(o2o))
    assert row["update_gain"].mean == pytest.approx(0.2)
    assert row["n2n"].std == pytest.approx(0.0) and row["n2u"] is None
    assert row["compatible"] == lb.Votes(3, 3)
    assert row["auc"]["random"].mean == pytest.approx(0.41)
    assert row["seconds"].mean == pytest.approx(11.0)
    # the backfill curve, point by point, and the table of the primary metric
    point = agg.curves["bct"]["bct"]["random"]["metric"][1]
    assert point.mean == pytest.approx(0.41) and point.std == pytest.approx(0.01)
    assert agg.tables["bct"]["n2o/bct"].mean == pytest.approx(sum(n2o) / 3)
    text = lb.to_markdown(agg.rows)
    assert f"{100 * sum(n2o) / 3:.2f} ± {100 * sample_std(n2o):.2f}" in text
    assert "yes (3/3)" in text and text.splitlines()[0].endswith("seeds |")

    one = lb.aggregate({"bct": {0: runs["bct"][0]}}).rows[0]
    assert one["n2o"] == lb.Stat(0.30, None, 1, {0: 0.30})
    assert "±" not in lb.to_markdown([one])


def test_one_seed_markdown_is_the_run_suite_layout():
    r = fake_results("quick-bct", 0, 0.2, {"bct": {"n2o": 0.3, "n2n": 0.5, "gain": 0.25,
                                                   "auc": {"random": 0.4}}})
    text = lb.to_markdown(lb.leaderboard_rows(r))
    assert text.splitlines()[2] == ("| quick-bct | bct | 20.00 | 30.00 | – | 50.00 | yes | "
                                    "0.250 | 40.00 (random) | 20.00 (random) | 10 |")


def test_run_suite_uses_the_shared_rows():
    path = Path(__file__).parents[1] / "benchmarks" / "run_suite.py"
    spec = importlib.util.spec_from_file_location("run_suite_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.leaderboard_rows is lb.leaderboard_rows
    assert module.chain_rows is lb.chain_rows and module.upgrade_rows is lb.upgrade_rows
    assert module.write_leaderboard is lb.write_leaderboard


# --------------------------------------------------------------------------- decision rule
def test_decide_paired_seeds():
    left, right = {0: 0.30, 1: 0.33, 2: 0.31}, {0: 0.20, 1: 0.21, 2: 0.22}
    diffs = [0.10, 0.12, 0.09]
    se = sample_std(diffs) / math.sqrt(3)
    out = lb.decide(left, right, ">")
    assert out["se_kind"] == "paired" and out["n"] == 3
    assert out["difference"] == pytest.approx(sum(diffs) / 3)
    assert out["se"] == pytest.approx(se)
    assert out["status"] == "holds"                 # 0.103 > 2 * 0.0088
    assert lb.decide(left, right, "<")["status"] == "reversed"
    # the same means, noisier differences: within two standard errors
    noisy = lb.decide({0: 0.30, 1: 0.20, 2: 0.36}, {0: 0.25, 1: 0.30, 2: 0.22}, ">")
    d = [0.05, -0.10, 0.14]
    assert noisy["se"] == pytest.approx(sample_std(d) / math.sqrt(3))
    assert abs(sum(d) / 3) < 2 * noisy["se"] and noisy["status"] == "inconclusive"


def test_decide_unpaired_constant_one_seed_and_missing():
    left, right = {0: 0.30, 1: 0.32, 2: 0.34}, {5: 0.20, 6: 0.26}
    out = lb.decide(left, right, ">")
    se = math.sqrt(sample_std(list(left.values())) ** 2 / 3
                   + sample_std(list(right.values())) ** 2 / 2)
    assert out["se_kind"] == "unpaired" and out["se"] == pytest.approx(se)
    assert out["difference"] == pytest.approx(0.32 - 0.23)
    assert out["status"] == ("holds" if 0.09 > 2 * se else "inconclusive")

    gains = {0: 0.1, 1: 0.3, 2: 0.2}
    out = lb.decide(gains, 0.0, ">")
    assert out["se_kind"] == "one-sample"
    assert out["se"] == pytest.approx(0.1 / math.sqrt(3)) and out["status"] == "holds"

    assert lb.decide({0: 0.9}, {0: 0.1}, ">")["status"] == "inconclusive (1 seed)"
    assert lb.decide({0: 0.9, 1: 0.8}, {0: 0.1}, ">")["status"] == "inconclusive (1 seed)"
    assert lb.decide(None, {0: 0.1}, ">")["status"] == "not measured"
    assert lb.decide({0: 0.1, 1: 0.2}, None, "<")["status"] == "not measured"
    # equal figures: no difference, no standard error -> not a claim either way
    assert lb.decide({0: 0.2, 1: 0.2}, {0: 0.2, 1: 0.2}, ">")["status"] == "inconclusive"


def suite_runs(seeds):
    """bct: n2o clearly above o2o; ract: uncertainty AUC = random +- noise, NFR clearly
    below bct's; fastfill: sigma AUC clearly below random; no fct spec."""
    noise = {0: 0.01, 1: -0.012, 2: 0.004}
    return {
        "bct": {s: fake_results("quick-bct", s, 0.20 + s / 100, {
            "bct": {"n2o": 0.26 + s / 100 + noise[s] / 10, "n2n": 0.5, "gain": 0.2,
                    "auc": {"random": 0.4}, "nfr": {"random": [0.2, 0.3 + noise[s], 0.25]}}})
                for s in seeds},
        "ract": {s: fake_results("quick-ract", s, 0.20 + s / 100, {
            "ract": {"n2o": 0.25, "n2n": 0.5,
                     "auc": {"random": 0.40, "uncertainty": 0.40 + noise[s]},
                     "nfr": {"random": [0.1, 0.12 + noise[s] / 2, 0.1],
                             "uncertainty": [0.1, 0.1, 0.1]}}}) for s in seeds},
        "fastfill": {s: fake_results("quick-fastfill", s, 0.2, {
            "fastfill": {"n2o": 0.01, "n2u": 0.3, "n2n": 0.5,
                         "auc": {"random": 0.40 + noise[s] / 5,
                                 "fastfill-sigma": 0.35 + noise[s] / 4}}}) for s in seeds},
    }


def test_claims_decided_from_constructed_results():
    decided = {c["claim"]: c for c in lb.evaluate_claims(lb.aggregate(suite_runs([0, 1, 2])).rows, claims=PAPERS)}
    criterion = decided["BCT criterion: n2o > o2o"]
    assert criterion["status"] == "holds" and criterion["se_kind"] == "paired"
    diffs = [0.06 + n / 10 for n in (0.01, -0.012, 0.004)]
    assert criterion["difference"] == pytest.approx(sum(diffs) / 3)
    assert criterion["se"] == pytest.approx(sample_std(diffs) / math.sqrt(3))
    assert criterion["left"]["values"] == pytest.approx({"0": 0.261, "1": 0.2688, "2": 0.2804})
    gain = decided["BCT update gain > 0"]           # 0.2 in every seed: no spread
    assert (gain["status"], gain["se"], gain["se_kind"]) == ("holds", 0.0, "one-sample")
    assert decided["RACT: uncertainty order AUC > random (open set)"]["status"] == "inconclusive"
    nfr = decided["RACT: lower worst NFR@1 along the backfill curve than BCT (random order)"]
    assert nfr["status"] == "holds" and nfr["left"]["mean"] < nfr["right"]["mean"]
    assert decided["FastFill: sigma order AUC > random (open set)"]["status"] == "reversed"
    for name in ("FCT: side information > none (n2u, open set)",
                 "BCT chain transitivity: v3 queries vs the v1 gallery > v1 (o2o)",
                 "BiCT: wider psi -> higher n2u",
                 "MixBCT > BCT with a weak old model (n2o)"):
        assert decided[name]["status"] == "not measured"
    one = lb.evaluate_claims(lb.aggregate(suite_runs([0])).rows, claims=PAPERS)
    measured = [c for c in one if c["status"] != "not measured"]
    assert measured and all(c["status"] == "inconclusive (1 seed)" for c in measured)
    assert "**holds**" in lb.claims_markdown(list(decided.values()))


def test_update_gain_with_the_paragon_of_another_spec():
    n2o, o2o, paragon = [0.26, 0.27, 0.25], [0.20, 0.22, 0.21], [0.40, 0.41, 0.37]
    runs = {"bct": {s: fake_results("quick-bct", s, o2o[s], {"bct": {"n2o": n2o[s], "n2n": 0.5}})
                    for s in range(3)},
            "independent": {s: fake_results("quick-independent", s, o2o[s], {
                "independent": {"n2o": 0.0, "n2n": paragon[s], "gain": -1.0}}) for s in range(3)}}
    [gain] = [c for c in lb.evaluate_claims(lb.aggregate(runs).rows, claims=PAPERS)
              if c["claim"] == "BCT update gain > 0"]
    expected = [(n2o[s] - o2o[s]) / (paragon[s] - o2o[s]) for s in range(3)]
    assert gain["left"]["values"] == pytest.approx({str(s): g for s, g in enumerate(expected)})
    assert gain["left"]["metric"].startswith("update_gain (paragon: independent")
    assert gain["difference"] == pytest.approx(sum(expected) / 3)
    assert gain["se"] == pytest.approx(sample_std(expected) / math.sqrt(3))
    assert gain["status"] == "holds"
    del runs["independent"]
    [gain] = [c for c in lb.evaluate_claims(lb.aggregate(runs).rows, claims=PAPERS)
              if c["claim"] == "BCT update gain > 0"]
    assert gain["status"] == "not measured" and gain["left"]["metric"] == "update_gain"


def test_a_claim_is_data_and_one_function_decides_it():
    claim = lb.Claim("ract n2n beats bct n2n", "test", lb.Fig("ract", "ract", "n2n"), "<",
                     lb.Fig("quick-bct", "bct", "n2n"))       # by stem or by spec name
    [out] = lb.evaluate_claims(lb.aggregate(suite_runs([0, 1, 2])).rows, claims=[claim])
    assert out["status"] == "inconclusive" and out["difference"] == 0.0
    assert out["right"]["spec"] == "quick-bct" and out["right"]["n"] == 3


# --------------------------------------------------------------------------- sweeps
def sweep_spec(name, weight=1.0, hidden=1024, loss="cosine"):
    return {"name": name, "seed": 0, "data": {"dataset": {"name": "synthetic"}},
            "new": [{"name": "m", "losses": [{"name": "classification", "weight": 1.0},
                                             {"name": loss, "weight": weight}],
                     "upgrader": {"name": "bict-mlp", "params": {"hidden_dim": hidden}}}]}


def test_sweeps_are_specs_that_differ_in_one_field_and_get_a_plot(tmp_path):
    specs = {"w1": sweep_spec("w1", 1.0), "w3": sweep_spec("w3", 3.0),
             "w2": sweep_spec("w2", 2.0), "other": sweep_spec("other", 2.0, loss="l2"),
             "psi512": sweep_spec("psi512", hidden=512), "psi4096": sweep_spec("psi4096",
                                                                               hidden=4096)}
    [sweep] = lb.find_sweeps(specs, lb.LOSS_WEIGHT)
    assert sweep.path == "new.0.losses.1.weight" and sweep.model == 0
    assert sweep.points == [(1.0, "w1"), (2.0, "w2"), (3.0, "w3")]
    widths = lb.find_sweeps(specs, lb.PSI_WIDTH, (("upgrader.name", "bict-mlp"),))
    assert [s.points for s in widths] == [[(512, "psi512"), (1024, "w1"), (4096, "psi4096")]]
    assert lb.find_sweeps(specs, lb.PSI_WIDTH, (("upgrader.name", "fct"),)) == []

    n2u = {"psi512": 0.20, "w1": 0.22, "psi4096": 0.25, "w2": 0.2, "w3": 0.2, "other": 0.2}
    runs = {stem: {s: fake_results(stem, s, 0.1, {"m": {"n2o": 0.15, "n2u": n2u[stem] + s / 1000,
                                                        "n2n": 0.4}}, {**spec, "seed": s})
                   for s in (0, 1)} for stem, spec in specs.items()}
    agg = lb.aggregate(runs)
    psi = next(c for c in lb.evaluate_claims(agg.rows, agg.specs, PAPERS)
               if c["claim"].startswith("BiCT: wider psi"))
    assert psi["left"]["spec"] == "psi4096" and psi["right"]["spec"] == "psi512"
    assert psi["difference"] == pytest.approx(0.05) and psi["status"] == "holds"
    target = tmp_path / "board" / "LEADERBOARD.md"
    target.parent.mkdir()
    target.write_text(f"STALE\n{lb.NOTES_START}\nkept by hand\n{lb.NOTES_END}\nSTALE\n")
    (target.parent / "leaderboard_backfill_gone.png").write_bytes(b"stale")
    written = lb.write_aggregate(agg, target, "test", claims=PAPERS)
    assert "kept by hand" in target.read_text() and "STALE" not in target.read_text()
    assert not (target.parent / "leaderboard_backfill_gone.png").exists()
    sweep_plots = [p for name, p in written["plots"].items() if name.startswith("loss-weight")]
    assert len(sweep_plots) == 1 and sweep_plots[0].stat().st_size > 0
    assert "No loss-weight sweep" not in written["markdown"].read_text()


# --------------------------------------------------------------------------- end to end
def write_tiny_suite(folder: Path, stem: str = "bct") -> Path:
    spec = tiny_spec()
    spec["name"] = f"tiny-{stem}"
    one_epoch = {**TRAIN, "epochs": 1}
    spec["old"]["train"] = spec["new_defaults"]["train"] = one_epoch
    spec["new_defaults"]["encoder"] = spec["old"]["encoder"]   # one dim: backfill curves
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_bench_runs_seeds_skips_finished_resumes_unfinished_and_writes_a_leaderboard(
        tmp_path, monkeypatch, capsys):
    import compatzoo.bench as bench
    import compatzoo.experiment as experiment

    suite, out = write_tiny_suite(tmp_path / "suite"), tmp_path / "runs"
    assert main(["bench", str(suite), "--seeds", "0", "1", "--out", str(out)]) == 0
    results = {s: out / "bct" / f"seed-{s}" / "results.json" for s in (0, 1)}
    saved = {s: json.loads(p.read_text()) for s, p in results.items()}
    assert [saved[s]["seed"] for s in (0, 1)] == [0, 1]
    assert saved[1]["spec"]["seed"] == 1 and saved[0]["dataset"]["generator_version"] == 1
    assert saved[0]["evaluation"]["table"] != saved[1]["evaluation"]["table"]
    mtimes = {s: p.stat().st_mtime_ns for s, p in results.items()}

    def no_run(task):
        raise AssertionError(f"{task['stem']} seed {task['seed']} ran again")

    with monkeypatch.context() as patch:
        patch.setattr(bench, "run_one", no_run)
        capsys.readouterr()
        assert main(["bench", str(suite), "--seeds", "0", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count(": skipped (finished earlier)") == 2
    assert {s: p.stat().st_mtime_ns for s, p in results.items()} == mtimes

    # an unfinished run is resumed: its trained models are reloaded, not trained again
    manifest = out / "bct" / "seed-1" / "compatzoo-run.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "finished": False}))
    results[1].unlink()
    monkeypatch.setattr(experiment, "train_model", lambda *a, **k: pytest.fail("retrained"))
    assert main(["bench", str(suite), "--seeds", "0", "1", "--out", str(out)]) == 0
    again = json.loads(results[1].read_text())
    assert again["evaluation"]["table"] == saved[1]["evaluation"]["table"]
    log = json.loads((out / "bench.json").read_text())
    assert {k: v["status"] for k, v in log["runs"].items()} == {"bct/seed-0": "skipped",
                                                               "bct/seed-1": "finished"}

    board = tmp_path / "board" / "LEADERBOARD.md"
    assert main(["leaderboard", str(out), "--out", str(board), "--claims", str(CLAIMS_FILE)]) == 0
    text = board.read_text()
    assert "±" in text and "| tiny-bct | bct |" in text and "## Claims" in text
    assert list(board.parent.glob("leaderboard_*.png"))
    claims = json.loads((board.parent / "claims.json").read_text())["claims"]
    criterion = next(c for c in claims if c["claim"] == "BCT criterion: n2o > o2o")
    assert criterion["n"] == 2 and criterion["status"] != "not measured"
    o2o = [saved[s]["evaluation"]["table"]["o2o"][PRIMARY] for s in (0, 1)]
    assert criterion["right"]["mean"] == pytest.approx(sum(o2o) / 2)
    assert criterion["right"]["std"] == pytest.approx(sample_std(o2o))


def test_a_failing_spec_is_recorded_and_the_others_finish(tmp_path, capsys):
    suite, out = write_tiny_suite(tmp_path / "suite"), tmp_path / "runs"
    broken = yaml.safe_load((suite / "bct.yaml").read_text())
    broken["data"]["dataset"] = {"name": "image-folder",
                                 "params": {"root": str(tmp_path / "no-such-images")}}
    (suite / "broken.yaml").write_text(yaml.safe_dump(broken))
    assert main(["bench", str(suite), "--seeds", "0", "--jobs", "2", "--out", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().out
    log = json.loads((out / "bench.json").read_text())["runs"]
    assert log["bct/seed-0"]["status"] == "finished"
    assert log["broken/seed-0"]["status"] == "failed"
    assert "no-such-images" in log["broken/seed-0"]["error"]
    assert (out / "bct" / "seed-0" / "results.json").is_file()
    board = out / "LEADERBOARD.md"
    assert main(["leaderboard", str(out)]) == 0
    assert "broken/seed-0" in board.read_text()


def test_usage_errors_exit_2(tmp_path, capsys):
    suite = write_tiny_suite(tmp_path / "suite")
    assert main(["bench", str(suite), "--only", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["leaderboard", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_a_broken_claims_file_is_refused_with_the_format_named(tmp_path):
    from compatzoo.errors import SpecError

    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - name: x\n    paper: p\n    direction: '>='\n")
    with pytest.raises(SpecError, match="not a claims file"):
        lb.load_claims(bad)
    with pytest.raises(SpecError, match="cannot read the claims file"):
        lb.load_claims(tmp_path / "missing.yaml")
    assert len(PAPERS) == 18 and {c.paper for c in PAPERS} >= {"BCT (Shen et al. 2020)"}
