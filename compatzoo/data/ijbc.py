"""IJB-C 1:1 verification over template pairs (TAR@FAR), as InsightFace evaluates it.

MixBCT reports its face models on IJB-C with InsightFace's evaluation
(``recognition/_evaluation_/ijb``), whose files this module reads::

    <root>/loose_crop/<image name>                 the face crops
    <root>/meta/ijbc_face_tid_mid.txt              image_name template_id media_id
    <root>/meta/ijbc_template_pair_label.txt       template1 template2 label(1 genuine, 0 not)
    <root>/meta/ijbc_name_5pts_score.txt           image_name x1 y1 ... x5 y5 detector_score
                                                   (optional; same images, same order)

With the landmarks file, each crop is aligned as InsightFace aligns it: the least-squares
similarity transform (Umeyama, as ``skimage.transform.SimilarityTransform``) from its 5
points to the ArcFace 112x112 template, then a bilinear warp with black borders (OpenCV's
pixel-centre convention; PIL does the resampling, so values can differ from OpenCV's by a
grey level). ``align=False`` only centre-crops and resizes the loose crops, which are not
aligned faces: use it when the landmarks file is missing, and expect lower numbers.

A template's feature is InsightFace's: within each media (a still image, or the frames of
one video), the mean of the face features; the sum of those media means (the direction of
their mean); L2-normalised. By default the face features keep their norm
(``use_norm_score``) and are weighted by their detector score (``use_detector_score``), as
InsightFace's defaults do; flip-test features (the sum of a face's and its mirror's) are
the caller's to compute. Pairs are scored by cosine, and TAR@FAR uses compatzoo's
threshold (:mod:`compatzoo.retrieval.verification`), which never lets the false accept
rate exceed its target. InsightFace instead reads the ROC point whose FAR is nearest the
target, which may lie above it, so its numbers can be slightly higher at FAR 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from compatzoo.data.datasets import LabeledImages
from compatzoo.data.image_folder import FileImages, load_pixels
from compatzoo.data.ms1m import FACE_MEAN, FACE_STD
from compatzoo.data.preprocess import Preprocess
from compatzoo.data.recordio import read_int_table
from compatzoo.errors import DatasetError, DimensionMismatchError, InvalidArgumentError
from compatzoo.retrieval.validation import ArrayLike, as_features
from compatzoo.retrieval.verification import tar_at_far

#: the five ArcFace landmarks (eyes, nose tip, mouth corners) of a 112x112 aligned face
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]])
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
_SHOW = 5


@dataclass(frozen=True)
class IJBCMeta:
    """One IJB-style benchmark: faces (in ``face_tid_mid`` order), their template and
    media ids, the template pairs, and the optional detector scores and landmarks."""

    root: Path
    images: LabeledImages  # labels: template ids (bookkeeping: faces are compared by pairs)
    names: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray  # (P, 3): template1, template2, 1 genuine / 0 impostor
    scores: np.ndarray | None
    landmarks: np.ndarray | None  # (N, 5, 2) in loose-crop pixels


class _Paths(Sequence):
    """``folder / name`` for each name, built on access (469k Path objects cost memory)."""

    def __init__(self, folder: Path, names: np.ndarray) -> None:
        self.folder, self.names = folder, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        return self.folder / str(self.names[i])


class AlignedFaces(LabeledImages):
    """Face crops warped to the ArcFace template by their similarity transforms."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, warps: np.ndarray,
                 preprocess: Preprocess) -> None:
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.warps = np.asarray(warps, dtype=np.float64)
        self.preprocess = preprocess

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        warp = partial(warp_face, matrix=self.warps[i], size=self.preprocess.image_size)
        pixels = load_pixels(self.paths[i], warp)
        return self.preprocess.normalise(pixels), int(self.labels[i]), int(i)


