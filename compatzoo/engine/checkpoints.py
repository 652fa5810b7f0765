"""Module weights as safetensors plus a JSON manifest; never pickle."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compatzoo.errors import CheckpointError

WEIGHTS = "model.safetensors"
MANIFEST = "config.json"


def atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder so a crash leaves no partial file.
    The file gets the permissions a plain ``open`` would give it (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_state(directory: str | Path, modules: dict[str, nn.Module], config: dict[str, Any]) -> Path:
    """Save ``{prefix: module}`` weights into one safetensors file + ``config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {}
    aliases: dict[str, str] = {}   # a submodule shared by two owners is stored once
    first_key: dict[tuple, str] = {}
    for prefix, module in modules.items():
        for key, tensor in module.state_dict().items():
            name = f"{prefix}.{key}"
            identity = (tensor.device, tensor.data_ptr(), tuple(tensor.shape),
                        tuple(tensor.stride()), tensor.dtype)
            if tensor.numel() and identity in first_key:
                aliases[name] = first_key[identity]
                continue
            first_key.setdefault(identity, name)
            state[name] = tensor.detach().cpu().contiguous()
    shapes = {key: list(t.shape) for key, t in state.items()}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    manifest = {**config, "tensors": shapes, **({"aliases": aliases} if aliases else {})}
    atomic_write(directory / MANIFEST,
                  lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}; is it a compatzoo checkpoint folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt") from None


def load_state(directory: str | Path, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Load weights strictly into ``modules``, checking shapes against the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory)
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
