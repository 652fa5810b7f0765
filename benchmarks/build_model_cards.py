"""Train the small bundles shipped in model_cards/ and write their cards.

    python benchmarks/build_model_cards.py [--names bct-synth ...] [--runs runs/cards]

For each card: run its spec.yaml (or reuse a finished run folder), write the bundle in
float32 and in float16, measure both again from their own files on the spec's data
(o2o, n2o, n2u, n2n), and ship float16 when no figure moves by 0.1 point or more (else
float32). The card records the run's figures and, for float16, both measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from compatzoo.bundles import load  # noqa: E402
from compatzoo.bundles.card import model_card  # noqa: E402
from compatzoo.bundles.format import CARD, read_config  # noqa: E402
from compatzoo.bundles.from_run import bundle_from_run_dir  # noqa: E402
from compatzoo.experiment import run_experiment  # noqa: E402
from compatzoo.specs import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"
SHIPPED = {
    "bct-synth": "BCT (Shen et al. 2020) on the synthetic benchmark: the new model queries "
                 "the old gallery as it is",
    "ract-synth": "RACT (Zhang et al. 2022) on the synthetic benchmark, with the new head "
                  "for the uncertainty backfill order",
    "bict-synth": "BiCT (Su et al. 2022) on the synthetic benchmark: cosine compatibility "
                  "and the psi upgrader",
    "fct-synth": "FCT (Ramanujan et al. 2022) on the synthetic benchmark: h(old embedding, "
                 "SimCLR side information)",
}
TOLERANCE = 0.001   # 0.1 point


def build(name: str, runs: Path) -> None:
    spec = load_spec(CARDS / name / "spec.yaml")
    run_dir = runs / name
    if not (run_dir / "results.json").is_file():
        run_experiment(spec, run_dir, progress=False)
    data = spec.data.dataset.build()
    metrics, batch = spec.evaluation.metrics, spec.evaluation.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        figures = {}
        for dtype in ("float32", "float16"):
            bundle_from_run_dir(run_dir, name, Path(tmp) / dtype, dtype=dtype)
            figures[dtype] = load(Path(tmp) / dtype).measure(data, metrics, batch)
        moved = max(abs(figures["float16"][s][m] - figures["float32"][s][m])
                    for s in figures["float32"] for m in metrics)
        dtype = "float16" if moved < TOLERANCE else "float32"
        target = CARDS / name
        for entry in list(target.iterdir()):
            if entry.name not in ("spec.yaml",):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in (Path(tmp) / dtype).iterdir():
            shutil.move(str(entry), target / entry.name)
    config = read_config(target)
    run_figures = config.evaluation["settings"]
    rows = "\n".join(
        f"| `{s}` | {m} | {100 * run_figures[s][m]:.2f} | {100 * figures['float32'][s][m]:.2f} "
        f"| {100 * figures['float16'][s][m]:.2f} |" for s in run_figures for m in metrics)
    note = f"""
## Storage

The weights are stored as {dtype}. Measured again from the bundle's own files on the
spec's data (largest change from float32 to float16: {100 * moved:.3f} points; float16 is
shipped when it is below {100 * TOLERANCE:.1f}):

| setting | metric | the run | float32 bundle | float16 bundle |
|---|---|---|---|---|
{rows}
"""
    card = model_card(config, load_as=name, meta={"description": SHIPPED[name],
                                                  "status": "shipped"})
    (target / CARD).write_text(card + note)
    (target / "figures.json").write_text(json.dumps(
        {"dtype": dtype, "largest_change": moved, "measured": figures[dtype]}, indent=2))
    sizes = sum(f.stat().st_size for f in target.rglob("*.safetensors"))
    print(f"{name}: {dtype} ({sizes / 1e6:.2f} MB of weights; float16 moved the figures by "
          f"at most {100 * moved:.3f} points)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", nargs="+", default=list(SHIPPED), choices=list(SHIPPED))
    parser.add_argument("--runs", type=Path, default=Path("runs/cards"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    for name in args.names:
        build(name, args.runs)
    total = sum(f.stat().st_size for f in CARDS.rglob("*.safetensors"))
    print(f"shipped weights: {total / 1e6:.2f} MB in all")


if __name__ == "__main__":
    main()