def similarity_transforms(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(N, 2, 3)`` least-squares similarity transforms (rotation, uniform scale,
    translation; Umeyama 1991) taking each ``points[n]`` ``(K, 2)`` onto ``reference``.

    The reflection fix uses the sign of det(U) det(V), which equals Umeyama's det(A) test
    for full-rank A and, like skimage, still gives a rotation for collinear points.
    """
    points = np.asarray(points, dtype=np.float64)
    k = points.shape[1]
    src_mean, dst_mean = points.mean(axis=1), reference.mean(axis=0)
    src, dst = points - src_mean[:, None], reference - dst_mean
    cov = np.einsum("ki,nkj->nij", dst, src) / k
    u, s, vt = np.linalg.svd(cov)
    d = np.ones((len(points), 2))
    d[:, 1] = np.sign(np.linalg.det(u) * np.linalg.det(vt))
    rotation = u @ (d[:, :, None] * vt)
    scale = (s * d).sum(axis=1) / (src ** 2).sum(axis=(1, 2)) * k
    linear = scale[:, None, None] * rotation
    shift = dst_mean - np.einsum("nij,nj->ni", linear, src_mean)
    return np.concatenate([linear, shift[:, :, None]], axis=2)


def warp_face(image: Image.Image, matrix: np.ndarray, size: int) -> Image.Image:
    """``image`` warped by ``matrix`` (input -> output pixels, integer pixel centres as in
    OpenCV's ``warpAffine``) into a ``size x size`` RGB image, bilinear, black outside.

    PIL asks for the output -> input map with pixel centres at +0.5, hence the shifts.
    """
    forward = np.vstack([matrix, [0.0, 0.0, 1.0]])
    half = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    backward = half @ np.linalg.inv(forward) @ np.linalg.inv(half)
    return image.convert("RGB").transform((size, size), Image.Transform.AFFINE,
                                          tuple(backward[:2].ravel()), Image.BILINEAR,
                                          fillcolor=(0, 0, 0))


def _read_lines(path: Path, columns: int, line_format: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of each non-empty line; a wrong field
    count names the line."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; expected lines '{line_format}'. Download "
                           "InsightFace's IJB meta files (recognition/_evaluation_/ijb)")
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != columns:
                raise DatasetError(
                    f"{path} line {number}: expected {columns} fields ({line_format}), found "
                    f"{len(fields)}: {line.strip()[:120]!r}; the file is corrupt or not the "
                    "right file: download it again"
                )
            rows.append((number, fields))
    if not rows:
        raise DatasetError(f"{path} is empty; expected lines '{line_format}': download it again")
    return rows


def _numbers(path: Path, rows: list[tuple[int, list[str]]], columns: slice, dtype,
             line_format: str) -> np.ndarray:
    """The ``columns`` of every row as numbers; a field that is not one names its line."""
    try:
        return np.array([fields[columns] for _, fields in rows], dtype=dtype)
    except ValueError:
        for number, fields in rows:
            try:
                np.array(fields[columns], dtype=dtype)
            except ValueError:
                raise DatasetError(
                    f"{path} line {number}: expected numbers where '{line_format}' has them, "
                    f"found {' '.join(fields)[:120]!r}; the file is corrupt: download it again"
                ) from None
        raise


def load_ijbc(root: Path, image_size: int = 112, mean: Sequence[float] = FACE_MEAN,
              std: Sequence[float] = FACE_STD, align: bool = True,
              prefix: str = "ijbc") -> IJBCMeta:
    """Read an IJB benchmark from ``root`` (``prefix="ijbb"`` reads IJB-B's files).

    Every meta file is checked here: field counts (naming the line), landmark and face
    lists that agree line by line, pair labels 0/1, and pairs that name only templates
    with faces. Images are decoded when read.
    """
    root = Path(root).expanduser()
    meta, crops = root / "meta", root / "loose_crop"
    faces_file = meta / f"{prefix}_face_tid_mid.txt"
    faces = _read_lines(faces_file, 3, "image_name template_id media_id")
    names = np.array([fields[0] for _, fields in faces])
    ids = _numbers(faces_file, faces, slice(1, 3), np.int64, "image_name template_id media_id")
    templates, medias = ids[:, 0], ids[:, 1]

    pairs_file = meta / f"{prefix}_template_pair_label.txt"
    if not pairs_file.is_file():
        raise DatasetError(f"{pairs_file} does not exist; expected lines 'template1 template2 "
                           "label'. Download InsightFace's IJB meta files")
    pairs = read_int_table(pairs_file, 3, "a template pair", "template1 template2 label")
    if not len(pairs):
        raise DatasetError(f"{pairs_file} lists no pairs; download it again")
    bad_label = np.flatnonzero(~np.isin(pairs[:, 2], (0, 1)))
    if len(bad_label):
        raise DatasetError(f"{pairs_file} pair #{bad_label[0] + 1}: label {pairs[bad_label[0], 2]}, "
                           "expected 1 (same subject) or 0; download the file again")
    unknown = np.setdiff1d(pairs[:, :2], templates)
    if len(unknown):
        shown = ", ".join(str(t) for t in unknown[:_SHOW]) + (", ..." if len(unknown) > _SHOW else "")
        raise DatasetError(
            f"{pairs_file} names {len(unknown)} template(s) with no face in {faces_file}: "
            f"{shown}. The two files come from different releases: download both from the "
            "same IJB meta package"
        )

    scores = landmarks = None
    points_file = meta / f"{prefix}_name_5pts_score.txt"
    points_format = "image_name x1 y1 ... x5 y5 detector_score"
    if points_file.is_file():
        rows = _read_lines(points_file, 12, points_format)
        listed = np.array([fields[0] for _, fields in rows])
        n = min(len(listed), len(names))
        differ = np.flatnonzero(listed[:n] != names[:n])
        if len(differ) or len(listed) != len(names):
            at = int(differ[0]) if len(differ) else n
            raise DatasetError(
                f"{points_file} must list the images of {faces_file} in the same order; entry "
                f"{at + 1} differs ({len(listed)} vs {len(names)} images). Download both from "
                "the same IJB meta package"
            )
        values = _numbers(points_file, rows, slice(1, 12), np.float64, points_format)
        landmarks, scores = values[:, :10].reshape(-1, 5, 2), values[:, 10]
        flat = np.flatnonzero(np.ptp(landmarks, axis=1).max(axis=1) < 1e-6)
        if align and len(flat):
            raise DatasetError(f"{points_file} line {rows[flat[0]][0]}: the 5 landmarks "
                               "coincide, so no alignment exists; fix the line or pass align=False")

    preprocess = Preprocess(image_size=image_size, mean=tuple(mean), std=tuple(std))
    if not crops.is_dir():
        raise DatasetError(f"{crops} does not exist; put the IJB face crops (loose_crop/) "
                           f"next to meta/ in {root}")
    paths = _Paths(crops, names)
    if not align:
        images: LabeledImages = FileImages(paths, templates, preprocess)
    elif landmarks is None:
        raise DatasetError(
            f"aligning faces needs {points_file} ({points_format}), which does not exist; "
            "download it with the IJB meta files, or pass align=False to resize the loose "
            "crops instead (unaligned faces score lower)"
        )
    else:
        reference = ARCFACE_TEMPLATE * (image_size / 112.0)
        images = AlignedFaces(paths, templates, similarity_transforms(landmarks, reference),
                              preprocess)
    return IJBCMeta(root, images, names, templates, medias, pairs, scores, landmarks)


def template_features(features: ArrayLike, templates: np.ndarray, medias: np.ndarray,
                      weights: np.ndarray | None = None,
                      use_norm_score: bool = True) -> tuple[np.ndarray, torch.Tensor]:
    """Sorted template ids and their L2-normalised features ``(T, d)``.

    Each face's feature (L2-normalised first unless ``use_norm_score``, then times its
    ``weights``) is averaged within its (template, media); a template sums its media
    means; the sum is L2-normalised (InsightFace's ``image2template_feature``).
    """
    x = as_features(features, "features").data.float().cpu()
    if len(templates) != x.shape[0] or len(medias) != x.shape[0]:
        raise DimensionMismatchError(
            f"features has {x.shape[0]} rows but the benchmark lists {len(templates)} faces; "
            "embed meta.images in order, one row per face"
        )
    if not use_norm_score:
        x = torch.nn.functional.normalize(x, dim=1)
    if weights is not None:
        x = x * torch.as_tensor(np.asarray(weights), dtype=x.dtype)[:, None]
    groups, group_of = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    group_of = torch.from_numpy(group_of.reshape(-1))
    media_means = torch.zeros(len(groups), x.shape[1]).index_add_(0, group_of, x)
    media_means /= torch.bincount(group_of, minlength=len(groups))[:, None]
    ids, template_of = np.unique(groups[:, 0], return_inverse=True)
    summed = torch.zeros(len(ids), x.shape[1]).index_add_(
        0, torch.from_numpy(template_of.reshape(-1)), media_means)
    return ids, torch.nn.functional.normalize(summed, dim=1)


def ijbc_verification(features: ArrayLike, meta: IJBCMeta,
                      far_targets: Sequence[float] = FAR_TARGETS, *,
                      features_b: ArrayLike | None = None, use_detector_score: bool = True,
                      use_norm_score: bool = True) -> dict[float, float]:
    """TAR at each FAR over the benchmark's template pairs.

    ``features``: one row per face of ``meta.images``, in order. With ``features_b`` (the
    same faces embedded by another model) each pair compares template1's feature from
    ``features`` with template2's from ``features_b``: MixBCT's cross-model test, e.g. new
    model as ``features`` and old model as ``features_b``.
    """
    weights = None
    if use_detector_score:
        if meta.scores is None:
            raise InvalidArgumentError(
                f"use_detector_score needs detector scores from {meta.root}/meta/"
                "*_name_5pts_score.txt, which this benchmark lacks; add the file or pass "
                "use_detector_score=False"
            )
        weights = meta.scores
    ids, feats = template_features(features, meta.templates, meta.medias, weights, use_norm_score)
    feats_b = None
    if features_b is not None:
        feats_b = template_features(features_b, meta.templates, meta.medias, weights,
                                    use_norm_score)[1]
    rows = np.searchsorted(ids, meta.pairs[:, :2])
    return tar_at_far(feats, None, far_targets, pairs=np.column_stack([rows, meta.pairs[:, 2]]),
                      features_b=feats_b)
