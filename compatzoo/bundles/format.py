"""A bundle on disk: one trained upgrade (old model -> new model, with its upgrader) as a
folder of safetensors files and a ``config.json`` that says how to rebuild every module,
what each file must hash to and what the run measured.

::

    config.json                 BundleConfig: versions, spec, models, upgrader, lineage, results
    README.md                   the model card (huggingface_hub ModelCard, model-index)
    old/model.safetensors       the old encoder          (prefix "encoder."; see below)
    new/model.safetensors       the new encoder          (prefix "encoder."; see below)
    new/head.safetensors        the new classifier head  (only where a scheduler reads it)
    side/model.safetensors      the side-information encoder (upgraders that store side info)
    upgrader/model.safetensors  the upgrader             (prefix "upgrader.")

An adapter bundle (``compatzoo fit-adapter``: an upgrader fitted on paired embeddings)
holds no encoders: its models are embedding spaces, a generation name and a width, and
``upgrader/`` is its only weight file. Its upgrader may map new-model queries into the old
space (``direction: query``) instead of the stored gallery into the new one.

A tensor held by two modules (an upgrader embedding its side encoder) is stored once, in
the first file that holds it, and ``aliases`` say where the other copy comes from.
Nothing is ever unpickled: weights are safetensors, the config is JSON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compatzoo.data.preprocess import Preprocess
from compatzoo.engine.checkpoints import atomic_write, file_sha256, load_prefixed
from compatzoo.errors import CheckpointError

SCHEMA_VERSION = 1
CONFIG = "config.json"
CARD = "README.md"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ComponentEntry(_Record):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class HeadEntry(ComponentEntry):
    num_classes: int
    file: str


class ModelEntry(_Record):
    """One encoder of the bundle: how to build it, its width and its weights; or, in an
    adapter bundle, only an embedding space (no encoder, file or fingerprint)."""

    generation: str
    encoder: ComponentEntry | None = None
    embedding_dim: int
    file: str | None = None
    fingerprint: str | None = Field(None, description="sha256 of the encoder's weights as "
                                    "stored (names, dtypes, shapes, bytes): which model a "
                                    "stored gallery came from")
    head: HeadEntry | None = None

    @model_validator(mode="after")
    def _encoder_complete(self) -> ModelEntry:
        given = [self.encoder is not None, self.file is not None, self.fingerprint is not None]
        if any(given) and not all(given):
            raise ValueError("an encoder needs its encoder spec, file and fingerprint together")
        if self.head is not None and self.encoder is None:
            raise ValueError("a head needs the encoder it follows")
        return self


class UpgraderEntry(ComponentEntry):
    input_dim: int
    output_dim: int
    side_dim: int = 0
    reads_previous: bool = False
    publishes: list[str] = Field(default_factory=list)
    direction: Literal["gallery", "query"] = Field(
        "gallery", description="gallery: maps stored old embeddings into the new space; "
        "query: maps new-model queries into the old space (never run on a stored gallery)")
    file: str


class SideEntry(_Record):
    file: str
    embedding_dim: int


class BundleConfig(_Record):
    """What ``config.json`` holds; validated before anything is built from it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    compatzoo_version: str
    torch_version: str
    name: str
    experiment: str
    seed: int
    spec: dict[str, Any]
    parent: str | None = Field(None, description="the bundle of the generation the old "
                                                 "model is (a chain's previous hop)")
    lineage: list[str] = Field(description="generations from the oldest to this bundle's new")
    preprocess: Preprocess | None
    similarity: Literal["cosine"] = "cosine"
    dtype: Literal["float32", "float16"] = "float32"
    old: ModelEntry
    new: ModelEntry
    upgrader: UpgraderEntry | None = None
    side: SideEntry | None = None
    evaluation: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(description="sha256 of every weight file")
    tensors: dict[str, dict[str, list[int]]] = Field(description="shape of every stored tensor")
    aliases: dict[str, str] = Field(default_factory=dict,
                                    description="'file:key' -> 'file:key' it is stored as")


# --------------------------------------------------------------------------- hashing

