"""The ``compatzoo`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources
from pathlib import Path

# Busy-waiting OpenMP threads make small ops 10-100x slower whenever the cores are shared
# (measured on a loaded 2-core machine); passive waiting costs next to nothing otherwise.
# Set before torch is imported, and only if the user has not chosen a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from compatzoo import distributed  # noqa: E402
from compatzoo.errors import CompatzooError, SpecError, StorageError  # noqa: E402

DEMO_SPEC = "demo.yaml"


def _set_threads() -> None:
    """One intra-op thread per available core, shared among the processes torchrun
    started on this machine: more threads than cores is slower."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (cores or 1) // max(1, local)))


def _cmd_plugins(args: argparse.Namespace) -> int:
    from compatzoo.registry import get_registry

    registry = get_registry()
    rows = [(r.kind, r.name, r.distribution, r.version) for r in registry.records()]
    header = ("kind", "name", "distribution", "version")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    if registry.failed:
        print("\nplugins that failed to load:")
        for failed in registry.failed:
            print(f"  {failed.plugin} ({failed.distribution}): {failed.error}")
    return 0


def _run_spec(spec_source, output_dir: str, args: argparse.Namespace) -> dict:
    from compatzoo.experiment import run_experiment
    from compatzoo.report import format_table
    from compatzoo.specs import load_spec

    spec = load_spec(spec_source)
    _set_threads()
    distributed.start_from_env(args.dist_backend)      # under torchrun: join the group
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "new"
    bundles = not args.no_bundles
    try:
        results = run_experiment(spec, output_dir, progress=not args.quiet,
                                 save_checkpoints=not args.no_checkpoints,
                                 save_bundles=bundles, mode=mode,
                                 save_every=args.checkpoint_every,
                                 check_data=not args.skip_data_check)
    finally:
        distributed.stop()
    if distributed.launched_rank() != 0:
        return results
    print(f"\n{spec.name}  (seed {spec.seed}, {results['timing']['total_s']:.0f} s)")
    print(format_table(results["evaluation"]))
    print(f"\nresults: {Path(output_dir) / 'results.json'}; plots: {output_dir}/*.png"
          + (f"; bundles: {Path(output_dir) / 'bundles'}/<model>" if bundles else ""))
    return results


def _cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(args)
    if args.classes is not None or args.fake_batch is not None:
        raise SpecError("--classes and --fake-batch apply only with --dry-run")
    output = args.output_dir or str(Path("runs") / Path(args.spec).stem)
    _run_spec(args.spec, output, args)
    return 0


