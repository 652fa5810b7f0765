"""`compatzoo fit-adapter` on embeddings exported from two quick-suite models.

Drift-Adapter's setting: two independently trained models and nothing but their paired
embeddings. This exports the old and the new embeddings of the training images from a
run's bundle (e.g. the quick suite's `adapters` or `independent` spec), runs
`compatzoo fit-adapter` on them for each method and direction, then measures each adapter
bundle on the run's real query/gallery split with its labels: n2o (no adapter), n2u (the
gallery upgraded by a gallery adapter) or a2o (queries mapped into the old space by a
query adapter), n2n (full re-embedding), and the share of n2n recovered.

    python benchmarks/fit_adapter_on_suite.py runs/suite/adapters/bundles/independent \
        [--methods procrustes affine residual-mlp lambda-orthogonal bict-mlp] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import compatzoo
from compatzoo.data import SyntheticParams, make_synthetic
from compatzoo.retrieval import evaluate

METRICS = ("map@100", "cmc@1")
#: as in benchmarks/suites/quick/adapters.yaml (BiCT's own psi is 4096 wide, 30 epochs)
PARAMS = {"affine": ["ridge=0.001"], "bict-mlp": ["hidden_dim=1024", "epochs=20"]}


def export(bundle, images, model: str) -> np.ndarray:
    return np.asarray(bundle.encode(images, model=model), dtype=np.float32)


def fit(old: Path, new: Path, method: str, direction: str, out: Path) -> str:
    """Run the command as a user would; its held-out report is returned as printed."""
    done = subprocess.run(
        [sys.executable, "-m", "compatzoo", "fit-adapter", "--old", str(old), "--new", str(new),
         "--method", method, "--direction", direction, "--out", str(out),
         *(["--params", *PARAMS[method]] if method in PARAMS else [])],
        capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fit-adapter {method} {direction} failed:\n{done.stderr}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a run's bundle with old and new encoders")
    parser.add_argument("--methods", nargs="+", default=["procrustes", "affine", "residual-mlp",
                                                        "lambda-orthogonal", "bict-mlp"])
    parser.add_argument("--out", type=Path, default=Path("runs/fit-adapter-on-suite"))
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    args.out.mkdir(parents=True, exist_ok=True)
    source = compatzoo.load(args.bundle)
    data = make_synthetic(SyntheticParams())        # the quick suite's dataset
    pairs = {model: args.out / f"train-{model}.npy" for model in ("old", "new")}
    for model, path in pairs.items():
        np.save(path, export(source, data.train, model))
    query = {m: export(source, data.query, m) for m in ("old", "new")}
    gallery = {m: export(source, data.gallery, m) for m in ("old", "new")}
    labels = (data.query.labels, data.gallery.labels)

    def score(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
        return evaluate(q, labels[0], g, labels[1], metrics=METRICS)

    baseline = {"o2o": score(query["old"], gallery["old"]),
                "n2o": score(query["new"], gallery["old"]),
                "n2n": score(query["new"], gallery["new"])}
    rows = []
    for method in args.methods:
        for direction in ("gallery", "query"):
            folder = args.out / f"{method}-{direction}"
            report = fit(pairs["old"], pairs["new"], method, direction, folder)
            upgrader = compatzoo.load(folder).upgrader
            setting, value = (
                ("n2u", score(query["new"], upgrader.upgrade(gallery["old"])))
                if direction == "gallery" else
                ("a2o", score(upgrader.upgrade(query["new"]), gallery["old"])))
            rows.append({"method": method, "direction": direction, "setting": setting,
                         **value, "recovered": value["map@100"] / baseline["n2n"]["map@100"],
                         "held_out_report": report})
            print(f"{method:<18} {direction:<8} {setting}  map@100 {100 * value['map@100']:6.2f}"
                  f"  cmc@1 {100 * value['cmc@1']:6.2f}  ({100 * rows[-1]['recovered']:.1f}% "
                  "of n2n map@100)", flush=True)
    print("  ".join(f"{k} map@100 {100 * v['map@100']:.2f}" for k, v in baseline.items()))
    (args.out / "results.json").write_text(json.dumps(
        {"bundle": str(args.bundle), "pairs": len(data.train), "baseline": baseline,
         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
