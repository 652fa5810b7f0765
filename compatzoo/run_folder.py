"""A run's output folder, and the manifest (``compatzoo-run.json``) that makes it honest.

A folder holds one run. ``compatzoo run`` writes into a fresh (missing or empty) folder;
``--resume`` continues the run already there (the same spec, the same data), skipping
every stage the manifest records as finished; ``--overwrite`` replaces a previous run as a
whole. Anything else is refused before any work, so no folder ever mixes two runs'
files, and nothing a user has is replaced without being asked.

The stages, in order: ``train/<generation>`` for every generation (weights in
``checkpoints/<generation>/``, and while it trains the whole training state in
``checkpoints/<generation>/fit-state.safetensors``), ``upgrade/<generation>`` for every
new generation (its hops' weights beside), then the report (results, plots, bundles),
published into the folder at once when everything is computed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compatzoo.engine.checkpoints import atomic_write
from compatzoo.errors import CompatzooError

MANIFEST = "compatzoo-run.json"
SCHEMA_VERSION = 1
Mode = Literal["new", "resume", "overwrite"]


class RunFolderError(CompatzooError):
    """An output folder that holds something other than the run asked for."""


#: top-level spec fields that change nothing a run computes (the papers' figures shown beside
#: the results): editing them neither makes a finished run stale nor blocks a resume
NOT_FINGERPRINTED = ("references",)


def spec_fingerprint(spec_json: dict[str, Any]) -> str:
    """What a run computes, hashed: the dumped spec without :data:`NOT_FINGERPRINTED`."""
    computed = {k: v for k, v in spec_json.items() if k not in NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(computed, sort_keys=True).encode()).hexdigest()


def data_fingerprint(data) -> str:
    """The items of every split: their count, labels and, for files, their names (not
    their pixels: reading a million images to resume would cost what it saves)."""
    digest = hashlib.sha256(json.dumps(data.info, sort_keys=True, default=str).encode())
    for split in ("train", "query", "gallery"):
        images = getattr(data, split)
        if images is None:
            digest.update(f"{split}:none".encode())
            continue
        labels = np.ascontiguousarray(np.asarray(images.labels, dtype=np.int64))
        digest.update(f"{split}:{len(labels)}".encode())
        digest.update(labels.tobytes())
        for path in getattr(images, "paths", None) or ():
            digest.update(str(path).encode() + b"\0")
    return digest.hexdigest()


def _differences(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two spec dumps differ (the first few)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after)):
            out += _differences(before.get(key), after.get(key), f"{prefix}{key}.")
        return out
    return [] if before == after else [prefix.rstrip(".")]


@dataclass
class RunFolder:
    """The output folder of one run and its manifest; :meth:`claim` checks, :meth:`begin`
    writes."""

    path: Path
    mode: Mode
    manifest: dict[str, Any]
    #: false on the ranks of a torchrun launch other than 0: they follow the run's stages
    #: in memory and write nothing
    writer: bool = True

    # ------------------------------------------------------------------ opening
    @classmethod
    def claim(cls, path: str | Path, spec_json: dict[str, Any], mode: Mode,
              options: dict[str, Any]) -> RunFolder:
        """Check that ``path`` may take this run in ``mode``, changing nothing yet."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"the output {path} is a file, not a folder; choose a folder "
                                 "with -o")
        manifest_path = path / MANIFEST
        contents = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        existing = cls._read(manifest_path) if manifest_path.exists() else None
        fingerprint = spec_fingerprint(spec_json)
        if mode == "new" and contents:
            what = (f"the {'finished' if existing.get('finished') else 'unfinished'} run "
                    f"'{existing.get('spec_name')}'" if existing else
                    f"{len(contents)} entries ({', '.join(contents[:4])}"
                    f"{', ...' if len(contents) > 4 else ''})")
            raise RunFolderError(
                f"the output folder {path} already holds {what}. Pass --resume to continue "
                "that run, --overwrite to replace it, or choose another folder with -o")
        if contents and existing is None and mode != "new":
            raise RunFolderError(
                f"{path} holds files but no {MANIFEST}, so it is not a compatzoo run folder "
                f"(or one written before runs kept a manifest); compatzoo will not "
                f"{'resume' if mode == 'resume' else 'delete'} it. Choose another folder "
                "with -o, or empty it yourself")
        if mode == "resume" and existing is not None:
            if existing["spec_sha256"] != fingerprint:
                changed = _differences(existing.get("spec", {}), spec_json)
                raise RunFolderError(
                    f"{path} holds a run of another spec (differences at: "
                    f"{', '.join(changed[:6]) or 'unknown'}); --resume continues only the "
                    "same spec. Use --overwrite to replace it, or another folder")
            for key, value in options.items():
                if existing.get("options", {}).get(key) != value:
                    raise RunFolderError(
                        f"{path} was run with {key}={existing['options'].get(key)}, this "
                        f"command asks {key}={value}; resume with the options it started with")
        manifest = existing if (mode == "resume" and existing is not None) else {
            "kind": "compatzoo-run", "schema_version": SCHEMA_VERSION,
            "spec_name": spec_json.get("name"), "spec_sha256": fingerprint, "spec": spec_json,
            "options": options, "data_sha256": None, "sessions": [], "stages": {},
            "finished": False}
        return cls(path, mode, manifest)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunFolderError(f"{path} is unreadable ({exc}); the run folder is damaged: "
                                 "use --overwrite to start it again") from None
        if not isinstance(data, dict) or data.get("kind") != "compatzoo-run":
            raise RunFolderError(f"{path} is not a compatzoo run manifest; choose another "
                                 "folder with -o")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise RunFolderError(f"{path} has schema {data.get('schema_version')}; this "
                                 f"compatzoo reads {SCHEMA_VERSION}: use --overwrite")
        return data

    def begin(self, data_sha256: str) -> None:
        """Make the folder this run's (the previous run is deleted under ``overwrite``,
        after every check passed) and record the session."""
        from compatzoo import __version__

        if self.mode == "resume" and self.manifest["data_sha256"] not in (None, data_sha256):
            raise RunFolderError(
                f"the data changed since the run in {self.path} started (other items, labels "
                "or file names); --resume would mix models trained on different data. Use "
                "--overwrite, or another folder")
        if self.mode == "overwrite" and self.path.exists() and self.writer:
            shutil.rmtree(self.path)
            self.manifest["stages"], self.manifest["sessions"] = {}, []
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
        self.manifest["data_sha256"] = data_sha256
        self.manifest["sessions"].append({
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "mode": self.mode, "compatzoo": __version__})
        self._save()

    # ------------------------------------------------------------------ stages
    @property
    def session(self) -> int:
        return len(self.manifest["sessions"])

    @property
    def finished(self) -> bool:
        return bool(self.manifest["finished"])

    def done(self, stage: str) -> dict[str, Any] | None:
        """The record of a finished stage, or None."""
        return self.manifest["stages"].get(stage)

    def mark_done(self, stage: str, record: dict[str, Any]) -> None:
        self.manifest["stages"][stage] = {**record, "session": self.session}
        self._save()

    def log_offset(self) -> int:
        """The training log's length when the last finished training stage ended."""
        return max((s.get("log_offset", 0) for name, s in self.manifest["stages"].items()
                    if name.startswith("train/")), default=0)

    def finish(self) -> None:
        self.manifest["finished"] = True
        self._save()

    # ------------------------------------------------------------------ outputs
    def staging(self) -> Path:
        """An empty folder inside the run folder where the report is written before
        :meth:`publish` moves it in."""
        staging = self.path / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    def publish(self, staging: Path) -> None:
        """Move every entry of ``staging`` into the run folder (renames, each atomic),
        replacing this run's own earlier copy of it."""
        for entry in sorted(staging.iterdir()):
            target = self.path / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            entry.replace(target)
        staging.rmdir()

    def _save(self) -> None:
        if not self.writer:
            return
        atomic_write(self.path / MANIFEST,
                     lambda tmp: Path(tmp).write_text(json.dumps(self.manifest, indent=2)))
