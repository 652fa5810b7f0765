"""Reference rows: the papers' figures a spec carries (``references``), validated like every
spec field, left out of the run fingerprint and of dumps when absent, and shown in the
leaderboard beside the measured figures."""

import hashlib
import json
from pathlib import Path

import pytest
from test_bench import PRIMARY, fake_results

from compatzoo import leaderboard as lb
from compatzoo.cli import main
from compatzoo.errors import SpecError
from compatzoo.run_folder import spec_fingerprint
from compatzoo.specs import load_spec

ROOT = Path(__file__).resolve().parents[1]
SUITES = sorted((ROOT / "benchmarks" / "suites").rglob("*.yaml"))
PAPER = sorted((ROOT / "benchmarks" / "suites" / "paper").glob("*.yaml"))


def old_fingerprint(spec_json: dict) -> str:
    """The fingerprint as runs in progress recorded it, before references existed."""
    return hashlib.sha256(json.dumps(spec_json, sort_keys=True).encode()).hexdigest()


def spec_with(references: list[dict], **evaluation) -> dict:
    encoder = {"name": "tiny-cnn", "params": {"widths": [8, 8, 8, 8], "embedding_dim": 16}}
    return {
        "name": "refs", "data": {"dataset": {"name": "synthetic"}},
        "old": {"encoder": encoder, "head": "linear"},
        "new": [{"name": "bct", "encoder": encoder, "head": "linear",
                 "losses": ["classification", "bct"]},
                {"name": "fct", "encoder": encoder, "head": "linear",
                 "upgrader": {"name": "fct-transformation", "params": {"side_info": "none"}},
                 "direct_upgrades": [{"source": "old", "name": "alt", "upgrader": "identity"}]}],
        "evaluation": {"metrics": ["map@100", "cmc@1"], "primary": "map@100",
                       "backfill": {"schedulers": ["random"], "models": ["bct"]},
                       **evaluation},
        "references": references}


def ref(**fields) -> dict:
    return {"model": "bct", "column": "n2o", "metric": "cmc@1", "value": 46.9,
            "source": "FCT table 1", **fields}


def test_a_spec_without_references_dumps_and_fingerprints_as_before():
    for path in SUITES:
        spec = load_spec(path)
        dumped = spec.model_dump(mode="json")
        if spec.references:
            continue
        assert "references" not in dumped and "references" not in spec.model_dump_json()
        assert spec_fingerprint(dumped) == old_fingerprint(dumped), path.name


def test_references_are_dumped_but_change_no_fingerprint():
    with_refs = load_spec(spec_with([ref()])).model_dump(mode="json")
    without = load_spec(spec_with([])).model_dump(mode="json")
    assert with_refs["references"][0]["value"] == 46.9 and "references" not in without
    assert spec_fingerprint(with_refs) == spec_fingerprint(without) == old_fingerprint(without)
    assert load_spec(with_refs).references[0].source == "FCT table 1"   # dumps load again


@pytest.mark.parametrize("bad, message", [
    (ref(pages=3), "references[1].pages: unknown field"),
    (ref(column="n2x"), "String should match pattern"),
    (ref(value=146.9), "less than or equal to 100"),
    (ref(source=""), "at least 1 character"),
    (ref(model="paragon"), "model must be a new model ['bct', 'fct']"),
    (ref(column="n2u"), "n2u needs an upgrader, and 'bct' has none"),
    (ref(model="fct/alt"), "the row of a direct upgrade has only the column n2u"),
    (ref(column="auc.fastfill-sigma"),
     "no backfill curve of 'bct' with the scheduler 'fastfill-sigma'"),
    (ref(model="fct", column="auc.random"), "no backfill curve of 'fct'"),
    (ref(metric="cmc@5"), "the spec does not evaluate cmc@5"),
    (ref(metric="mAP@100"), "the spec does not evaluate mAP@100"),
])
def test_a_bad_reference_is_refused_with_its_place(bad, message):
    with pytest.raises(SpecError) as caught:
        load_spec(spec_with([ref(), bad]))
    assert message in str(caught.value)


def test_rows_columns_and_metrics_a_spec_has_are_accepted():
    spec = load_spec(spec_with([
        ref(column="o2o"), ref(column="auc.random", metric="map@100"),
        ref(model="fct", column="n2u"), ref(model="fct/alt", column="n2u"),
        ref(metric="tar@far=1e-4", note="IJB-C; runs do not compute it")]))
    assert [r.column for r in spec.references] == ["o2o", "auc.random", "n2u", "n2u", "n2o"]


def test_every_paper_spec_cites_its_figures():
    for path in PAPER:
        spec = load_spec(path)
        assert spec.references, path.name
        assert all(r.source for r in spec.references)


