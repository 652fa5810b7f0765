"""IJB-C 1:1 verification: meta files, InsightFace's template features, TAR@FAR over
template pairs (single and cross-model), 5-point alignment, and bad meta files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compatzoo.data import IJBCMeta, ijbc_verification, load_ijbc
from compatzoo.data.ijbc import (
    ARCFACE_TEMPLATE,
    AlignedFaces,
    similarity_transforms,
    template_features,
    warp_face,
)
from compatzoo.data.image_folder import FileImages
from compatzoo.errors import DatasetError, DimensionMismatchError, InvalidArgumentError

# face -> (template, media): template 1 has media 10 (two frames) and 11; template 3 two
# stills; templates 2, 4 one face each.
FACES = [("a.png", 1, 10), ("b.png", 1, 10), ("c.png", 1, 11), ("d.png", 2, 12),
         ("e.png", 3, 13), ("f.png", 3, 14), ("g.png", 4, 15)]
PAIRS = [(1, 3, 1), (2, 4, 1), (1, 2, 0), (1, 4, 0), (2, 3, 0), (3, 4, 0)]
SIDE = 112


def crop(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def write_benchmark(root: Path, faces=FACES, pairs=PAIRS, points: bool = True) -> Path:
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    for i, (name, _, _) in enumerate(faces):
        Image.fromarray(crop(i)).save(root / "loose_crop" / name)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in faces))
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    if points:  # landmarks exactly on the ArcFace template; scores 0.5, 0.6, ...
        marks = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.ravel())
        (root / "meta" / "ijbc_name_5pts_score.txt").write_text(
            "".join(f"{n} {marks} {0.5 + 0.1 * i:.1f}\n" for i, (n, _, _) in enumerate(faces)))
    return root


@pytest.fixture()
def bench(tmp_path: Path) -> Path:
    return write_benchmark(tmp_path / "ijb")


# --------------------------------------------------------------------------- direct formulas
def insightface_templates(feats, templates, medias, weights=None, norm_score=True):
    """eval_ijbc.py's image2template_feature, written out loop by loop."""
    x = np.array(feats, dtype=np.float64)
    if not norm_score:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    if weights is not None:
        x = x * np.asarray(weights)[:, None]
    out = {}
    for t in np.unique(templates):
        in_t = templates == t
        media_means = [x[in_t & (medias == m)].mean(axis=0) for m in np.unique(medias[in_t])]
        total = np.sum(media_means, axis=0)
        out[int(t)] = total / np.linalg.norm(total)
    return out


def tar_by_brute_force(genuine, impostor, far):
    """Best TAR over thresholds t that accept at most floor(far * n) impostors (score > t)."""
    impostor = np.asarray(impostor)
    allowed = np.floor(far * len(impostor) + 1e-9)
    best = 0.0
    for t in [-np.inf, *impostor]:
        if (impostor > t).sum() <= allowed:
            best = max(best, float((np.asarray(genuine) > t).mean()))
    return best


def pair_scores(t_a, t_b, pairs):
    return {kind: [float(t_a[a] @ t_b[b]) for a, b, y in pairs if y == kind] for kind in (0, 1)}


# --------------------------------------------------------------------------- reading
def test_reads_meta_and_aligned_images(bench: Path) -> None:
    meta = load_ijbc(bench, image_size=SIDE, mean=(0, 0, 0), std=(1, 1, 1))
    assert isinstance(meta, IJBCMeta) and isinstance(meta.images, AlignedFaces)
    assert meta.names.tolist() == [n for n, _, _ in FACES]
    np.testing.assert_array_equal(meta.templates, [t for _, t, _ in FACES])
    np.testing.assert_array_equal(meta.medias, [m for _, _, m in FACES])
    np.testing.assert_array_equal(meta.pairs, PAIRS)
    np.testing.assert_allclose(meta.scores, 0.5 + 0.1 * np.arange(len(FACES)))
    np.testing.assert_allclose(meta.landmarks[3], ARCFACE_TEMPLATE, atol=1e-4)
    image, label, index = meta.images[3]
    assert image.shape == (3, SIDE, SIDE) and (label, index) == (2, 3)
    # landmarks on the template: the alignment is the identity (up to 1e-4 px rounding)
    pixels = torch.round(image * 255).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(pixels - crop(3).astype(int)).max() <= 1


