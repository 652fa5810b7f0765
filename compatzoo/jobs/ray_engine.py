"""The upgrade job on Ray (``compatzoo upgrade --engine ray``, extra ``compatzoo[ray]``).

A Ray Data pipeline over the job's pending files: each actor loads the bundles once, then
reads, upgrades and writes whole files with the same code as the local engine -- so the
outputs are the local engine's, byte for byte, in any format (faiss indexes included),
with the same bounded memory per actor. The driver alone writes the manifest, as results
come back, so a killed job resumes like a local one. ``RAY_ADDRESS`` connects to a
cluster (every node must reach the input and output folders); without it a local Ray
starts with ``workers`` CPUs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from compatzoo.errors import PluginError


class _FileUpgrader:
    """A Ray actor: the chain of bundles, applied to whole files."""

    def __init__(self, sources: list[str], output: str, chunk_rows: int, policy: str,
                 options: dict[str, Any]):
        import torch

        from compatzoo.bundles import load
        from compatzoo.jobs.upgrade import bundle_step

        torch.set_num_threads(1)        # one core per actor: actors are the parallelism
        self.steps = [bundle_step(load(source)) for source in sources]
        self.output, self.chunk_rows, self.policy = Path(output), chunk_rows, policy
        self.options = options

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from compatzoo.jobs.stores import open_stored
        from compatzoo.jobs.upgrade import _upgrade_unit, _Unit

        names, rows, extras = [], [], []
        for main, side, previous, bad in zip(batch["main"], batch["side"], batch["previous"],
                                             batch["bad"]):
            options = self.options
            unit = _Unit(open_stored(Path(main), column=options["column"], key=options["key"]))
            if side:
                unit.side = open_stored(Path(side), key=options["key"],
                                        column=options["side_column"] or options["column"])
            if previous:
                unit.previous = open_stored(Path(previous), key=options["key"],
                                            column=options["previous_column"]
                                            or options["column"])
            unit.bad = int(bad)
            for name, count, extra in _upgrade_unit(unit, self.steps, self.output,
                                                    self.chunk_rows, self.policy,
                                                    self.steps[-1].new_fingerprint):
                names.append(name)
                rows.append(count)
                extras.append(json.dumps(extra))
        return {"name": names, "rows": rows, "extra": extras}


def upgrade_on_ray(pending: Sequence, steps: Sequence, output: Path, chunk_rows: int,
                   policy: str, workers: int,
                   options: dict[str, Any]) -> Iterator[list[tuple[str, int, dict]]]:
    """What each pending file wrote, as its actor finishes it (for the manifest)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise PluginError("--engine ray needs Ray Data: pip install 'compatzoo[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=None if _has_address() else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        items = [{"main": str(u.main.path), "side": str(u.side.path) if u.side else "",
                  "previous": str(u.previous.path) if u.previous else "", "bad": u.bad}
                 for u in pending]
        if not items:
            return
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            _FileUpgrader, batch_size=1, concurrency=max(1, min(workers, len(items))),
            num_cpus=1, fn_constructor_kwargs={
                "sources": [step.source for step in steps], "output": str(output.resolve()),
                "chunk_rows": chunk_rows, "policy": policy, "options": options})
        written: list[tuple[str, int, dict]] = []
        for row in results.iter_rows():
            written.append((row["name"], int(row["rows"]), json.loads(row["extra"])))
            if not row["name"].startswith("side/"):
                yield written
                written = []
    finally:
        if started_here:
            ray.shutdown()


def _has_address() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
