"""A job's manifest, ``OUTPUT/compatzoo-job.json``: what the job is (its kind, parameters
and the models it applies), the inputs it read (rows, sha256) and every output finished so
far (rows, sha256, bytes). A rerun of the same command resumes from it; a rerun of another
job, or over inputs that changed, is refused before anything is written.

Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` in the environment) rank r takes the units i
with ``i % WORLD_SIZE == r`` and records what it finishes in its own
``compatzoo-job.rank-<r>.json``, so ranks never write one file; every rank reads all of
them to know what is done, and the rank that finds every unit done merges them into the
manifest and marks the job done. A rerun with any number of ranks resumes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compatzoo.errors import CompatzooError, SpecError
from compatzoo.engine.checkpoints import file_sha256
from compatzoo.jobs.stores import write_json

MANIFEST = "compatzoo-job.json"
SCHEMA_VERSION = 1


class JobStateError(CompatzooError):
    """An output folder or its manifest does not fit the job asked for."""


def job_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a ``torchrun`` launch; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise SpecError(f"RANK={rank} and WORLD_SIZE={world} do not describe a launch")
    return rank, world


def _rank_file(rank: int) -> str:
    return f"compatzoo-job.rank-{rank}.json"


@dataclass(frozen=True)
class InputRecord:
    path: str
    rows: int
    sha256: str

    @classmethod
    def of(cls, path: Path, rows: int) -> InputRecord:
        return cls(str(path.resolve()), rows, file_sha256(path))


class Manifest:
    """The manifest of one job in ``folder``; opened (and checked) by :meth:`open`."""

    def __init__(self, folder: Path, data: dict[str, Any]):
        self.folder, self.data = folder, data
        self.rank, self.world = job_rank()

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def open(cls, folder: Path, job: str, parameters: dict[str, Any],
             sources: list[dict[str, Any]], inputs: list[InputRecord]) -> Manifest:
        """The job's manifest in ``folder``: the one there if it is the same job (to resume),
        else a new one -- written by :meth:`start`, once every check has passed."""
        identity = {"job": job, "parameters": parameters, "sources": sources}
        path = folder / MANIFEST
        if path.is_file():
            data = read_manifest(folder)
            found = {key: data.get(key) for key in identity}
            if found != json.loads(json.dumps(identity)):
                changed = [key for key in identity if found[key] != json.loads(
                    json.dumps(identity[key]))]
                raise JobStateError(
                    f"{folder} holds another job ({data.get('job')}; its {', '.join(changed)} "
                    f"differ from this one's): nothing was written. Use another output folder, "
                    f"or delete {folder} to start over")
            recorded = {record["path"]: record for record in data.get("inputs", [])}
            for record in inputs:
                old = recorded.get(record.path)
                if old is None or (old["rows"], old["sha256"]) != (record.rows, record.sha256):
                    raise JobStateError(
                        f"input {record.path} is not what the job in {folder} started from "
                        "(another file, or it changed since: other rows or sha256); nothing "
                        "was written. Restore the input, or use another output folder")
            return cls(folder, data)
        if folder.exists():
            stray = sorted(p.name for p in folder.iterdir()
                           if not p.name.startswith((".", "compatzoo-job.")))
            if stray:
                raise JobStateError(
                    f"{folder} already holds {stray[:5]} but no {MANIFEST}: it was not written "
                    "by a compatzoo job (or is an input folder). Nothing was written; give an "
                    "empty or new output folder")
        return cls(folder, {"schema_version": SCHEMA_VERSION, **identity,
                            "inputs": [vars(r) for r in inputs], "outputs": {},
                            "status": "running"})

    def start(self) -> None:
        """Write the manifest (and the folder) if this is a new job."""
        if not self.path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def mine(self, names: list[str]) -> list[str]:
        """The units this rank takes, by their position in the whole job."""
        return [name for i, name in enumerate(names) if i % self.world == self.rank]

    def outputs(self) -> dict[str, dict[str, Any]]:
        """Every finished output: the manifest's and those the ranks recorded."""
        found = dict(self.data["outputs"])
        for path in sorted(self.folder.glob("compatzoo-job.rank-*.json")):
            try:
                found.update(json.loads(path.read_text()).get("outputs", {}))
            except json.JSONDecodeError:
                continue    # replaced atomically, so never half written; ignore if foreign
        return found

    def is_done(self, name: str) -> bool:
        """Recorded as finished, and still there with the recorded size."""
        record = self.outputs().get(name)
        path = self.folder / name
        return record is not None and path.is_file() and path.stat().st_size == record["bytes"]

    def record(self, name: str, rows: int, sha256: str | None = None, **extra: Any) -> None:
        """A finished output; ``sha256`` when the writer hashed it while writing."""
        path = self.folder / name
        entry = {"rows": rows, "sha256": sha256 or file_sha256(path),
                 "bytes": path.stat().st_size, **extra}
        if self.world == 1:
            self.data["outputs"][name] = entry
            self.save()
            return
        rank_path = self.folder / _rank_file(self.rank)
        mine = json.loads(rank_path.read_text()) if rank_path.is_file() else {"outputs": {}}
        mine["outputs"][name] = entry
        write_json(rank_path, mine)

    def finish(self, summary: dict[str, Any], names: list[str]) -> bool:
        """Mark the job done if every unit of ``names`` is; returns whether it is. Under
        torchrun the rank that finds everything done merges the ranks' records."""
        outputs = self.outputs()
        if not all(name in outputs for name in names):
            return False
        self.data["outputs"] = outputs
        self.data["status"], self.data["summary"] = "done", summary
        self.save()
        for path in self.folder.glob("compatzoo-job.rank-*.json"):
            path.unlink(missing_ok=True)
        return True

    def verify(self) -> list[str]:
        """Outputs whose bytes no longer match the manifest (missing, other sha256)."""
        problems = []
        for name, record in self.outputs().items():
            path = self.folder / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif file_sha256(path) != record["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest's")
        return problems


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{folder} has no {MANIFEST}: no compatzoo job wrote there") from None
    except json.JSONDecodeError as exc:
        raise JobStateError(f"{path} is not valid JSON ({exc}); the folder's job state is "
                            "corrupt: delete the folder and run the job again") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise JobStateError(f"{path} is not a compatzoo job manifest of schema version "
                            f"{SCHEMA_VERSION}; delete the folder and run the job again")
    return data
