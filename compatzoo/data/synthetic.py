"""An embedded, offline instance-retrieval benchmark generated from a seed.

Each class is one "object": a composition of a few coloured, possibly striped or
ring-shaped superellipses. Every image shows that object under nuisances a retrieval
model has to be invariant to -- affine pose, per-part jitter, illumination and colour
cast, sensor noise, background gradients, distractor shapes and an occluder. Classes
come in families whose members share all but a few parts, so the benchmark has
fine-grained confusions and rewards more data and capacity (an old model trained on 30%
of the data with a narrow CNN is clearly weaker than a wider one trained on all of it).

Query/gallery classes are by default disjoint from the training classes (unseen objects,
as in GLDv2 or SOP retrieval); ``test_classes: seen`` draws them from the training classes
instead (new images of known objects: the closed-set protocol of FCT/FastFill on
ImageNet and CIFAR-100, where a classifier head can score gallery items). Rendering is
vectorised in torch and deterministic from the seed; results can be cached as
safetensors keyed by a hash of the parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compatzoo.data.datasets import RetrievalData, TensorImages, channel_stats, retrieval_info
from compatzoo.data.preprocess import Preprocess
from compatzoo.registry import with_params

logger = logging.getLogger(__name__)

# Bump whenever the rendered images change for the same parameters (invalidates caches).
GENERATOR_VERSION = 1
# Pixels rendered at once (1024 images of 32x32); a function of the params only, so the
# random draws, and hence the images, do not depend on the machine.
_PIXELS_PER_CHUNK = 1 << 20
_SPLIT_KEYS = tuple(
    f"{split}_{kind}" for split in ("train", "query", "gallery") for kind in ("images", "labels")
)
_POWERS = torch.tensor([1.0, 2.0, 2.0, 6.0])  # diamond, ellipse (twice as likely), rounded box


class SyntheticParams(BaseModel):
    """Size, seed and difficulty of the synthetic benchmark."""

    model_config = ConfigDict(extra="forbid")

    num_train_classes: int = Field(400, ge=2)
    num_test_classes: int = Field(100, ge=2)
    train_images_per_class: int = Field(50, ge=1)
    query_per_class: int = Field(5, ge=1)
    gallery_per_class: int = Field(20, ge=1)
    image_size: int = Field(32, ge=8, le=512)
    seed: int = 0
    test_classes: Literal["unseen", "seen"] = Field(
        "unseen", description="unseen: query/gallery objects never appear in training "
        "(open set); seen: new images of num_test_classes training objects, spread evenly "
        "over the class list (closed set)")
    # Difficulty knobs.
    family_size: int = Field(4, ge=1, description="classes per family of look-alike objects")
    mutations: int = Field(1, ge=1, description="parts re-drawn per class within a family")
    min_parts: int = Field(3, ge=1)
    max_parts: int = Field(5, ge=1, le=16)
    rotation: float = Field(30.0, ge=0, le=180, description="max rotation in degrees")
    scale_jitter: float = Field(0.2, ge=0, lt=1, description="object scale in [1-j, 1+j]")
    translation: float = Field(0.15, ge=0, le=1, description="max shift, fraction of half-width")
    part_jitter: float = Field(0.05, ge=0, description="std of per-image part shift (radians: twice that)")
    color_jitter: float = Field(0.2, ge=0, le=1)
    noise: float = Field(0.03, ge=0, description="std of Gaussian pixel noise in [0, 1] units")
    distractors: int = Field(3, ge=0, description="clutter shapes behind the object")
    occlusion: float = Field(0.5, ge=0, le=1, description="probability of an occluder")
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check_parts(self) -> SyntheticParams:
        if self.min_parts > self.max_parts:
            raise ValueError(f"min_parts ({self.min_parts}) must not exceed max_parts ({self.max_parts})")
        if self.test_classes == "seen" and self.num_test_classes > self.num_train_classes:
            raise ValueError(f"test_classes 'seen' takes the {self.num_test_classes} test classes "
                             f"from the {self.num_train_classes} training classes; lower "
                             "num_test_classes")
        return self

    def content_hash(self) -> str:
        """Hash of everything that determines the images (not where they are cached)."""
        payload = self.model_dump(mode="json", exclude={"cache_dir"})
        if self.test_classes == "unseen":  # the original protocol keeps its cache key
            del payload["test_classes"]
        payload["generator_version"] = GENERATOR_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent random stream per purpose, so the test split does not move when
    only the training set size changes."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _uniform(g: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _sample_parts(
    g: torch.Generator, shape: tuple[int, ...], size: tuple[float, float], spread: float
) -> dict[str, torch.Tensor]:
    """Random shape parameters; every field has ``shape`` (colours add a last dim of 3)."""
    return {
        "cx": _uniform(g, shape, -spread, spread),
        "cy": _uniform(g, shape, -spread, spread),
        "a": _uniform(g, shape, *size),
        "b": _uniform(g, shape, *size),
        "angle": _uniform(g, shape, 0.0, math.pi),
        "power": _POWERS[torch.randint(len(_POWERS), shape, generator=g)],
        "inner": torch.where(torch.rand(shape, generator=g) < 0.2, _uniform(g, shape, 0.4, 0.7), -1.0),
        "color1": torch.rand(shape + (3,), generator=g),
        "color2": torch.rand(shape + (3,), generator=g),
        "stripes": (torch.rand(shape, generator=g) < 0.35).float(),
        "freq": _uniform(g, shape, 6.0, 16.0),
        "stripe_angle": _uniform(g, shape, 0.0, math.pi),
        "phase": _uniform(g, shape, 0.0, 2 * math.pi),
    }


def _select(parts: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in parts.items()}


def _sample_classes(p: SyntheticParams, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Part tables ``(C, K)`` for all classes and the number of parts of each class.

    Classes are drawn as families: members copy a family prototype and re-draw
    ``mutations`` of its parts. Parts are sorted large-to-small so small distinctive
    parts are painted last and stay visible.
    """
    num_classes = p.num_train_classes + p.num_test_classes
    num_families = math.ceil(num_classes / p.family_size)
    k = p.max_parts
    base = _sample_parts(g, (num_families, k), size=(0.12, 0.45), spread=0.5)
    base_count = torch.randint(p.min_parts, p.max_parts + 1, (num_families,), generator=g)
    family = torch.randperm(num_classes, generator=g) % num_families
    parts = _select(base, family)
    count = base_count[family]
    if p.family_size > 1:
        rows = torch.arange(num_classes)
        for _ in range(p.mutations):
            slot = (torch.rand(num_classes, generator=g) * count).long()
            fresh = _sample_parts(g, (num_classes,), size=(0.12, 0.45), spread=0.5)
            for name, values in fresh.items():
                parts[name][rows, slot] = values
    present = torch.arange(k) < count[:, None]
    area = torch.where(present, parts["a"] * parts["b"], -1.0)
    order = area.argsort(dim=1, descending=True)
    sorted_parts = {}
    for name, values in parts.items():
        index = order if values.ndim == 2 else order[..., None].expand_as(values)
        sorted_parts[name] = values.gather(1, index)
    return sorted_parts, count


