"""Module weights as safetensors plus a JSON manifest; never pickle."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from compatzoo.engine.fitting import FitState
from compatzoo.errors import CheckpointError

WEIGHTS = "model.safetensors"
MANIFEST = "config.json"


def atomic_write(path: Path, write) -> None:
    """Write via a hidden ``.partial`` file in the same folder, flushed to disk before it
    replaces ``path``, so a crash or power loss leaves the old file or the new one, never
    part of one; a partial file a crash left behind is overwritten by the next write. Its
    name keeps the suffix, for writers that choose a format by it."""
    path = Path(path)
    tmp = str(path.with_name(f".{path.name}.partial{path.suffix}"))
    try:
        try:
            write(tmp)
        except SafetensorError as exc:     # the Rust writer's I/O errors, as Python's
            found = re.search(r"os error (\d+)", str(exc))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unshared(items) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors ready for safetensors, which refuses shared storage: a tensor seen before
    under another name (a submodule with two owners) is stored once and aliased."""
    state: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    first_key: dict[tuple, str] = {}
    for name, tensor in items:
        identity = (tensor.device, tensor.data_ptr(), tuple(tensor.shape),
                    tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and identity in first_key:
            aliases[name] = first_key[identity]
            continue
        first_key.setdefault(identity, name)
        state[name] = tensor.detach().cpu().contiguous()
    return state, aliases


def save_state(directory: str | Path, modules: dict[str, nn.Module], config: dict[str, Any]) -> Path:
    """Save ``{prefix: module}`` weights into one safetensors file + ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, aliases = _unshared((f"{prefix}.{key}", tensor) for prefix, module in modules.items()
                               for key, tensor in module.state_dict().items())
    shapes = {key: list(t.shape) for key, t in state.items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    manifest = {**config, "tensors": shapes, **({"aliases": aliases} if aliases else {}),
                "files": {WEIGHTS: file_sha256(directory / WEIGHTS)}}
    atomic_write(directory / MANIFEST,
                  lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return directory


FIT_STATE = "fit-state.safetensors"


def save_fit_state(path: str | Path, state: FitState) -> Path:
    """One safetensors file (written atomically): the tensors, and everything else as
    JSON in its metadata; nothing is pickled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    optimizer_state, optimizer_values = [], {}
    for param, values in state.optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                optimizer_state.append((f"optimizer.{param}.{key}", value))
            else:
                optimizer_values.setdefault(str(param), {})[key] = value
    tensors, aliases = _unshared([
        *((f"model.{key}", t) for key, t in state.model.items()), *optimizer_state,
        ("rng.generator_at_epoch_start", state.generator_at_epoch_start),
        ("rng.generator", state.generator), ("rng.torch", state.torch_rng),
        *((f"rng.cuda.{i}", t) for i, t in enumerate(state.cuda_rng or [])),
        *((f"rng.rank.{i}", t) for i, t in enumerate(state.rank_rngs or []))])
    record = {
        "epoch": state.epoch, "next_batch": state.next_batch, "step": state.step,
        "running": state.running, "epoch_lr": state.epoch_lr, "summaries": state.summaries,
        "optimizer_values": optimizer_values,
        "optimizer_params": [str(p) for p in state.optimizer["state"]],
        "param_groups": state.optimizer["param_groups"], "schedule": state.schedule,
        "scaler": state.scaler, "log_offset": state.log_offset, "aliases": aliases,
        "cuda_devices": None if state.cuda_rng is None else len(state.cuda_rng),
        "ranks": None if state.rank_rngs is None else len(state.rank_rngs)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={
        "format": "pt", "compatzoo_fit_state": json.dumps(record)}))
    return path


def load_fit_state(path: str | Path) -> FitState:
    """A :class:`FitState` saved by :func:`save_fit_state`."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            record = json.loads(handle.metadata()["compatzoo_fit_state"])
        return _fit_state(record, load_file(str(path)))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read the training state {path} ({exc!r}); it is not a "
                              "compatzoo training state or it is corrupt: delete it to "
                              "restart this model's training from its start") from None


def _fit_state(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FitState:
    for alias, key in record["aliases"].items():
        tensors[alias] = tensors[key]
    optimizer_state: dict[int, dict[str, Any]] = {int(p): {} for p in record["optimizer_params"]}
    for param, values in record["optimizer_values"].items():
        optimizer_state[int(param)].update(values)
    model = {}
    for key, tensor in tensors.items():
        what, _, rest = key.partition(".")
        if what == "model":
            model[rest] = tensor
        elif what == "optimizer":
            param, _, name = rest.partition(".")
            optimizer_state[int(param)][name] = tensor
    return FitState(
        epoch=record["epoch"], next_batch=record["next_batch"], step=record["step"],
        running=record["running"], epoch_lr=record["epoch_lr"], summaries=record["summaries"],
        model=model, optimizer={"state": optimizer_state, "param_groups": record["param_groups"]},
        schedule=record["schedule"], scaler=record["scaler"],
        generator_at_epoch_start=tensors["rng.generator_at_epoch_start"],
        generator=tensors["rng.generator"], torch_rng=tensors["rng.torch"],
        log_offset=record["log_offset"],
        cuda_rng=None if record["cuda_devices"] is None else [
            tensors[f"rng.cuda.{i}"] for i in range(record["cuda_devices"])],
        rank_rngs=None if record.get("ranks") is None else [
            tensors[f"rng.rank.{i}"] for i in range(record["ranks"])])


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}; is it a compatzoo checkpoint folder?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path} holds a JSON {type(manifest).__name__}, expected an object "
                              "(the checkpoint's config); the checkpoint is corrupt: re-create it")
    return manifest


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state(directory: str | Path, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Load weights strictly into ``modules``, checking shapes against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    expected_sha = manifest.get("files", {}).get(WEIGHTS)
    if expected_sha is not None and (directory / WEIGHTS).is_file():
        found = file_sha256(directory / WEIGHTS)
        if found != expected_sha:
            raise CheckpointError(f"{directory / WEIGHTS} has sha256 {found[:16]}..., but "
                                  f"{MANIFEST} recorded {expected_sha[:16]}... when it was saved: "
                                  "the file changed or is damaged; re-create the checkpoint")
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {directory / WEIGHTS} ({exc}); the file is missing "
                              "or corrupt: re-create or re-download the checkpoint") from None
    for alias, key in manifest.get("aliases", {}).items():
        if key not in state:
            raise CheckpointError(f"{MANIFEST} says {alias} is stored as {key}, which the "
                                  "weights lack; the checkpoint is corrupt")
        state[alias] = state[key]
    expected = manifest.get("tensors", {})
    for key, tensor in state.items():
        if key in expected and list(tensor.shape) != expected[key]:
            raise CheckpointError(f"{key} has shape {list(tensor.shape)} in the weights but "
                                  f"{expected[key]} in {MANIFEST}; the checkpoint is corrupt")
    for key, tensor in state.items():
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            raise CheckpointError(f"{directory / WEIGHTS}: {key} holds NaN; the weights were "
                                  "saved from a diverged model or are damaged: re-create them")
    for prefix, module in modules.items():
        load_prefixed(module, state, prefix, f"'{prefix}' in {directory}")
    return manifest


def load_prefixed(module: nn.Module, state: dict[str, Any], prefix: str, where: str) -> None:
    """Load the ``prefix.*`` entries of ``state`` strictly into ``module`` (tensors are
    cast to the module's dtypes)."""
    part = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights {where} do not fit the model built from its "
                              f"config: {exc}") from None