def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stored_state(module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's state as a bundle stores it: floating tensors in ``dtype``."""
    return {key: (t.detach().cpu().to(dtype) if t.is_floating_point() else t.detach().cpu())
            .contiguous() for key, t in module.state_dict().items()}


# --------------------------------------------------------------------------- writing
def write_weights(folder: Path, parts: dict[str, dict[str, nn.Module]],
                  dtype: torch.dtype) -> tuple[dict[str, str], dict[str, dict[str, list[int]]],
                                               dict[str, str]]:
    """Save each ``{file: {prefix: module}}`` as one safetensors file; a tensor already
    stored (same storage, shape and strides) becomes an alias. Returns the files' sha256,
    the tensors' shapes and the aliases."""
    first: dict[tuple, str] = {}
    files, tensors, aliases = {}, {}, {}
    for relpath, modules in parts.items():
        state: dict[str, torch.Tensor] = {}
        for prefix, module in modules.items():
            for key, tensor in module.state_dict().items():
                identity = (tensor.device, tensor.data_ptr(), tuple(tensor.shape),
                            tuple(tensor.stride()), tensor.dtype)
                name = f"{prefix}.{key}"
                if tensor.numel() and identity in first:
                    aliases[f"{relpath}:{name}"] = first[identity]
                    continue
                first.setdefault(identity, f"{relpath}:{name}")
                tensor = tensor.detach().cpu()
                state[name] = (tensor.to(dtype) if tensor.is_floating_point()
                               else tensor).contiguous()
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, state=state: save_file(state, tmp,
                                                              metadata={"format": "pt"}))
        files[relpath] = file_sha256(path)
        tensors[relpath] = {key: list(t.shape) for key, t in state.items()}
    return files, tensors, aliases


def write_config(folder: Path, config: BundleConfig) -> None:
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(
        json.dumps(config.model_dump(mode="json"), indent=2)))


# --------------------------------------------------------------------------- reading
def read_config(folder: Path) -> BundleConfig:
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG}: it is not a compatzoo bundle (a bundle "
                              f"folder holds {CONFIG}, {CARD} and old/, new/ weights); give the "
                              "folder `compatzoo run` or `compatzoo bundle` wrote")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the bundle is corrupt: "
                              "re-create or re-download it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, expected an object "
                              "with the bundle's config; re-create or re-download the bundle")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema_version {version!r}; this compatzoo reads "
                              f"version {SCHEMA_VERSION}: upgrade compatzoo or re-create the "
                              "bundle")
    try:
        return BundleConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise CheckpointError(f"{path} is not a valid bundle config ({problems}); re-create or "
                              "re-download the bundle") from None


def read_weights(folder: Path, config: BundleConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Every weight file, hash-checked against the config before it is parsed, then
    shape-checked; aliases resolved. ``{file: {key: tensor}}``."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for relpath, expected in config.files.items():
        path = folder / relpath
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; {CONFIG} lists it. Re-download or "
                                  "re-create the bundle")
        found = file_sha256(path)
        if found != expected:
            raise CheckpointError(f"{path} has sha256 {found[:16]}..., but {CONFIG} says "
                                  f"{expected[:16]}...: the file is corrupt or was replaced. "
                                  "Re-download or re-create the bundle")
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); "
                                  "compatzoo reads weights only as safetensors (never "
                                  "pickles): re-create the bundle") from None
        shapes = config.tensors.get(relpath, {})
        if set(shapes) != set(state):
            raise CheckpointError(f"{path} holds tensors {sorted(set(state) ^ set(shapes))[:5]} "
                                  f"that {CONFIG} does not list (or lacks listed ones); the "
                                  "bundle is inconsistent: re-create it")
        for key, tensor in state.items():
            if list(tensor.shape) != shapes[key]:
                raise CheckpointError(f"{path}: {key} has shape {list(tensor.shape)} but "
                                      f"{CONFIG} says {shapes[key]}; re-create the bundle")
        states[relpath] = state
    for alias, target in config.aliases.items():
        (file, key), (source_file, source_key) = alias.split(":", 1), target.split(":", 1)
        if source_key not in states.get(source_file, {}):
            raise CheckpointError(f"{CONFIG} says {alias} is stored as {target}, which the "
                                  "weights lack; the bundle is corrupt")
        states.setdefault(file, {})[key] = states[source_file][source_key]
    return states


def load_module(module: nn.Module, state: dict[str, torch.Tensor], prefix: str,
                where: str) -> nn.Module:
    """``prefix.*`` of ``state`` loaded strictly into ``module``, in eval mode."""
    load_prefixed(module, state, prefix, f"in {where}")
    return module.eval()