# --------------------------------------------------------------------------- leaderboard
def runs_with_references(seeds=(0, 1)) -> dict:
    spec = {"name": "bct-imagenet", "new": [{"name": "bct"}], "references": [
        {"model": "bct", "column": "n2o", "metric": PRIMARY, "value": 46.9,
         "source": "FCT table 1", "note": None},
        {"model": "bct", "column": "o2o", "metric": PRIMARY, "value": 46.5,
         "source": "FCT table 1", "note": "ImageNet val, leave-one-out"},
        {"model": "bct", "column": "auc.random", "metric": PRIMARY, "value": 55.0,
         "source": "BCT fig. 3", "note": None},
        {"model": "bct", "column": "n2o", "metric": "tar@far=1e-4", "value": 80.25,
         "source": "BCT table 1", "note": "IJB-C"}]}
    return {"bct-imagenet": {s: fake_results("bct-imagenet", s, 0.40 + s / 100, {
        "bct": {"n2o": 0.45 + s / 100, "n2n": 0.6, "auc": {"random": 0.5}}}, spec=spec)
        for s in seeds}}


def test_reference_rows_stand_beside_the_measured_figures(tmp_path):
    agg = lb.aggregate(runs_with_references())
    n2o, o2o, auc, external = agg.references
    assert (n2o["stem"], n2o["model"], n2o["column"], n2o["value"]) == (
        "bct-imagenet", "bct", "n2o", 46.9)
    assert n2o["measured"].mean == pytest.approx(0.455) and n2o["seeds"] == [0, 1]
    assert o2o["measured"].values == pytest.approx({0: 0.40, 1: 0.41})
    assert auc["measured"].mean == pytest.approx(0.5)
    assert external["measured"] is None
    table = lb.references_markdown(agg.references)
    assert ("| bct-imagenet | bct | n2o | map@100 | **46.90** (paper) | 45.50 ± 0.71 | -1.40 | "
            "FCT table 1 |  | 2 |") in table
    assert "| **80.25** (paper) | not measured | – | BCT table 1 | IJB-C |" in table

    written = lb.write_aggregate(agg, tmp_path / "LEADERBOARD.md", "paper")
    text = written["markdown"].read_text()
    assert lb.REFERENCES_TEXT in text and "**46.50** (paper)" in text
    figures = json.loads(written["figures"].read_text())
    assert [r["value"] for r in figures["references"]] == [46.9, 46.5, 55.0, 80.25]
    assert figures["references"][0]["measured"]["values"] == {"0": 0.45, "1": 0.46}


def test_one_run_and_a_suite_without_references():
    one = runs_with_references(seeds=(0,))["bct-imagenet"][0]
    rows = lb.reference_rows(one)
    assert rows[0]["measured"] == pytest.approx(0.45) and rows[0]["spec"] == "bct-imagenet"
    _, markdown = lb.leaderboard_markdown(lb.leaderboard_rows(one), [], "paper",
                                          references=rows)
    assert "| **46.90** (paper) | 45.00 | -1.90 |" in markdown
    plain = fake_results("quick-bct", 0, 0.2, {"bct": {"n2o": 0.3, "n2n": 0.5}})
    assert lb.aggregate({"bct": {0: plain}}).references == []
    assert lb.REFERENCES_TEXT not in lb.leaderboard_markdown(lb.leaderboard_rows(plain), [],
                                                             "quick")[1]


def test_the_leaderboard_shows_the_references_the_spec_file_gives_now(tmp_path, capsys):
    """Finished runs are not redone for a corrected paper figure (the fingerprint leaves
    references out), so `compatzoo leaderboard` reads them from the suite's spec files."""
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir()
    (suite / "refs.yaml").write_text(json.dumps(spec_with([ref(metric=PRIMARY, value=47.5)])))
    recorded = {"name": "refs", "new": [{"name": "bct"}],
                "references": [ref(metric=PRIMARY, value=46.9)]}
    folder = out / "refs" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "compatzoo-run.json").write_text(json.dumps({"finished": True}))
    (folder / "results.json").write_text(json.dumps(fake_results(
        "refs", 0, 0.4, {"bct": {"n2o": 0.45, "n2n": 0.6}}, spec=recorded)))
    (out / "bench.json").write_text(json.dumps({"suite": str(suite), "seeds": [0], "runs": {}}))
    assert main(["leaderboard", str(out)]) == 0
    board = (out / "LEADERBOARD.md").read_text()
    assert "| refs | bct | n2o | map@100 | **47.50** (paper) | 45.00 | -2.50 |" in board
    (suite / "refs.yaml").unlink()                  # no spec file: the recorded figure
    assert main(["leaderboard", str(out)]) == 0
    assert "**46.90** (paper)" in (out / "LEADERBOARD.md").read_text()