def _paint(
    canvas: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    part: dict[str, torch.Tensor],
    pixels_per_unit: torch.Tensor,
    visible: torch.Tensor,
) -> torch.Tensor:
    """Alpha-blend one part per image onto ``canvas`` (N, 3, H, W).

    ``x``/``y`` (N, H, W) are pixel positions in the frame the part is defined in;
    edges are softened over about one pixel (``pixels_per_unit``) for anti-aliasing.
    """
    q = {name: v[:, None, None] for name, v in part.items() if v.ndim == 1}  # (N, 1, 1)
    dx, dy = x - q["cx"], y - q["cy"]
    cos, sin = torch.cos(q["angle"]), torch.sin(q["angle"])
    lx, ly = cos * dx + sin * dy, cos * dy - sin * dx
    power = q["power"]
    radius = ((lx / q["a"]).abs() ** power + (ly / q["b"]).abs() ** power) ** (1.0 / power)
    sharpness = torch.minimum(q["a"], q["b"]) * pixels_per_unit[:, None, None] * 2.0
    alpha = torch.sigmoid((1.0 - radius) * sharpness) * torch.sigmoid((radius - q["inner"]) * sharpness)
    alpha = alpha * visible[:, None, None]
    direction = lx * torch.cos(q["stripe_angle"]) + ly * torch.sin(q["stripe_angle"])
    stripe = q["stripes"] * (0.5 + 0.5 * torch.sin(q["freq"] * direction + q["phase"]))
    c1, c2 = part["color1"][:, :, None, None], part["color2"][:, :, None, None]
    colour = c1 + stripe[:, None] * (c2 - c1)
    return canvas + alpha[:, None] * (colour - canvas)


