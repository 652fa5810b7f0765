"""The upgrade job against the upgrader's own batched forward pass on the same data in
memory, measured in one run: the job's I/O overhead, its peak memory at two gallery
sizes, and rows/s under torchrun (2 processes) and Ray (2 CPUs) relative to 1 process.

    python benchmarks/bench_gallery_jobs.py [--rows 1000000] [--small 100000] [--dim 512]
        [--repeats 2] [--work /tmp/bench-jobs] [--parts times rss parallel] [--out jobs.json]

The upgrader is a BiCT psi (512 -> 512 -> 512 -> 512 -> 512, random weights), in a bundle
with tiny encoders. Times are best of ``--repeats``, interleaved; memory is each job's
peak RSS in a fresh process. Figures print as JSON and go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

CHUNK = 65536


def make_bundle(folder: Path, dim: int) -> Path:
    import compatzoo
    from compatzoo.bundles import BundleContents, Model, write_bundle
    from compatzoo.bundles.format import ComponentEntry

    torch.manual_seed(0)
    encoder = ComponentEntry(name="tiny-cnn", params={"widths": [4, 8], "embedding_dim": dim})
    psi = ComponentEntry(name="bict-mlp", params={"hidden_dim": dim})
    contents = BundleContents(
        name="bench", experiment="bench", seed=0, spec={}, lineage=["old", "new"],
        preprocess=None,
        old=Model("old", encoder, compatzoo.create_encoder("tiny-cnn", widths=[4, 8],
                                                           embedding_dim=dim)),
        new=Model("new", encoder, compatzoo.create_encoder("tiny-cnn", widths=[4, 8],
                                                           embedding_dim=dim)),
        upgrader_spec=psi,
        upgrader=compatzoo.create_upgrader("bict-mlp", dim, dim, hidden_dim=dim).eval())
    write_bundle(folder, contents)
    return folder


def make_gallery(folder: Path, rows: int, dim: int, per: int = 125_000) -> dict[str, Path]:
    """The same rows as .npy shards and as Parquet files (an id column beside), ``per``
    rows a file, so galleries of any size are files of the same size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    files = max(1, rows // per)
    per = rows // files
    for kind in ("npy", "parquet"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        block = rng.standard_normal((per, dim), dtype=np.float32)
        np.save(folder / "npy" / f"part-{i:03d}.npy", block)
        pq.write_table(pa.table({"id": np.arange(i * per, (i + 1) * per),
                                 "embedding": pa.FixedSizeListArray.from_arrays(
                                     pa.array(block.reshape(-1)), dim)}),
                       folder / "parquet" / f"part-{i:03d}.parquet", row_group_size=65536)
    return {"npy": folder / "npy", "parquet": folder / "parquet"}


def run_job(bundle: Path, inputs: Path, out: Path, extra: list[str] | None = None,
            launcher: list[str] | None = None) -> dict:
    """The CLI job in a fresh process: (seconds, peak RSS of the busiest process)."""
    shutil.rmtree(out, ignore_errors=True)
    # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's across fork+exec)
    code = ("import re, sys, time; from compatzoo.cli import main; t = time.perf_counter(); "
            "code = main(sys.argv[1:]); hwm = re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read()).group(1); "
            "print('BENCH', time.perf_counter() - t, hwm, flush=True); sys.exit(code)")
    command = [*(launcher or [sys.executable]), "-c", code] if not launcher else [
        *launcher, sys.executable, "-c", code]
    args = ["upgrade", str(bundle), "--input", str(inputs), "--output", str(out), "--quiet",
            "--chunk-rows", str(CHUNK), *(extra or [])]
    result = subprocess.run([*command, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("BENCH")]
    return {"seconds": max(float(line[1]) for line in lines),
            "peak_rss_mb": max(int(line[2]) for line in lines) / 1024}


def baseline(bundle: Path, inputs: Path) -> float:
    """The upgrader's batched forward pass over the same rows already in memory."""
    from compatzoo.bundles import load

    upgrader = load(bundle).upgrader
    rows = np.concatenate([np.load(p) for p in sorted(inputs.glob("*.npy"))])
    started = time.perf_counter()
    upgrader.upgrade(rows, chunk_size=CHUNK)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-jobs"))
    parser.add_argument("--parts", nargs="+", default=["times", "rss", "parallel"],
                        choices=["times", "rss", "parallel"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    bundle = make_bundle(work / "bundle", args.dim)
    big = make_gallery(work / "big", args.rows, args.dim)
    small = make_gallery(work / "small", args.small, args.dim)
    figures = {"rows": args.rows, "small_rows": args.small, "dim": args.dim,
               "upgrader": "bict-mlp, hidden 512"}
    if "times" in args.parts:
        times = {"baseline": [], "npy": [], "parquet": []}
        for _ in range(args.repeats):                      # interleaved, best of N
            times["baseline"].append(baseline(bundle, big["npy"]))
            for kind in ("npy", "parquet"):
                times[kind].append(run_job(bundle, big[kind], work / f"out-{kind}")["seconds"])
        best = {k: min(v) for k, v in times.items()}
        figures.update({"baseline_s": round(best["baseline"], 2),
                        **{f"{kind}_s": round(best[kind], 2) for kind in ("npy", "parquet")},
                        **{f"{kind}_overhead": round(best[kind] / best["baseline"] - 1, 3)
                           for kind in ("npy", "parquet")},
                        "all_times": {k: [round(x, 2) for x in v] for k, v in times.items()}})
    if "rss" in args.parts:
        for kind in ("npy", "parquet"):
            for name, gallery in (("small", small), ("big", big)):
                rss = run_job(bundle, gallery[kind], work / f"rss-{kind}-{name}")["peak_rss_mb"]
                figures[f"{kind}_peak_rss_mb_{name}"] = round(rss)
    if "parallel" in args.parts:
        one = run_job(bundle, big["npy"], work / "one")["seconds"]
        two = run_job(bundle, big["npy"], work / "two",
                      launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node", "2", "--no-python"])["seconds"]
        ray = run_job(bundle, big["npy"], work / "ray",
                      extra=["--engine", "ray", "--workers", "2"])["seconds"]
        figures.update({"one_process_s": round(one, 2), "torchrun_2_s": round(two, 2),
                        "ray_2_s": round(ray, 2),
                        "torchrun_2_speed": round(one / two, 2),
                        "ray_2_speed": round(one / ray, 2)})
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
