"""Every shipped suite spec validates and plans (no data is read): a typo or a stale
parameter in benchmarks/suites/ fails here, not after hours on a GPU."""

from pathlib import Path

import pytest

from compatzoo.lineage import plan
from compatzoo.specs import load_spec

SUITES = sorted((Path(__file__).parent.parent / "benchmarks" / "suites").rglob("*.yaml"))


@pytest.mark.parametrize("path", SUITES, ids=[f"{p.parent.name}/{p.stem}" for p in SUITES])
def test_suite_spec_validates_and_plans(path):
    plan(load_spec(path))


def test_the_paper_recipe_shares_its_batches_over_8_gpus():
    spec = load_spec(Path(__file__).parent.parent / "benchmarks/suites/paper/gldv2-roxford.yaml")
    assert spec.data.dataset.name == "gldv2"
    assert all(model.train.batch_size % 8 == 0 for model in [spec.old, *spec.new])
    assert spec.evaluation.metrics == ["rmap-medium", "rmap-hard"]
