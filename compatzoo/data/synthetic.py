"""An embedded, offline instance-retrieval benchmark generated from a seed.

Each class is one "object": a composition of a few coloured, possibly striped or
ring-shaped superellipses. Every image shows that object under nuisances a retrieval
model has to be invariant to -- affine pose, per-part jitter, illumination and colour
cast, sensor noise, background gradients, distractor shapes and an occluder. Classes
come in families whose members share all but a few parts, so the benchmark has
fine-grained confusions and rewards more data and capacity (an old model trained on 30%
of the data with a narrow CNN is clearly weaker than a wider one trained on all of it).

Query/gallery classes are disjoint from the training classes (unseen objects, as in
GLDv2 or SOP retrieval). Rendering is vectorised in torch and deterministic from the
seed; results can be cached as safetensors keyed by a hash of the parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from compatzoo.data.datasets import RetrievalData, TensorImages, channel_stats, retrieval_info

logger = logging.getLogger(__name__)

# Bump whenever the rendered images change for the same parameters (invalidates caches).
GENERATOR_VERSION = 1
_CHUNK = 1024  # images rendered at once; fixed so random draws do not depend on memory
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
    # Difficulty knobs.
    family_size: int = Field(4, ge=1, description="classes per family of look-alike objects")
    mutations: int = Field(1, ge=1, description="parts re-drawn per class within a family")
    min_parts: int = Field(3, ge=1)
    max_parts: int = Field(5, ge=1, le=16)
    rotation: float = Field(30.0, ge=0, le=180, description="max rotation in degrees")
    scale_jitter: float = Field(0.2, ge=0, lt=1, description="object scale in [1-j, 1+j]")
    translation: float = Field(0.15, ge=0, le=1, description="max shift, fraction of half-width")
    part_jitter: float = Field(0.05, ge=0, description="std of per-image part displacement")
    color_jitter: float = Field(0.2, ge=0, le=1)
    noise: float = Field(0.03, ge=0, description="std of Gaussian pixel noise in [0, 1] units")
    distractors: int = Field(3, ge=0, description="clutter shapes behind the object")
    occlusion: float = Field(0.5, ge=0, le=1, description="probability of an occluder")
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _check_parts(self) -> SyntheticParams:
        if self.min_parts > self.max_parts:
            raise ValueError(f"min_parts ({self.min_parts}) must not exceed max_parts ({self.max_parts})")
        return self

    def content_hash(self) -> str:
        """Hash of everything that determines the images (not where they are cached)."""
        payload = self.model_dump(mode="json", exclude={"cache_dir"})
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
    col = lambda name: part[name][:, None, None]  # noqa: E731 - (N,) -> (N, 1, 1)
    dx, dy = x - col("cx"), y - col("cy")
    cos, sin = torch.cos(col("angle")), torch.sin(col("angle"))
    lx, ly = cos * dx + sin * dy, cos * dy - sin * dx
    power = col("power")
    radius = ((lx / col("a")).abs() ** power + (ly / col("b")).abs() ** power) ** (1.0 / power)
    sharpness = torch.minimum(col("a"), col("b")) * pixels_per_unit[:, None, None] * 2.0
    alpha = torch.sigmoid((1.0 - radius) * sharpness) * torch.sigmoid((radius - col("inner")) * sharpness)
    alpha = alpha * visible[:, None, None]
    direction = lx * torch.cos(col("stripe_angle")) + ly * torch.sin(col("stripe_angle"))
    stripe = col("stripes") * (0.5 + 0.5 * torch.sin(col("freq") * direction + col("phase")))
    c1, c2 = part["color1"][:, :, None, None], part["color2"][:, :, None, None]
    colour = c1 + stripe[:, None] * (c2 - c1)
    return canvas + alpha[:, None] * (colour - canvas)


class _Nuisance:
    """Per-image random draws for ``n`` images, made up front so chunked rendering is
    deterministic."""

    def __init__(self, p: SyntheticParams, g: torch.Generator, class_parts: dict[str, torch.Tensor], n: int):
        k = p.max_parts
        self.parts = dict(class_parts)  # gathered per image, (n, K)
        for name in ("cx", "cy"):
            self.parts[name] = self.parts[name] + p.part_jitter * torch.randn((n, k), generator=g)
        self.parts["angle"] = self.parts["angle"] + 2 * p.part_jitter * torch.randn((n, k), generator=g)
        shift = p.color_jitter * 0.25 * torch.randn((n, k, 3), generator=g)
        self.parts["color1"] = (self.parts["color1"] + shift).clamp(0, 1)
        self.parts["color2"] = (self.parts["color2"] + shift).clamp(0, 1)
        self.rotation = _uniform(g, (n,), -1.0, 1.0) * math.radians(p.rotation)
        self.scale = _uniform(g, (n,), 1.0 - p.scale_jitter, 1.0 + p.scale_jitter)
        self.aspect = _uniform(g, (n,), 1.0 - p.scale_jitter / 2, 1.0 + p.scale_jitter / 2)
        self.shift = _uniform(g, (n, 2), -p.translation, p.translation)
        self.background = torch.rand((n, 2, 3), generator=g)
        self.gradient_angle = _uniform(g, (n,), 0.0, 2 * math.pi)
        self.distractors = _sample_parts(g, (n, p.distractors), size=(0.08, 0.3), spread=1.0)
        self.occluder = _sample_parts(g, (n,), size=(0.15, 0.4), spread=0.6)
        self.occluded = (torch.rand((n,), generator=g) < p.occlusion).float()
        self.contrast = _uniform(g, (n,), 1.0 - p.color_jitter, 1.0 + p.color_jitter)
        self.brightness = _uniform(g, (n,), -p.color_jitter / 2, p.color_jitter / 2)
        self.gain = _uniform(g, (n, 3), 1.0 - p.color_jitter / 2, 1.0 + p.color_jitter / 2)


def _render(
    p: SyntheticParams, g: torch.Generator, class_parts: dict[str, torch.Tensor], count: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Render one image per entry of ``labels`` as uint8 ``(N, 3, S, S)``."""
    n, size = len(labels), p.image_size
    draws = _Nuisance(p, g, _select(class_parts, labels), n)
    present = (torch.arange(p.max_parts) < count[labels][:, None]).float()
    coords = (torch.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        m = sl.stop - sl.start
        chunk = lambda t: t[sl]  # noqa: E731
        # Background: a colour gradient in a random direction.
        angle = chunk(draws.gradient_angle)[:, None, None]
        ramp = 0.5 + 0.5 * (gx * torch.cos(angle) + gy * torch.sin(angle)) * 0.7
        bg = chunk(draws.background)
        canvas = bg[:, 0, :, None, None] + ramp[:, None] * (bg[:, 1] - bg[:, 0])[:, :, None, None]
        image_px = torch.full((m,), size / 2.0)
        ix, iy = gx.expand(m, size, size), gy.expand(m, size, size)
        for j in range(p.distractors):
            part = {k: chunk(v)[:, j] for k, v in draws.distractors.items()}
            canvas = _paint(canvas, ix, iy, part, image_px, torch.ones(m))
        # Object frame: undo shift, rotation, scale and aspect of this view.
        rot, scale, aspect = chunk(draws.rotation), chunk(draws.scale), chunk(draws.aspect)
        shift = chunk(draws.shift)
        dx, dy = ix - shift[:, 0, None, None], iy - shift[:, 1, None, None]
        cos, sin = torch.cos(rot)[:, None, None], torch.sin(rot)[:, None, None]
        ox = (cos * dx + sin * dy) / (scale * aspect)[:, None, None]
        oy = (cos * dy - sin * dx) / (scale / aspect)[:, None, None]
        object_px = image_px * scale
        for j in range(p.max_parts):
            part = {k: chunk(v)[:, j] for k, v in draws.parts.items()}
            canvas = _paint(canvas, ox, oy, part, object_px, chunk(present)[:, j])
        occluder = {k: chunk(v) for k, v in draws.occluder.items()}
        canvas = _paint(canvas, ix, iy, occluder, image_px, chunk(draws.occluded))
        # Illumination, colour cast and sensor noise.
        canvas = (canvas - 0.5) * chunk(draws.contrast)[:, None, None, None] + 0.5
        canvas = (canvas + chunk(draws.brightness)[:, None, None, None]) * chunk(draws.gain)[:, :, None, None]
        canvas = canvas + p.noise * torch.randn(canvas.shape, generator=g)
        out[sl] = (canvas.clamp(0, 1) * 255).round().to(torch.uint8)
    return out


def _generate(p: SyntheticParams) -> dict[str, torch.Tensor]:
    class_parts, count = _sample_classes(p, _generator(p.seed, 0))
    train_labels = torch.arange(p.num_train_classes).repeat_interleave(p.train_images_per_class)
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
    path = Path(p.cache_dir) / f"synthetic-{p.content_hash()}.safetensors"
    if path.is_file():
        logger.info("loading synthetic benchmark from %s", path)
        return load_file(path)
    tensors = _generate(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return tensors


def make_synthetic(params: SyntheticParams | None = None) -> RetrievalData:
    """Generate (or load from ``cache_dir``) the synthetic retrieval benchmark."""
    p = params or SyntheticParams()
    t = _load_or_generate(p)
    mean, std = channel_stats(t["train_images"])
    train = TensorImages(t["train_images"], t["train_labels"].numpy(), mean, std)
    query = TensorImages(t["query_images"], t["query_labels"].numpy(), mean, std)
    gallery = TensorImages(t["gallery_images"], t["gallery_labels"].numpy(), mean, std)
    info = retrieval_info("synthetic", p.model_dump(mode="json", exclude={"cache_dir"}), train, query, gallery)
    info |= {"seed": p.seed, "generator_version": GENERATOR_VERSION, "content_hash": p.content_hash()}
    return RetrievalData(train, query, gallery, p.num_train_classes, "synthetic", info)
