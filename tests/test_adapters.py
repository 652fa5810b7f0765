"""Upgraders fitted on paired embeddings only (compatzoo-adapters): known answers for the
closed forms, direct computations for every formula, the trained adapters against the
identity, the query direction, and bad input refused before fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compatzoo
from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.plugin import HopData
from compatzoo_adapters import TooFewPairsError, orthogonal_procrustes, orthogonality_gap
from compatzoo_adapters.trained import pair_loss

# Solved in float64, stored as float32 weights: a known map comes back to float32 rounding.
TOL = 1e-5
# The trained adapters' recipe in these tests: a few hundred Adam steps.
QUICK = {"epochs": 30, "batch_size": 128, "lr": 1e-2}


def hop(old: torch.Tensor, new: torch.Tensor) -> HopData:
    """Pairs only: the labels are there because HopData has them, and are ignored."""
    return HopData(old_features=old, new_features=new,
                   labels=torch.full((len(old),), -1, dtype=torch.long), progress=False)


def orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(seed)))
    return q


def inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def fitted(name: str, old: torch.Tensor, new: torch.Tensor, **params):
    adapter = compatzoo.create_upgrader(name, old.shape[1], new.shape[1], **params)
    adapter.fit(hop(old, new))
    return adapter


def affine_of(adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of ``y = x W + b`` as the adapter applies it, read from its outputs."""
    d = adapter.input_dim
    bias = torch.from_numpy(adapter.upgrade(torch.zeros(1, d)))[0].double()
    return torch.from_numpy(adapter.upgrade(torch.eye(d))).double() - bias, bias


def squared_error(adapter, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.from_numpy(adapter.upgrade(x)) - y).square().sum(1).mean())


# --------------------------------------------------------------------------- procrustes
def test_procrustes_recovers_a_rotation_exactly():
    x, rotation = inputs(200, 24), orthogonal(24, 1)
    weight, bias = affine_of(fitted("procrustes", x, (x.double() @ rotation).float()))
    assert torch.allclose(weight, rotation, atol=TOL) and bias.abs().max() < TOL


def test_procrustes_with_scale_and_centering_recovers_a_similarity():
    x, rotation = inputs(200, 16), orthogonal(16, 2)
    shift = torch.linspace(-1, 1, 16, dtype=torch.float64)
    y = (2.5 * x.double() @ rotation + shift).float()
    weight, bias = affine_of(fitted("procrustes", x, y, scale=True, center=True))
    assert torch.allclose(weight, 2.5 * rotation, atol=TOL)
    assert torch.allclose(bias, shift, atol=TOL)
    # without the scale, the same pairs give the rotation itself (Umeyama's s aside)
    weight, _ = affine_of(fitted("procrustes", x, y, center=True))
    assert torch.allclose(weight, rotation, atol=TOL)


@pytest.mark.parametrize("d_in,d_out", [(12, 20), (20, 12)])
def test_procrustes_across_widths_is_pad_solve_truncate(d_in, d_out):
    """The documented rule, computed directly: zero-pad the narrower side to max(d_in,
    d_out), solve the square problem by SVD, keep the top-left d_in x d_out block."""
    x = inputs(300, d_in, 3).double()
    y = inputs(300, d_out, 4).double()
    side = max(d_in, d_out)
    padded_x = np.zeros((300, side))
    padded_x[:, :d_in] = x.numpy()
    padded_y = np.zeros((300, side))
    padded_y[:, :d_out] = y.numpy()
    u, _, vh = np.linalg.svd(padded_x.T @ padded_y)
    expected = (u @ vh)[:d_in, :d_out]
    rotation, _ = orthogonal_procrustes(x, y)
    assert np.allclose(rotation.numpy(), expected, atol=1e-10)
    gram = rotation @ rotation.T if d_in < d_out else rotation.T @ rotation   # semi-orthogonal
    assert torch.allclose(gram, torch.eye(min(d_in, d_out), dtype=gram.dtype), atol=1e-10)
    weight, _ = affine_of(fitted("procrustes", x.float(), y.float()))
    assert torch.allclose(weight, rotation, atol=TOL)


def test_procrustes_recovers_an_isometric_embedding_into_a_wider_space():
    x = inputs(200, 10)
    embedding = orthogonal(16, 5)[:10]          # orthonormal rows: 10-d -> 16-d isometry
    weight, _ = affine_of(fitted("procrustes", x, (x.double() @ embedding).float()))
    assert torch.allclose(weight, embedding, atol=TOL)


