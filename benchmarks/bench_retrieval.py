"""Speed and memory of compatzoo's retrieval engine.

For each gallery size G (d = 512, 1,000 queries by default) it measures:
  - ``evaluate`` (map@100, cmc@1): time, peak memory, achieved GFLOP/s (2*Q*G*d / time)
    against a plain torch matmul of the same shape timed in the same run;
  - a 21-point ``backfill_curve`` against 21 plain evaluations of the mixed galleries
    (above ``--naive-max`` the 21 evaluations are extrapolated from one, and marked so);
  - the curve's cost in evaluations, timed in one process with ``evaluate`` interleaved
    (best of ``--repeat``), optionally beside another implementation of
    ``compatzoo/retrieval/curves.py`` (``--curve-baseline``, e.g. the committed one from
    ``git show HEAD:compatzoo/retrieval/curves.py``), whose results must be identical;
  - leave-one-out ``evaluate`` (map and map@100, 100 classes) at ``--loo-sizes``: time
    and peak memory;
  - faiss ``IndexFlatIP.search`` against ``top_k`` with each backend (torch, faiss, auto)
    and ``evaluate`` against the search, at ``--backends-gallery``
    (``bench_search_backends.py``, run from here).
Every (size, task) runs in a fresh subprocess, so its peak resident memory
(``ru_maxrss``, which sees torch/faiss allocations that tracemalloc does not) is its own;
data are generated in place so the task's peak, not the data generation's, is measured.

    python benchmarks/bench_retrieval.py --quick
    python benchmarks/bench_retrieval.py --sizes 1e4 1e5 --out results.json
    git show HEAD:compatzoo/retrieval/curves.py > /tmp/curves_before.py
    python benchmarks/bench_retrieval.py --sizes 1e4 1e5 --tasks curve_ratio \
        --loo-sizes --backends-gallery 0 --curve-baseline /tmp/curves_before.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

METRICS = ("map@100", "cmc@1")
TASKS = ("matmul", "evaluate", "curve", "curve_ratio", "naive", "evaluate_map", "loo")


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _features(rng, n: int, dim: int):
    """Gaussian float32 features written block by block (no full-size temporaries)."""
    import numpy as np

    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65536):
        rng.standard_normal(dtype=np.float32, out=out[start:start + 65536])
    return out


def _matmul(query, gallery, block: int | None) -> None:
    import torch

    q, g = torch.from_numpy(query), torch.from_numpy(gallery)
    if block is None:
        q @ g.T
    else:
        for start in range(0, len(g), block):
            q @ g[start:start + block].T


def _load_curves(path: str):
    """``backfill_curve`` of another copy of compatzoo/retrieval/curves.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("curves_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.backfill_curve


def curve_ratio(query, query_labels, gallery, gallery_new, gallery_labels, order, points: int,
                repeat: int, baseline: str | None) -> dict:
    """The curve and ``evaluate`` (and a baseline curve) timed interleaved in this process:
    on a shared machine, separate processes see different loads and their ratio drifts."""
    from compatzoo.retrieval import backfill_curve, evaluate

    curves = {"curve": backfill_curve}
    if baseline:
        curves["baseline"] = _load_curves(baseline)
    times: dict[str, list[float]] = {"evaluate": [], **{name: [] for name in curves}}
    results = {}
    for _ in range(repeat):
        start = time.perf_counter()
        evaluate(query, query_labels, gallery, gallery_labels, METRICS)
        times["evaluate"].append(time.perf_counter() - start)
        for name, function in curves.items():
            start = time.perf_counter()
            results[name] = function(query, gallery, gallery_new, query_labels, gallery_labels,
                                     order, points=points, metrics=METRICS).to_dict()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    figures = {"seconds": best["curve"], "evaluate_seconds": best["evaluate"],
               "curve_over_evaluate": best["curve"] / best["evaluate"], "all_seconds": times}
    if baseline:
        figures.update(baseline_seconds=best["baseline"],
                       baseline_over_evaluate=best["baseline"] / best["evaluate"],
                       identical_to_baseline=results["baseline"] == results["curve"])
    return figures


def run_task(task: str, size: int, queries: int, dim: int, points: int, repeat: int,
             threads: int, baseline: str | None = None) -> dict:
    """One task on fresh data in this process; returns timings and memory."""
    import numpy as np
    import torch

    from compatzoo.retrieval import backfill_curve, evaluate

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    warm = _features(rng, 64, dim)  # load kernels and thread pools before measuring
    evaluate(warm, np.arange(64) % 4, warm, np.arange(64) % 4, METRICS)
    rss_base = _rss_kb()

    if task == "loo":  # leave-one-out, FCT's protocol: 100 classes, full-ranking mAP too
        items, item_labels = _features(rng, size, dim), rng.integers(0, 100, size)
        before = max(_rss_kb(), _maxrss_kb())
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            metrics = evaluate(items, item_labels, items, item_labels, ["map", "map@100"],
                               leave_one_out=True)
            times.append(time.perf_counter() - start)
        return {"task": task, "size": size, "seconds": min(times), "all_seconds": times,
                "peak_extra_mb": max(0, _maxrss_kb() - before) / 1024, "metrics": metrics}
    n_classes = max(1, size // 10)
    query = _features(rng, queries, dim)
    gallery = _features(rng, size, dim)
    query_labels = rng.integers(0, n_classes, queries)
    gallery_labels = rng.integers(0, n_classes, size)
    extra = {}
    if task in ("curve", "naive", "curve_ratio"):
        gallery_new = _features(rng, size, dim)
        order = rng.permutation(size)
    if task == "curve_ratio":
        before = max(_rss_kb(), _maxrss_kb())
        figures = curve_ratio(query, query_labels, gallery, gallery_new, gallery_labels, order,
                              points, repeat, baseline)
        return {"task": task, "size": size, **figures,
                "peak_extra_mb": max(0, _maxrss_kb() - before) / 1024}
    if task == "naive":
        mixed = gallery.copy()
    data_kb = _rss_kb() - rss_base
    before = max(_rss_kb(), _maxrss_kb())

    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        if task == "matmul":
            block = None if queries * size * 4 <= 2**30 else 65536  # no 4 GB score matrix
            extra["matmul_blocked"] = block is not None
            _matmul(query, gallery, block)
        elif task == "evaluate":
            extra["metrics"] = evaluate(query, query_labels, gallery, gallery_labels, METRICS)
        elif task == "evaluate_map":  # full-ranking mAP: two counting passes
            extra["metrics"] = evaluate(query, query_labels, gallery, gallery_labels, ["map"])
        elif task == "curve":
            curve = backfill_curve(query, gallery, gallery_new, query_labels, gallery_labels,
                                   order, points=points, metrics=METRICS)
            extra["auc"] = curve.auc
        else:  # naive: one evaluate per point on the mixed gallery (mixing not timed)
            elapsed, done = 0.0, 0
            for fraction in np.linspace(0, 1, points):
                upto = round(fraction * size)
                mixed[order[done:upto]] = gallery_new[order[done:upto]]
                done = upto
                tick = time.perf_counter()
                evaluate(query, query_labels, mixed, gallery_labels, METRICS)
                elapsed += time.perf_counter() - tick
            start = time.perf_counter() - elapsed
        times.append(time.perf_counter() - start)
    return {
        "task": task, "size": size, "seconds": min(times), "all_seconds": times,
        "peak_extra_mb": max(0, _maxrss_kb() - before) / 1024,
        "data_mb": data_kb / 1024,
        "gallery_mb": size * dim * 4 / 2**20, **extra,
    }


def _in_subprocess(task: str, size: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", task, "--sizes", str(size),
               "--queries", str(args.queries), "--dim", str(args.dim),
               "--points", str(args.points), "--repeat", str(args.repeat),
               "--threads", str(args.threads)]
    if args.curve_baseline:
        command += ["--curve-baseline", str(args.curve_baseline)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{task} at G={size} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _search_backends(args) -> dict:
    """faiss IndexFlatIP against compatzoo's top_k per backend and evaluate, in one
    process (``bench_search_backends.py``)."""
    import tempfile

    script = Path(__file__).with_name("bench_search_backends.py")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "search.json"
        done = subprocess.run([sys.executable, str(script), "--gallery",
                               str(int(args.backends_gallery)), "--queries", str(args.queries),
                               "--dim", str(args.dim), "--repeat", str(args.repeat),
                               "--out", str(out)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"search backend comparison failed:\n{done.stderr}")
        figures = json.loads(out.read_text())
    print(f"search G = {figures['gallery']:,}: " + ", ".join(
        f"{name} {seconds:.2f} s" for name, seconds in figures["seconds"].items())
        + f"; auto chose {figures['auto_choice']}; evaluate = "
        f"{figures['evaluate_over_auto_search']:.2f}x the auto search", flush=True)
    return figures


def bench_size(size: int, args) -> dict:
    flops = 2 * args.queries * size * args.dim
    result = {"size": size, "queries": args.queries, "dim": args.dim, "points": args.points}
    for task in args.tasks:
        if (task == "naive" and size > args.naive_max) or (
                task == "evaluate_map" and not args.full_ranking) or task == "loo":
            continue
        result[task] = _in_subprocess(task, size, args)
        print(f"  G={size:.0e} {task:11s} {result[task]['seconds']:8.3f} s  "
              f"peak +{result[task]['peak_extra_mb']:7.1f} MB", flush=True)
    result["summary"] = {}
    if "curve_ratio" in result:
        r = result["curve_ratio"]
        result["summary"]["curve_over_evaluate_interleaved"] = r["curve_over_evaluate"]
        line = (f"  {args.points}-point curve {r['seconds']:.3f} s = "
                f"{r['curve_over_evaluate']:.2f}x one evaluate ({r['evaluate_seconds']:.3f} s), "
                f"interleaved in one process, best of {args.repeat}")
        if "baseline_seconds" in r:
            result["summary"]["baseline_over_evaluate_interleaved"] = r["baseline_over_evaluate"]
            line += (f"; baseline {r['baseline_seconds']:.3f} s = "
                     f"{r['baseline_over_evaluate']:.2f}x, results "
                     f"{'identical' if r['identical_to_baseline'] else 'DIFFERENT'}")
        print(line, flush=True)
    if not {"matmul", "evaluate", "curve"} <= set(result):
        return result
    evaluate_s = result["evaluate"]["seconds"]
    if "naive" in result:
        naive_s, extrapolated = result["naive"]["seconds"], False
    else:
        naive_s, extrapolated = args.points * evaluate_s, True
    result["summary"] |= {
        "evaluate_gflops": flops / evaluate_s / 1e9,
        "matmul_gflops": flops / result["matmul"]["seconds"] / 1e9,
        "evaluate_vs_matmul": result["matmul"]["seconds"] / evaluate_s,
        "curve_over_evaluate": result["curve"]["seconds"] / evaluate_s,
        "naive_seconds": naive_s,
        "naive_extrapolated": extrapolated,
        "naive_over_curve": naive_s / result["curve"]["seconds"],
        "evaluate_peak_over_gallery": result["evaluate"]["peak_extra_mb"]
        / result["evaluate"]["gallery_mb"],
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e4, 1e5, 1e6],
                        help="gallery sizes (default 1e4 1e5 1e6)")
    parser.add_argument("--quick", action="store_true", help="only G = 1e4")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeat", type=int, default=3, help="runs per task; the best counts")
    parser.add_argument("--full-ranking", action="store_true",
                        help="also time evaluate with full-ranking 'map'")
    parser.add_argument("--naive-max", type=float, default=1e5,
                        help="above this size 21 evaluations are extrapolated from one")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the workers ('' leaves it unset). On a shared, "
                        "oversubscribed box the OpenMP default makes each of torch's small "
                        "parallel ops wait milliseconds for a descheduled thread")
    parser.add_argument("--loo-sizes", nargs="*", type=float, default=[1e4, 4e4],
                        help="leave-one-out peak memory at these sizes (none: skip)")
    parser.add_argument("--backends-gallery", type=float, default=2e5,
                        help="gallery size of the search backend comparison (0: skip)")
    parser.add_argument("--tasks", nargs="+", choices=[t for t in TASKS if t != "loo"],
                        default=[t for t in TASKS if t != "loo"],
                        help="per-size tasks to run (default all; loo runs at --loo-sizes)")
    parser.add_argument("--curve-baseline", type=Path,
                        help="another curves.py (e.g. from git show HEAD:...) timed beside the "
                        "curve in curve_ratio, its results checked identical")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes]

    if args.worker:
        print(json.dumps(run_task(args.worker, sizes[0], args.queries, args.dim, args.points,
                                  args.repeat, args.threads,
                                  str(args.curve_baseline) if args.curve_baseline else None)))
        return

    import torch

    results = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads,
                    "omp_wait_policy": args.omp_wait_policy or None,
                    "load_average_at_start": os.getloadavg()},
        "sizes": [],
    }
    for size in sizes:
        print(f"G = {size:,} (Q = {args.queries}, d = {args.dim})", flush=True)
        result = bench_size(size, args)
        results["sizes"].append(result)
        s = result["summary"]
        if "evaluate_gflops" not in s:
            continue
        print(f"  evaluate {s['evaluate_gflops']:.1f} GFLOP/s vs matmul {s['matmul_gflops']:.1f} "
              f"GFLOP/s ({100 * s['evaluate_vs_matmul']:.0f}% of matmul speed); peak memory "
              f"+{result['evaluate']['peak_extra_mb']:.0f} MB beyond its data = "
              f"{s['evaluate_peak_over_gallery']:.2f}x the gallery's bytes")
        print(f"  {args.points}-point curve {result['curve']['seconds']:.2f} s = "
              f"{s['curve_over_evaluate']:.2f}x one evaluate; {args.points} evaluations "
              f"{s['naive_seconds']:.2f} s{' (extrapolated)' if s['naive_extrapolated'] else ''}"
              f" = {s['naive_over_curve']:.1f}x the curve", flush=True)
    ratios = [(r["size"], r["summary"]["curve_over_evaluate_interleaved"])
              for r in results["sizes"] if "curve_over_evaluate_interleaved" in r["summary"]]
    if ratios:
        print(f"{args.points}-point curve in evaluations (interleaved, best of {args.repeat}): "
              + ", ".join(f"G = {size:.0e}: {ratio:.2f}x" for size, ratio in ratios), flush=True)
    loo = [_in_subprocess("loo", int(n), args) for n in args.loo_sizes]
    for entry in loo:
        print(f"leave-one-out N = {entry['size']:,} (100 classes; map, map@100): "
              f"{entry['seconds']:.2f} s, peak +{entry['peak_extra_mb']:.0f} MB", flush=True)
    if len(loo) > 1:
        growth = loo[-1]["peak_extra_mb"] / max(loo[0]["peak_extra_mb"], 1e-9)
        print(f"  peak memory grows {growth:.2f}x for {loo[-1]['size'] / loo[0]['size']:.0f}x "
              "the items")
    results["leave_one_out"] = loo
    if args.backends_gallery:
        results["search_backends"] = _search_backends(args)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