@dataclass
class _Views:
    """Per-image random draws: the class's parts as seen in this view plus every nuisance.

    Drawn for all images up front so chunked rendering does not change the result.
    """

    parts: dict[str, torch.Tensor]  # (N, K) per field
    present: torch.Tensor  # (N, K) 1 where the class has that part
    rotation: torch.Tensor
    scale: torch.Tensor
    aspect: torch.Tensor
    shift: torch.Tensor  # (N, 2)
    background: torch.Tensor  # (N, 2, 3) gradient end colours
    gradient_angle: torch.Tensor
    distractors: dict[str, torch.Tensor]  # (N, D) per field
    occluder: dict[str, torch.Tensor]  # (N,) per field
    occluded: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor
    gain: torch.Tensor  # (N, 3)

    @classmethod
    def sample(
        cls,
        p: SyntheticParams,
        g: torch.Generator,
        class_parts: dict[str, torch.Tensor],
        count: torch.Tensor,
        labels: torch.Tensor,
    ) -> _Views:
        n, k, j = len(labels), p.max_parts, p.color_jitter
        parts = _select(class_parts, labels)
        parts["cx"] = parts["cx"] + p.part_jitter * torch.randn((n, k), generator=g)
        parts["cy"] = parts["cy"] + p.part_jitter * torch.randn((n, k), generator=g)
        parts["angle"] = parts["angle"] + 2 * p.part_jitter * torch.randn((n, k), generator=g)
        tint = j * 0.25 * torch.randn((n, k, 3), generator=g)
        parts["color1"] = (parts["color1"] + tint).clamp(0, 1)
        parts["color2"] = (parts["color2"] + tint).clamp(0, 1)
        return cls(
            parts=parts,
            present=(torch.arange(k) < count[labels][:, None]).float(),
            rotation=_uniform(g, (n,), -1.0, 1.0) * math.radians(p.rotation),
            scale=_uniform(g, (n,), 1.0 - p.scale_jitter, 1.0 + p.scale_jitter),
            aspect=_uniform(g, (n,), 1.0 - p.scale_jitter / 2, 1.0 + p.scale_jitter / 2),
            shift=_uniform(g, (n, 2), -p.translation, p.translation),
            background=torch.rand((n, 2, 3), generator=g),
            gradient_angle=_uniform(g, (n,), 0.0, 2 * math.pi),
            distractors=_sample_parts(g, (n, p.distractors), size=(0.08, 0.3), spread=1.0),
            occluder=_sample_parts(g, (n,), size=(0.15, 0.4), spread=0.6),
            occluded=(torch.rand((n,), generator=g) < p.occlusion).float(),
            contrast=_uniform(g, (n,), 1.0 - j, 1.0 + j),
            brightness=_uniform(g, (n,), -j / 2, j / 2),
            gain=_uniform(g, (n, 3), 1.0 - j / 2, 1.0 + j / 2),
        )

    def __getitem__(self, rows: slice) -> _Views:
        return _Views(
            **{
                name: {k: v[rows] for k, v in value.items()} if isinstance(value, dict) else value[rows]
                for name, value in vars(self).items()
            }
        )


def _render_chunk(p: SyntheticParams, v: _Views, g: torch.Generator) -> torch.Tensor:
    """Background, distractors, the object, an occluder, then photometric nuisances."""
    n, size = len(v.rotation), p.image_size
    coords = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    iy, ix = (c.expand(n, size, size) for c in torch.meshgrid(coords, coords, indexing="ij"))
    angle = v.gradient_angle[:, None, None]
    ramp = 0.5 + 0.35 * (ix * torch.cos(angle) + iy * torch.sin(angle))
    start, end = v.background[:, 0, :, None, None], v.background[:, 1, :, None, None]
    canvas = start + ramp[:, None] * (end - start)
    image_px = torch.full((n,), size / 2.0)  # pixels per unit of the [-1, 1] image frame
    for d in range(p.distractors):
        part = {name: t[:, d] for name, t in v.distractors.items()}
        canvas = _paint(canvas, ix, iy, part, image_px, torch.ones(n))
    # Object frame: undo this view's shift, rotation, scale and aspect.
    dx, dy = ix - v.shift[:, 0, None, None], iy - v.shift[:, 1, None, None]
    cos, sin = torch.cos(v.rotation)[:, None, None], torch.sin(v.rotation)[:, None, None]
    ox = (cos * dx + sin * dy) / (v.scale * v.aspect)[:, None, None]
    oy = (cos * dy - sin * dx) / (v.scale / v.aspect)[:, None, None]
    for k in range(p.max_parts):
        part = {name: t[:, k] for name, t in v.parts.items()}
        canvas = _paint(canvas, ox, oy, part, image_px * v.scale, v.present[:, k])
    canvas = _paint(canvas, ix, iy, v.occluder, image_px, v.occluded)
    canvas = (canvas - 0.5) * v.contrast[:, None, None, None] + 0.5 + v.brightness[:, None, None, None]
    canvas = canvas * v.gain[:, :, None, None] + p.noise * torch.randn(canvas.shape, generator=g)
    return (canvas.clamp(0, 1) * 255).round().to(torch.uint8)