def _dry_run(args: argparse.Namespace) -> int:
    """Every component at full size, one step on a fake batch (compatzoo/dry_run.py)."""
    from compatzoo.dry_run import dry_run, format_dry_run
    from compatzoo.specs import load_spec

    spec = load_spec(args.spec)
    _set_threads()
    print(format_dry_run(dry_run(spec, classes=args.classes, batch=args.fake_batch)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    spec_path = resources.files("compatzoo") / "configs" / DEMO_SPEC
    with resources.as_file(spec_path) as path:
        results = _run_spec(path, args.output_dir, args)
    if not args.no_bundles and distributed.launched_rank() == 0:
        _reload_bundles(Path(args.output_dir), results)
    return 0


def _reload_bundles(out: Path, results: dict) -> None:
    """Load each bundle the run wrote and measure it again from its own files."""
    from compatzoo.bundles import load
    from compatzoo.specs import load_spec

    spec = load_spec(results["spec"])
    data = spec.data.dataset.build()
    primary, table = results["evaluation"]["primary"], results["evaluation"]["table"]
    print()
    for model in spec.new:
        bundle = load(out / "bundles" / model.name)
        figures = bundle.measure(data, [primary], spec.evaluation.batch_size)
        setting = "n2u" if "n2u" in figures else "n2o"
        print(f"bundle {out / 'bundles' / model.name}: reloaded from its files, "
              f"{setting} {primary} {100 * figures[setting][primary]:.2f} (the run: "
              f"{100 * table[f'{setting}/{model.name}'][primary]:.2f})")


def _cmd_bundle(args: argparse.Namespace) -> int:
    from compatzoo.bundles.from_run import bundle_from_run_dir

    config = bundle_from_run_dir(args.run_dir, args.model, args.out, dtype=args.dtype)
    print(f"bundle {args.out}: {config.old.generation} -> {config.new.generation}"
          + (f" + {config.upgrader.name}" if config.upgrader else "")
          + f" ({len(config.files)} weight files, {config.dtype})")
    return 0


def _cmd_bundles(args: argparse.Namespace) -> int:
    from compatzoo.bundles import list_bundles

    rows = [(r["name"], r["weights"], r["source"]) for r in list_bundles()]
    header = ("name", "weights", "source")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _verify(output: str, job: str) -> int:
    from compatzoo.jobs import Manifest, read_manifest

    data = read_manifest(Path(output))
    if data.get("job") != job:
        raise SpecError(f"{output} holds a {data.get('job')} job, not an {job} job")
    problems = Manifest(Path(output), data).verify()
    if data.get("status") != "done":
        problems.insert(0, "the job has not finished (run the same command again to finish it)")
    if problems:
        raise SpecError(f"{output}: " + "; ".join(problems))
    print(f"{output}: {len(data['outputs'])} outputs match the manifest")
    return 0


def _summary(summary: dict) -> None:
    import json

    print(json.dumps(summary, indent=2))


def _cmd_upgrade(args: argparse.Namespace) -> int:
    if args.verify:
        return _verify(args.output, "upgrade")
    if not args.input:
        raise SpecError("give the stored gallery with --input (files or folders)")
    from compatzoo.bundles import load
    from compatzoo.jobs import bundle_step, upgrade_gallery

    _set_threads()
    steps = [bundle_step(load(source)) for source in args.bundles]
    _summary(upgrade_gallery(steps, args.input, args.output, side=args.side,
                             previous=args.previous, column=args.column,
                             side_column=args.side_column, previous_column=args.previous_column,
                             key=args.key, chunk_rows=args.chunk_rows,
                             on_bad_rows=args.on_bad_rows, fingerprint=args.fingerprint,
                             engine=args.engine, workers=args.workers,
                             progress=not args.quiet))
    return 0


def _cmd_order(args: argparse.Namespace) -> int:
    from compatzoo.bundles import load
    from compatzoo.jobs import order_gallery

    _set_threads()
    params = dict(item.split("=", 1) for item in args.param)
    _summary(order_gallery(load(args.bundle), args.gallery, args.output,
                           scheduler=args.scheduler, scheduler_params=params, side=args.side,
                           column=args.column, side_column=args.side_column, key=args.key,
                           seed=args.seed))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    if args.verify:
        return _verify(args.output, "embed")
    if not args.images:
        raise SpecError("give the gallery images with --images (a folder or a list file)")
    from compatzoo.bundles import load
    from compatzoo.jobs import embed_images

    _set_threads()
    _summary(embed_images(load(args.bundle), args.images, args.output, order=args.order,
                          shard_rows=args.shard_rows, batch_size=args.batch_size,
                          workers=args.workers, model=args.model,
                          next_bundle=load(args.next) if args.next else None,
                          progress=not args.quiet))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from compatzoo.bundles.hub import publish

    commit = publish(args.bundle, args.repo, revision=args.revision, private=args.private,
                     commit_message=args.commit_message)
    print(f"published {args.bundle} to {args.repo}"
          + (f"@{args.revision}" if args.revision else "") + f": {commit.commit_url}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from compatzoo.lineage import plan
    from compatzoo.specs import load_spec

    lineage = plan(load_spec(args.spec))
    if args.check_data:
        from compatzoo.data.checks import check_retrieval_labels, scan_images
        from compatzoo.experiment import load_data

        data = load_data(lineage).data
        check_retrieval_labels(data)
        scan_images({"train": data.train, "query": data.query, "gallery": data.gallery},
                    progress=not args.quiet)
    print(f"{args.spec}: valid ({lineage.spec.name}: old + {len(lineage.new)} new model(s))"
          + ("; data checked" if args.check_data else ""))
    for chain in lineage.chains():
        print(f"  chain: {' -> '.join(chain)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """Compatibility table and backfill curve from saved features."""
    import json

    import numpy as np

    from compatzoo.arrays import load_array
    from compatzoo.engine.checkpoints import atomic_write
    from compatzoo.errors import SpecError
    from compatzoo.retrieval import backfill_curve, evaluate

    loo = args.leave_one_out
    if not loo and not args.gallery_labels:
        raise SpecError("give --gallery-labels, or --leave-one-out when the query set is the "
                        "gallery")
    q_labels = load_array(args.query_labels)
    g_labels = q_labels if loo else load_array(args.gallery_labels)
    feats = {name: load_array(path) for name, path in
             (("query_old", args.query_old), ("gallery_old", args.gallery_old),
              ("query_new", args.query_new), ("gallery_new", args.gallery_new)) if path}
    if loo:  # FCT protocol: one set is both the queries and the gallery
        feats.update({f"gallery_{v}": feats[f"query_{v}"] for v in ("old", "new")
                      if f"query_{v}" in feats})
    pairs = {"o2o": ("query_old", "gallery_old"), "n2o": ("query_new", "gallery_old"),
             "n2n": ("query_new", "gallery_new")}
    table = {name: evaluate(feats[q], q_labels, feats[g], g_labels, metrics=args.metrics,
                            leave_one_out=loo,
                            queries_without_positive=args.queries_without_positive)
             for name, (q, g) in pairs.items() if q in feats and g in feats}
    if not table:
        raise SpecError("give at least one query/gallery pair, e.g. --query-new and "
                        "--gallery-old for the cross test")
    out = Path(args.output_dir)
    outputs = [out / "eval.json", out / "backfill.png"]
    if out.exists() and not out.is_dir():
        raise SpecError(f"the output {out} is a file, not a folder; choose a folder with -o")
    if any(p.exists() for p in outputs) and not args.overwrite:
        raise SpecError(f"{out} already holds results of an evaluation "
                        f"({', '.join(p.name for p in outputs if p.exists())}); pass "
                        "--overwrite to replace them, or choose another folder with -o")
    for stale in outputs:            # a failure below must not leave the previous results
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _print_table(table, args.metrics)
    results = {"metrics": args.metrics, "leave_one_out": loo, "table": table}
    if {"query_new", "gallery_old", "gallery_new"} <= feats.keys():
        order = (load_array(args.order) if args.order else
                 np.random.default_rng(args.seed).permutation(len(feats["gallery_old"])))
        curve = backfill_curve(feats["query_new"], feats["gallery_old"], feats["gallery_new"],
                               q_labels, g_labels, order, points=args.points,
                               metrics=args.metrics, query_old=feats.get("query_old"),
                               leave_one_out=loo,
                               queries_without_positive=args.queries_without_positive)
        results["backfill"] = {"order": args.order or f"random (seed {args.seed})",
                               **curve.to_dict()}
        primary = args.metrics[0]
        reference = {k: table[k][primary] for k in ("o2o", "n2n") if k in table}
        atomic_write(out / "backfill.png",
                     lambda tmp: curve.plot(tmp, reference=reference))
        nfr = curve.nfr.get(1)
        print(f"backfill AUC {primary}: {100 * curve.auc[primary]:.2f}"
              + (f"; NFR@1 max {100 * np.nanmax(nfr):.2f}" if nfr else ""))
    atomic_write(out / "eval.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(f"results: {out / 'eval.json'}")
    return 0


def _print_table(table: dict[str, dict[str, float]], metrics: list[str]) -> None:
    """One row per setting, figures in percent."""
    width = max(len(m) for m in metrics)
    print("setting  " + "  ".join(m.ljust(width) for m in metrics))
    for name, values in table.items():
        print(f"{name:<8} " + "  ".join(f"{100 * values[m]:<{width}.2f}" for m in metrics))


def _adapter_params(items: list[str]) -> dict:
    """``--params``: one JSON object, or KEY=VALUE items whose values are read as JSON
    where they parse (``rank=8``, ``scale=true``) and as text otherwise."""
    import json

    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            params = json.loads(items[0])
        except json.JSONDecodeError as exc:
            raise SpecError(f"--params is not valid JSON ({exc})") from None
        if not isinstance(params, dict):
            raise SpecError("--params must be a JSON object, e.g. '{\"rank\": 8}'")
        return params
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--params item {item!r} is not KEY=VALUE (or give one JSON object)")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def _cmd_fit_adapter(args: argparse.Namespace) -> int:
    from compatzoo.bundles.from_pairs import fit_adapter_bundle

    _set_threads()
    config = fit_adapter_bundle(
        args.old, args.new, args.out, method=args.method, direction=args.direction,
        params=_adapter_params(args.params), val_fraction=args.val_fraction, seed=args.seed,
        name=args.name, progress=not args.quiet, column=args.column, key=args.key,
        id_column=args.id_column)
    evaluation, upgrader = config.evaluation, config.upgrader
    pairs = evaluation["pairs"]
    print(f"{upgrader.name} ({upgrader.direction}: {upgrader.input_dim}-d -> "
          f"{upgrader.output_dim}-d) fitted on {pairs['train']} pairs; "
          + (f"{pairs['held_out']} held out (seed {config.seed}):" if pairs["held_out"]
             else "none held out"))
    if evaluation.get("settings"):
        _print_table(evaluation["settings"], evaluation["metrics"])
    print(f"bundle {args.out}: load it with compatzoo.load; "
          + ("it maps new queries into the old space" if upgrader.direction == "query"
             else "`compatzoo upgrade` runs it on a stored gallery"))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from compatzoo.bench import bench

    out = Path(args.out or Path("runs") / "bench" / Path(args.suite).name)
    outcomes = bench(args.suite, args.seeds, out, only=args.only, jobs=args.jobs)
    failed = sorted(name for name, o in outcomes.items() if o["status"] == "failed")
    counts = {s: sum(o["status"] == s for o in outcomes.values())
              for s in ("finished", "skipped", "failed")}
    print(f"\n{counts['finished']} run(s) finished, {counts['skipped']} skipped (finished "
          f"earlier), {counts['failed']} failed" + (f": {', '.join(failed)}" if failed else "")
          + f"; every outcome in {out / 'bench.json'}")
    print(f"leaderboard: compatzoo leaderboard {out}")
    return 1 if failed else 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from compatzoo.bench import current_references, failed_runs, finished_runs, suite_name
    from compatzoo.leaderboard import aggregate, load_claims, write_aggregate

    runs, unfinished = finished_runs(args.dir)
    if not runs:
        raise SpecError(f"{args.dir} holds no finished runs (<spec>/seed-<s>/ folders); run "
                        f"`compatzoo bench SUITE --out {args.dir}` first")
    current_references(args.dir, runs)
    done = {f"{stem}/seed-{seed}" for stem, by_seed in runs.items() for seed in by_seed}
    failures = {k: v for k, v in failed_runs(args.dir).items() if k not in done}
    claims = load_claims(args.claims) if args.claims else []
    target = Path(args.out or Path(args.dir) / "LEADERBOARD.md")
    written = write_aggregate(aggregate(runs), target, args.suite or suite_name(args.dir),
                              failures=failures,
                              unfinished=[u for u in unfinished if u not in failures],
                              claims=claims)
    counts: dict[str, int] = {}
    for claim in written["decided"]:
        counts[claim["status"]] = counts.get(claim["status"], 0) + 1
    print(f"{target}: {sum(len(s) for s in runs.values())} runs of {len(runs)} specs; "
          f"{len(written['plots'])} plots, claims.json and leaderboard.json beside it")
    print("claims: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 0


def _steps(text: str) -> int:
    """A count of steps, 0 or more (argparse reports the ValueError as a usage error)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive(text: str) -> int:
    """A count of 1 or more (argparse reports the ValueError as a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compatzoo", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("plugins", help="list installed components and failed plugins"
                   ).set_defaults(func=_cmd_plugins)

    run = sub.add_parser("run", help="run an experiment spec (YAML) end to end")
    run.add_argument("spec")
    run.add_argument("--output-dir", "-o", help="default: runs/<spec name>")
    run.add_argument("--dry-run", action="store_true", help="build every component at full "
                     "size and step each once on a fake batch (no data read, nothing written)")
    run.add_argument("--classes", type=_positive, metavar="N", help="with --dry-run: the "
                     "training set's class count, for datasets that cannot tell it unread")
    run.add_argument("--fake-batch", type=_positive, metavar="N", help="with --dry-run: "
                     "images in the fake batch (default: the fewest the losses accept, >= 2)")
    demo = sub.add_parser("demo", help="old model, independent new model and BCT on the "
                          "embedded synthetic benchmark (CPU, a few minutes)")
    demo.add_argument("--output-dir", "-o", default="runs/demo")
    for command in (run, demo):
        command.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        existing = command.add_mutually_exclusive_group()
        existing.add_argument("--resume", action="store_true", help="continue the run in the "
                              "output folder (same spec and data): finished stages are "
                              "reloaded, an interrupted training goes on from its last state")
        existing.add_argument("--overwrite", action="store_true", help="replace the run in "
                              "the output folder as a whole")
        command.add_argument("--checkpoint-every", type=_steps, default=500, metavar="STEPS",
                             help="save the training state every STEPS steps, besides each "
                             "epoch end (0: epoch ends only); default 500")
        command.add_argument("--skip-data-check", action="store_true",
                             help="do not decode every image once before training")
        command.add_argument("--no-checkpoints", action="store_true",
                             help="do not save model weights (the run cannot be resumed)")
        command.add_argument("--no-bundles", action="store_true",
                             help="do not write a bundle per new model")
        command.add_argument("--dist-backend", choices=("auto", "gloo", "nccl"),
                             default="auto", help="under torchrun: the process group's "
                             "backend (auto: nccl with CUDA GPUs, else gloo)")
    run.set_defaults(func=_cmd_run)
    demo.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("eval", help="compatibility table and backfill curve from saved "
                        "features (.npy, .safetensors or file.safetensors:KEY)")
    for name in ("query-old", "gallery-old", "query-new", "gallery-new"):
        ev.add_argument(f"--{name}", help=f"{name.replace('-', ' ')} features (N, d)")
    ev.add_argument("--query-labels", required=True)
    ev.add_argument("--gallery-labels")
    ev.add_argument("--leave-one-out", action="store_true",
                    help="FCT protocol: the query set is the gallery, each query left out")
    ev.add_argument("--metrics", nargs="+", default=["map@100", "cmc@1"])
    ev.add_argument("--order", help="backfill order (.npy permutation); default random")
    ev.add_argument("--points", type=int, default=21)
    ev.add_argument("--queries-without-positive", choices=["skip", "miss"], default="skip",
                    help="left out of every mean (default), or counted as 0 (FastFill's code)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output-dir", "-o", default="runs/eval")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace the results of an earlier evaluation in the folder")
    ev.set_defaults(func=_cmd_eval)

    validate = sub.add_parser("validate", help="check a spec without running it")
    validate.add_argument("spec")
    validate.add_argument("--check-data", action="store_true", help="also load the data, "
                          "check query and gallery labels and decode every image once")
    validate.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    validate.set_defaults(func=_cmd_validate)

    bundle = sub.add_parser("bundle", help="re-create the bundle of a new model from a run "
                            "folder (results.json + checkpoints/)")
    bundle.add_argument("run_dir")
    bundle.add_argument("--model", required=True, help="the new model's name in the spec")
    bundle.add_argument("--out", required=True, help="the bundle folder to write")
    bundle.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="storage of floating weights (float16 halves the size)")
    bundle.set_defaults(func=_cmd_bundle)

    sub.add_parser("bundles", help="list the bundles compatzoo.load knows by name"
                   ).set_defaults(func=_cmd_bundles)

    publish = sub.add_parser("publish", help="upload a bundle folder to the Hugging Face Hub")
    publish.add_argument("bundle", help="a bundle folder (it must load)")
    publish.add_argument("--repo", required=True, help="ORG/NAME")
    publish.add_argument("--revision", help="branch to commit to (created if missing)")
    publish.add_argument("--private", action="store_true", help="create the repo private")
    publish.add_argument("--commit-message")
    publish.set_defaults(func=_cmd_publish)

    fit = sub.add_parser("fit-adapter", help="fit an upgrader on paired embeddings (the old "
                         "and new embedding of the same items), report held-out recall and "
                         "write a bundle `compatzoo upgrade` and compatzoo.load accept")
    fit.add_argument("--old", required=True, help="old embeddings: .npy, .safetensors "
                     "(FILE.safetensors:KEY for one of several tensors) or Parquet")
    fit.add_argument("--new", required=True, help="new embeddings of the same items, same order")
    fit.add_argument("--method", required=True, help="a registered upgrader that fits on "
                     "embeddings alone (`compatzoo plugins` lists them; the compatzoo-adapters "
                     "plugin registers four)")
    fit.add_argument("--direction", choices=["gallery", "query"], default="gallery",
                     help="gallery: map stored old embeddings into the new space; query: map "
                     "new queries into the old space (the old index keeps serving)")
    fit.add_argument("--params", nargs="*", default=[], metavar="JSON|KEY=VALUE",
                     help="the method's params, e.g. rank=64 ridge=0.001")
    fit.add_argument("--val-fraction", type=float, default=0.1,
                     help="pairs held out for the report (seeded); 0: none")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, help="the bundle folder to write")
    fit.add_argument("--name", help="the bundle's name (default: the folder's)")
    fit.add_argument("--column", default="embedding", help="Parquet embedding column")
    fit.add_argument("--key", help="tensor name in .safetensors files holding several")
    fit.add_argument("--id-column", default="id", help="Parquet column of item ids: where "
                     "both files have it, the ids must agree row by row")
    fit.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    fit.set_defaults(func=_cmd_fit_adapter)

    up = sub.add_parser("upgrade", help="move a stored gallery into a bundle's new space "
                        "(npy, safetensors, Parquet or faiss flat index files), resumably")
    up.add_argument("bundles", nargs="+", metavar="BUNDLE",
                    help="a bundle source; several: a chain applied hop by hop in one pass")
    up.add_argument("--input", nargs="+", help="stored embedding files or folders of them")
    up.add_argument("--output", required=True, help="folder for the upgraded files (same "
                    "names and formats) and the job's manifest")
    up.add_argument("--side", nargs="+", help="side information stored beside each input "
                    "(one file per input, or the same Parquet files with --side-column)")
    up.add_argument("--previous", nargs="+", help="the copy one generation older, for "
                    "upgraders that read it (BiCT eq. 9)")
    up.add_argument("--column", default="embedding", help="Parquet embedding column")
    up.add_argument("--side-column", help="Parquet column of the side information")
    up.add_argument("--previous-column", help="Parquet column of the older copy")
    up.add_argument("--key", help="tensor name in .safetensors files holding several")
    up.add_argument("--chunk-rows", type=int, default=65536, help="rows per batch")
    up.add_argument("--on-bad-rows", choices=["fail", "skip", "zero"], default="fail",
                    help="rows with NaN or inf: stop before writing (default), drop, or zero")
    up.add_argument("--fingerprint", help="of the model that wrote the gallery, if the files "
                    "do not record it")
    up.add_argument("--engine", choices=["local", "ray"], default="local",
                    help="ray: files on Ray actors (extra compatzoo[ray]; RAY_ADDRESS for a "
                    "cluster); under torchrun, ranks split the files")
    up.add_argument("--workers", type=int, default=2, help="Ray actors (--engine ray)")
    up.add_argument("--verify", action="store_true", help="recheck a finished job's outputs "
                    "against its manifest instead of running")
    up.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    up.set_defaults(func=_cmd_upgrade)

    order = sub.add_parser("order", help="the backfill order of a stored gallery")
    order.add_argument("bundle")
    order.add_argument("--gallery", nargs="+", required=True, help="stored embedding files")
    order.add_argument("--scheduler", default="random", help="a registered scheduler")
    order.add_argument("--param", nargs="*", default=[], metavar="KEY=VALUE",
                       help="scheduler params, e.g. measure=entropy")
    order.add_argument("--side", nargs="+", help="side information beside the gallery")
    order.add_argument("--column", default="embedding")
    order.add_argument("--side-column")
    order.add_argument("--key")
    order.add_argument("--seed", type=int, default=0)
    order.add_argument("--output", required=True, help="order.npy or order.parquet")
    order.set_defaults(func=_cmd_order)

    embed = sub.add_parser("embed", help="re-embed gallery images with a bundle's new model "
                           "(the backfill), in order, into Parquet shards, resumably")
    embed.add_argument("bundle")
    embed.add_argument("--images", help="a folder of images or a file listing them, one per "
                       "line: the gallery's rows in order")
    embed.add_argument("--output", required=True)
    embed.add_argument("--order", help=".npy order from `compatzoo order`")
    embed.add_argument("--model", choices=["new", "old"], default="new")
    embed.add_argument("--next", help="the next upgrade's bundle: its side information is "
                       "written beside the new embeddings")
    embed.add_argument("--shard-rows", type=int, default=65536)
    embed.add_argument("--batch-size", type=int, default=256)
    embed.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers")
    embed.add_argument("--verify", action="store_true")
    embed.add_argument("--quiet", "-q", action="store_true")
    embed.set_defaults(func=_cmd_embed)

    bench = sub.add_parser("bench", help="run every spec of a suite folder once per seed, "
                           "resumably (finished runs are skipped, unfinished ones resumed)")
    bench.add_argument("suite", help="a folder of spec files, e.g. benchmarks/suites/quick")
    bench.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                       help="the spec's seed is replaced by each (default: 0 1 2)")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="spec file stems to run")
    bench.add_argument("--jobs", type=int, default=1, help="runs in parallel processes, each "
                       "with cores // JOBS threads (default 1)")
    bench.add_argument("--out", help="the runs' folder: <out>/<spec>/seed-<s>/ (default: "
                       "runs/bench/<suite folder name>)")
    bench.set_defaults(func=_cmd_bench)

    board = sub.add_parser("leaderboard", help="the leaderboard of a `compatzoo bench` folder: "
                           "mean ± std over seeds, plots and the papers' claims decided")
    board.add_argument("dir", help="the --out folder of `compatzoo bench`")
    board.add_argument("--out", help="the Markdown file; plots and claims.json go beside it "
                       "(default: DIR/LEADERBOARD.md)")
    board.add_argument("--suite", help="the suite's name in the title (default: the one "
                       "DIR/bench.json records)")
    board.add_argument("--claims", help="the claims to decide, a YAML file of rules over the "
                       "figures (the papers': benchmarks/claims.yaml)")
    board.set_defaults(func=_cmd_leaderboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CompatzooError as exc:
        if args.debug:
            raise
        if distributed.reports(exc):     # under torchrun, once, not once per rank
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug or isinstance(exc, BrokenPipeError):
            raise
        print(f"error: {StorageError.from_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
