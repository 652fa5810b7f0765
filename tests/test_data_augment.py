"""Batch augmentation: shapes, independent views, identity when disabled."""

from __future__ import annotations

import torch

from compatzoo.data import AugmentParams, BatchAugment


NO_OP = {
    "crop_scale": (1, 1),
    "crop_ratio": (1, 1),
    "translate": 0,
    "hflip": False,
    "brightness": 0,
    "contrast": 0,
    "saturation": 0,
}


def batch() -> torch.Tensor:
    return torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_shapes_and_dtype_are_kept() -> None:
    x = batch()
    out = BatchAugment()(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_two_views_differ_and_replay_with_the_same_seed() -> None:
    x, aug = batch(), BatchAugment()
    g = torch.Generator().manual_seed(1)
    view1, view2 = aug(x, g), aug(x, g)
    assert not torch.allclose(view1, view2)
    assert not torch.allclose(view1, x)
    assert torch.equal(aug(x, torch.Generator().manual_seed(1)), view1)


def test_disabled_or_zero_amounts_are_identity() -> None:
    x = batch()
    for params in (AugmentParams(enabled=False), AugmentParams(**NO_OP)):
        aug = BatchAugment(params)
        assert aug.is_identity
        assert torch.equal(aug(x, torch.Generator()), x)
    assert not BatchAugment().is_identity


def test_shift_only_resamples_within_the_input_range() -> None:
    # translate 0.125 on 16 px shifts by up to 2 px, filling the border by reflection.
    params = AugmentParams(**(NO_OP | {"translate": 0.125}))
    x = batch()
    out = BatchAugment(params)(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    # Bilinear resampling mixes neighbouring pixels, so values stay within the input's range.
    assert out.min() >= x.min() - 1e-5 and out.max() <= x.max() + 1e-5


def test_flip_only_mirrors_some_images() -> None:
    params = AugmentParams(**(NO_OP | {"hflip": True}))
    x = batch()
    out = BatchAugment(params)(x, torch.Generator().manual_seed(0))
    flipped = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x)]
    kept = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)