def _render(
    p: SyntheticParams,
    g: torch.Generator,
    class_parts: dict[str, torch.Tensor],
    count: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Render one image per entry of ``labels`` as uint8 ``(N, 3, S, S)``."""
    views = _Views.sample(p, g, class_parts, count, labels)
    out = torch.empty((len(labels), 3, p.image_size, p.image_size), dtype=torch.uint8)
    chunk = max(1, _PIXELS_PER_CHUNK // p.image_size**2)
    for start in range(0, len(labels), chunk):
        rows = slice(start, start + chunk)
        out[rows] = _render_chunk(p, views[rows], g)
    return out


def _generate(p: SyntheticParams) -> dict[str, torch.Tensor]:
    class_parts, count = _sample_classes(p, _generator(p.seed, 0))
    train_labels = torch.arange(p.num_train_classes).repeat_interleave(p.train_images_per_class)
    if p.test_classes == "seen":  # known objects, evenly spread over the class list
        test_ids = torch.arange(p.num_test_classes) * (p.num_train_classes // p.num_test_classes)
    else:
        test_ids = torch.arange(p.num_test_classes) + p.num_train_classes
    per_class = p.query_per_class + p.gallery_per_class
    test_labels = test_ids.repeat_interleave(per_class)
    is_query = (torch.arange(len(test_labels)) % per_class) < p.query_per_class
    test_images = _render(p, _generator(p.seed, 2), class_parts, count, test_labels)
    return {
        "train_images": _render(p, _generator(p.seed, 1), class_parts, count, train_labels),
        "train_labels": train_labels,
        "query_images": test_images[is_query],
        "query_labels": test_labels[is_query],
        "gallery_images": test_images[~is_query],
        "gallery_labels": test_labels[~is_query],
    }


def _load_or_generate(p: SyntheticParams) -> dict[str, torch.Tensor]:
    if p.cache_dir is None:
        return _generate(p)
    path = Path(p.cache_dir).expanduser() / f"synthetic-{p.content_hash()}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as exc:
            logger.warning("ignoring unreadable cache %s (%s); regenerating", path, exc)
        else:
            if tensors.keys() == set(_SPLIT_KEYS):
                logger.info("loaded synthetic benchmark from %s", path)
                return tensors
            logger.warning("ignoring cache %s with unexpected contents; regenerating", path)
    tensors = _generate(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return tensors


@with_params(SyntheticParams)
def make_synthetic(params: SyntheticParams | None = None) -> RetrievalData:
    """Generate (or load from ``cache_dir``) the synthetic retrieval benchmark."""
    p = params or SyntheticParams()
    t = _load_or_generate(p)
    mean, std = channel_stats(t["train_images"])
    train = TensorImages(t["train_images"], t["train_labels"].numpy(), mean, std)
    query = TensorImages(t["query_images"], t["query_labels"].numpy(), mean, std)
    gallery = TensorImages(t["gallery_images"], t["gallery_labels"].numpy(), mean, std)
    params = p.model_dump(mode="json", exclude={"cache_dir"})
    info = retrieval_info("synthetic", params, train, query, gallery)
    info |= {"seed": p.seed, "generator_version": GENERATOR_VERSION, "content_hash": p.content_hash()}
    return RetrievalData(train, query, gallery, p.num_train_classes, "synthetic", info,
                         Preprocess(image_size=p.image_size, mean=mean, std=std))


# What a dry run (`compatzoo run --dry-run`) needs, known without generating the images.
make_synthetic.num_classes_of = lambda params: params.num_train_classes