# --------------------------------------------------------------------------- affine
def test_affine_without_ridge_recovers_an_affine_map_exactly():
    x = inputs(300, 12)
    true_weight = torch.randn(12, 9, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(6))
    true_bias = torch.arange(9, dtype=torch.float64) / 9
    weight, bias = affine_of(fitted("affine", x, (x.double() @ true_weight + true_bias).float()))
    assert torch.allclose(weight, true_weight, atol=TOL)
    assert torch.allclose(bias, true_bias, atol=TOL)


def test_affine_ridge_is_the_closed_form_on_centred_pairs():
    """mean ||x W + b - y||^2 + ridge ||W||^2: W = (Xc^T Xc + n ridge I)^-1 Xc^T Yc,
    b = mean(y) - mean(x) W, computed here by the normal equations."""
    x, y = inputs(80, 10, 7), inputs(80, 6, 8)
    ridge = 0.3
    xc = (x - x.mean(0)).double().numpy()
    yc = (y - y.mean(0)).double().numpy()
    expected = np.linalg.solve(xc.T @ xc + 80 * ridge * np.eye(10), xc.T @ yc)
    weight, bias = affine_of(fitted("affine", x, y, ridge=ridge))
    assert np.allclose(weight.numpy(), expected, atol=TOL)
    expected_bias = y.double().mean(0).numpy() - x.double().mean(0).numpy() @ expected
    assert np.allclose(bias.numpy(), expected_bias, atol=TOL)


def test_affine_low_rank_is_reduced_rank_regression():
    x = inputs(400, 12, 9)
    generator = torch.Generator().manual_seed(10)
    low = (torch.randn(12, 3, generator=generator) @ torch.randn(3, 8, generator=generator))
    y = x @ low + 1.0
    weight, bias = affine_of(fitted("affine", x, y, rank=3))       # a rank-3 map: exact
    assert torch.allclose(weight, low.double(), atol=1e-4)
    assert torch.allclose(bias, torch.ones(8, dtype=torch.float64), atol=1e-4)
    # with noise: the fitted values are the best rank-3 approximation of the full least
    # squares fit's (Eckart-Young), and beat truncating W's own SVD
    noisy = y + 0.5 * inputs(400, 8, 11)
    full = fitted("affine", x, noisy)
    reduced = fitted("affine", x, noisy, rank=3)
    fit = full.upgrade(x).astype(np.float64)
    mean = fit.mean(0)
    u, s, vh = np.linalg.svd(fit - mean, full_matrices=False)
    assert np.allclose(reduced.upgrade(x), (u[:, :3] * s[:3]) @ vh[:3] + mean, atol=1e-4)
    w, b = affine_of(full)
    wu, ws, wvh = torch.linalg.svd(w, full_matrices=False)
    truncated = (x.double() @ (wu[:, :3] * ws[:3]) @ wvh[:3] + b).float()
    assert squared_error(reduced, x, noisy) < float((truncated - noisy).square().sum(1).mean())


def test_affine_rank_above_the_widths_is_a_spec_error():
    with pytest.raises(SpecError, match="rank 9 exceeds"):
        compatzoo.create_upgrader("affine", 8, 12, rank=9)


# --------------------------------------------------------------------------- trained
def noisy_affine(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x A + b + noise with A far from orthogonal and from the identity."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.eye(d) + 0.3 * torch.randn(d, d, generator=generator)
    x = torch.randn(n, d, generator=generator)
    return x, x @ a + torch.randn(d, generator=generator) + 0.05 * torch.randn(
        n, d, generator=generator)


@pytest.mark.parametrize("name", ["residual-mlp", "lambda-orthogonal"])
def test_trained_adapters_beat_the_identity_and_a_rotation(name):
    x, y = noisy_affine(2200, 16, 12)
    adapter = fitted(name, x[:2000], y[:2000], **QUICK)
    held_x, held_y = x[2000:], y[2000:]
    error = squared_error(adapter, held_x, held_y)
    identity = float((held_x - held_y).square().sum(1).mean())
    rotation = squared_error(fitted("procrustes", x[:2000], y[:2000], center=True),
                             held_x, held_y)
    assert error < 0.1 * identity and error < 0.5 * rotation


def test_lambda_orthogonal_spans_affine_to_orthogonal():
    """lam = 0 is a plain affine fit (the closed form's error); a large lam keeps the map
    orthogonal (the gap vanishes, the error is the rotation's)."""
    x, y = noisy_affine(2000, 16, 13)
    free = fitted("lambda-orthogonal", x, y, lam=0.0, **QUICK)
    assert squared_error(free, x, y) < 1.5 * squared_error(fitted("affine", x, y), x, y)
    stiff = fitted("lambda-orthogonal", x, y, lam=100.0, **QUICK)
    assert float(orthogonality_gap(stiff.linear.weight.detach())) < 1e-2
    rotation = squared_error(fitted("procrustes", x, y, center=True), x, y)
    assert squared_error(stiff, x, y) < 1.05 * rotation


def test_orthogonality_gap_is_the_frobenius_penalty():
    assert float(orthogonality_gap(torch.diag(torch.tensor([2.0, 1.0])))) == pytest.approx(9.0)
    tall = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])          # (d_out 3, d_in 2)
    assert float(orthogonality_gap(tall)) == pytest.approx(1.0 + 9.0)  # W^T W = diag(2, 4)
    assert float(orthogonality_gap(tall.T)) == pytest.approx(10.0)     # wide: W W^T
    assert float(orthogonality_gap(orthogonal(6, 14)[:, :4].float())) == pytest.approx(0, abs=1e-10)