def test_alignment_follows_opencv_pixel_centres(bench: Path) -> None:
    # 112-px landmarks aligned to a 56-px template: scale 1/2, so output (x, y) samples
    # input (2x, 2y) exactly when pixel centres are integers (cv2.warpAffine)
    meta = load_ijbc(bench, image_size=56, mean=(0, 0, 0), std=(1, 1, 1))
    pixels = torch.round(meta.images[0][0] * 255).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(pixels - crop(0)[::2, ::2].astype(int)).max() <= 1


def test_similarity_transform_is_the_least_squares_fit() -> None:
    rng = np.random.default_rng(0)
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (ARCFACE_TEMPLATE - shift) @ np.linalg.inv(scale * rot).T
    noisy = points + rng.normal(0, 2.0, points.shape)
    mirrored = noisy * [-1.0, 1.0]  # the best similarity is still a rotation, never a flip
    exact, *fitted = similarity_transforms(np.stack([points, noisy, mirrored]), ARCFACE_TEMPLATE)
    np.testing.assert_allclose(exact[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(exact[:, 2], shift, atol=1e-9)
    for marks, fit in zip((noisy, mirrored), fitted):
        # direct least squares on x' = a x - b y + tx, y' = b x + a y + ty
        x, y = marks[:, 0], marks[:, 1]
        design = np.concatenate([np.stack([x, -y, np.ones(5), np.zeros(5)], 1),
                                 np.stack([y, x, np.zeros(5), np.ones(5)], 1)])
        a, b, tx, ty = np.linalg.lstsq(design, ARCFACE_TEMPLATE.T.ravel(), rcond=None)[0]
        np.testing.assert_allclose(fit, [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_warp_translation_and_border() -> None:
    image = Image.fromarray(crop(1))
    out = np.asarray(warp_face(image, np.array([[1.0, 0, -3], [0, 1.0, 2]]), SIDE)).astype(int)
    np.testing.assert_array_equal(out[2:, :-3], crop(1)[:-2, 3:].astype(int))
    assert out[:2].max() == 0  # above the shifted image: black


def test_unaligned_crops_are_resized(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path, points=False)
    meta = load_ijbc(root, image_size=56, align=False)
    assert isinstance(meta.images, FileImages) and meta.scores is None and meta.landmarks is None
    assert meta.images[2][0].shape == (3, 56, 56)


# --------------------------------------------------------------------------- templates
@pytest.mark.parametrize("norm_score", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_template_features_match_insightface(bench: Path, norm_score: bool, weighted: bool) -> None:
    meta = load_ijbc(bench)
    feats = np.random.default_rng(1).normal(size=(len(FACES), 5)) * np.arange(1, 8)[:, None]
    weights = meta.scores if weighted else None
    ids, got = template_features(feats, meta.templates, meta.medias, weights, norm_score)
    expected = insightface_templates(feats, meta.templates, meta.medias, weights, norm_score)
    assert ids.tolist() == sorted(expected)
    np.testing.assert_allclose(got.numpy(), np.stack([expected[t] for t in ids]), rtol=1e-5, atol=1e-6)


def test_tar_at_far_known_answer(tmp_path: Path) -> None:
    # one face per template at angle theta: pair score = cos(theta1 - theta2)
    theta = {1: 0.0, 2: 0.5, 3: 0.2, 4: 2.0, 5: 1.3}
    faces = [(f"{t}.png", t, t) for t in theta]
    pairs = [(1, 3, 1), (2, 5, 1), (1, 2, 0), (1, 4, 0), (2, 3, 0), (3, 4, 0), (4, 5, 0)]
    meta = load_ijbc(write_benchmark(tmp_path, faces, pairs, points=False), align=False)
    feats = np.array([[np.cos(v), np.sin(v)] for v in theta.values()])
    result = ijbc_verification(feats, meta, (0.2, 0.4, 1.0), use_detector_score=False)
    # genuine cos 0.2 = 0.980, cos 0.8 = 0.697; impostors cos .5=.878, cos 2=-.416, cos .3=.955,
    # cos 1.8=-.227, cos .7=.765. FAR 0.2: 1 of 5 may pass -> threshold .878 -> TAR 1/2;
    # FAR 0.4: 2 may pass -> threshold .765 -> TAR 1/2; FAR 1: all pass.
    assert result == pytest.approx({0.2: 0.5, 0.4: 0.5, 1.0: 1.0})
    t = {tid: f for tid, f in zip(theta, feats)}
    scores = pair_scores(t, t, pairs)
    for far, tar in result.items():
        assert tar == pytest.approx(tar_by_brute_force(scores[1], scores[0], far))


@pytest.mark.parametrize("cross", [False, True])
def test_ijbc_verification_against_direct_computation(bench: Path, cross: bool) -> None:
    meta = load_ijbc(bench)
    rng = np.random.default_rng(2)
    feats_a = rng.normal(size=(len(FACES), 3)).astype(np.float32)
    feats_b = rng.normal(size=(len(FACES), 3)).astype(np.float32)
    targets = (0.2, 0.25, 0.5, 1.0)
    result = ijbc_verification(feats_a, meta, targets, features_b=feats_b if cross else None)
    t_a = insightface_templates(feats_a, meta.templates, meta.medias, meta.scores)
    t_b = insightface_templates(feats_b, meta.templates, meta.medias, meta.scores) if cross else t_a
    scores = pair_scores(t_a, t_b, PAIRS)  # template1 from model a, template2 from model b
    for far in targets:
        assert result[far] == pytest.approx(tar_by_brute_force(scores[1], scores[0], far))


def test_feature_rows_must_match_faces(bench: Path) -> None:
    meta = load_ijbc(bench)
    with pytest.raises(DimensionMismatchError, match=r"6 rows but the benchmark lists 7 faces"):
        ijbc_verification(np.ones((6, 3), np.float32), meta)


def test_detector_scores_need_the_landmarks_file(tmp_path: Path) -> None:
    meta = load_ijbc(write_benchmark(tmp_path, points=False), align=False)
    with pytest.raises(InvalidArgumentError, match=r"use_detector_score=False"):
        ijbc_verification(np.ones((7, 3), np.float32), meta)


# --------------------------------------------------------------------------- bad meta files
def test_face_list_with_wrong_columns_names_the_line(bench: Path) -> None:
    path = bench / "meta" / "ijbc_face_tid_mid.txt"
    lines = path.read_text().splitlines()
    lines[2] = "c.png 1"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"ijbc_face_tid_mid\.txt line 3: expected 3 fields "
                                           r"\(image_name template_id media_id\), found 2"):
        load_ijbc(bench)


def test_face_list_with_text_ids_names_the_line(bench: Path) -> None:
    path = bench / "meta" / "ijbc_face_tid_mid.txt"
    path.write_text(path.read_text().replace("d.png 2 12", "d.png two 12"))
    with pytest.raises(DatasetError, match=r"ijbc_face_tid_mid\.txt line 4: expected numbers"):
        load_ijbc(bench)


def test_pairs_with_wrong_columns_name_the_line(bench: Path) -> None:
    path = bench / "meta" / "ijbc_template_pair_label.txt"
    path.write_text(path.read_text() + "1 2\n")
    with pytest.raises(DatasetError, match=r"pair_label\.txt line 7: expected a template pair as 3 "
                                           r"integers \(template1 template2 label\), found '1 2'"):
        load_ijbc(bench)


def test_landmarks_with_wrong_columns_name_the_line(bench: Path) -> None:
    path = bench / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].rsplit(" ", 1)[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"5pts_score\.txt line 2: expected 12 fields"):
        load_ijbc(bench)


def test_landmarks_in_another_order(bench: Path) -> None:
    path = bench / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"same order; entry 1 differs"):
        load_ijbc(bench)


def test_pairs_naming_unknown_templates(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path, pairs=[*PAIRS, (1, 9, 0), (8, 2, 1)])
    with pytest.raises(DatasetError, match=r"names 2 template\(s\) with no face in .*: 8, 9\. "
                                           r"The two files come from different releases"):
        load_ijbc(root)


def test_pair_labels_must_be_binary(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path, pairs=[*PAIRS, (1, 2, 2)])
    with pytest.raises(DatasetError, match=r"pair #7: label 2, expected 1"):
        load_ijbc(root)


def test_alignment_without_landmarks(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path, points=False)
    with pytest.raises(DatasetError, match=r"5pts_score\.txt .*does not exist.*align=False"):
        load_ijbc(root)


def test_missing_meta_file(tmp_path: Path) -> None:
    root = write_benchmark(tmp_path)
    (root / "meta" / "ijbc_template_pair_label.txt").unlink()
    with pytest.raises(DatasetError, match=r"pair_label\.txt does not exist"):
        load_ijbc(root)