def test_pair_losses_are_their_formulas():
    predicted, target = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 4.0], [0.0, 2.0]])
    assert float(pair_loss(predicted, target, "mse")) == pytest.approx((9 + 5) / 2)
    assert float(pair_loss(predicted, target, "cosine")) == pytest.approx(((1 - 0.8) + 1) / 2)


# --------------------------------------------------------------------------- direction
@pytest.mark.parametrize("name", ["procrustes", "affine"])
def test_query_direction_fits_the_inverse_map(name):
    """Pairs (old, new = old R): a query adapter maps new rows to old ones, R^T."""
    old, rotation = inputs(200, 12), orthogonal(12, 15)
    new = (old.double() @ rotation).float()
    adapter = compatzoo.create_upgrader(name, 12, 12, direction="query")
    adapter.fit(hop(old, new))
    weight, _ = affine_of(adapter)
    assert torch.allclose(weight, rotation.T, atol=TOL)
    assert np.allclose(adapter.upgrade(new), old.numpy(), atol=1e-4)


def test_query_direction_across_widths_maps_new_width_to_old_width():
    old = inputs(200, 10)
    new = (old.double() @ orthogonal(16, 16)[:10]).float()          # 10-d old, 16-d new
    adapter = compatzoo.create_upgrader("procrustes", 16, 10, direction="query")
    adapter.fit(hop(old, new))
    assert np.allclose(adapter.upgrade(new), old.numpy(), atol=1e-4)
    gallery = compatzoo.create_upgrader("procrustes", 16, 10)       # same widths, wrong way
    with pytest.raises(DimensionMismatchError, match="old features"):
        gallery.fit(hop(old, new))


# --------------------------------------------------------------------------- bad input
def test_different_row_counts_are_refused():
    with pytest.raises(InvalidFeaturesError, match="200 old but 199 new"):
        fitted("procrustes", inputs(200, 8), inputs(199, 8))


@pytest.mark.parametrize("name,params,needed", [
    ("affine", {}, 17), ("procrustes", {}, 16), ("procrustes", {"center": True}, 17),
    ("residual-mlp", {}, 17), ("lambda-orthogonal", {}, 17)])
def test_too_few_pairs_say_how_many_are_needed(name, params, needed):
    with pytest.raises(TooFewPairsError, match=f"needs at least {needed} pairs"):
        fitted(name, inputs(needed - 1, 16), inputs(needed - 1, 16), **params)
    if name in ("residual-mlp", "lambda-orthogonal"):
        params = {**params, "epochs": 1}
    fitted(name, inputs(needed, 16), inputs(needed, 16), **params)


def test_a_ridge_lowers_what_affine_needs():
    fitted("affine", inputs(5, 16), inputs(5, 16), ridge=0.1)      # 5 < d_in + 1 = 17


def test_non_finite_rows_are_named():
    old = inputs(100, 8)
    old[[3, 41], 2] = float("nan")
    old[7, 0] = float("inf")
    with pytest.raises(InvalidFeaturesError, match=r"3 rows \(first: \[3, 7, 41\]\)"):
        fitted("affine", old, inputs(100, 8))


def test_the_adapters_register_through_the_entry_point():
    from compatzoo.registry import get_registry

    for name in ("procrustes", "affine", "residual-mlp", "lambda-orthogonal"):
        assert get_registry().get("upgrader", name).distribution == "compatzoo-adapters"
