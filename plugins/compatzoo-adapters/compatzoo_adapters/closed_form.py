"""Adapters solved in closed form: orthogonal Procrustes and (reduced-rank) ridge affine.

Both are solved in float64 on the CPU (the pairs are a sample: small) and stored as
float32 linear layers; row-vector convention throughout, ``y = x @ W + b`` with ``W``
``(d_in, d_out)``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from compatzoo.plugin import HopData, SpecError

from compatzoo_adapters.base import AdapterParams, PairAdapter, set_affine


def orthogonal_procrustes(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin_R ||x R - y||_F`` over ``R`` with orthonormal rows (``d_in <= d_out``) or
    columns (``d_in >= d_out``), and the singular values of ``x^T y``.

    Schönemann (1966): with ``x^T y = U S V^T`` (thin SVD), ``R = U V^T``. When the widths
    differ this is the rule "zero-pad the narrower side to ``max(d_in, d_out)``, solve the
    square problem, keep the top-left ``d_in x d_out`` block": the padded cross-covariance
    has ``x^T y`` as its only non-zero block, so that block of the square solution is
    ``U V^T``. The map is then semi-orthogonal: an isometric embedding when ``d_in <
    d_out``, an orthogonal projection onto ``d_out`` directions when ``d_in > d_out``.
    """
    u, s, vh = torch.linalg.svd(x.T @ y, full_matrices=False)
    return u @ vh, s


def procrustes_map(x: torch.Tensor, y: torch.Tensor, center: bool,
                   scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` of ``y ~ s (x - mx) R + my``: Procrustes on the (optionally) centred
    pairs, with Umeyama's (1991) global scale ``s = tr(S) / ||x - mx||_F^2`` when asked.
    Solved in float64; returned in float64."""
    x, y = x.detach().cpu().double(), y.detach().cpu().double()
    mx = x.mean(0) if center else x.new_zeros(x.shape[1])
    my = y.mean(0) if center else y.new_zeros(y.shape[1])
    rotation, singular = orthogonal_procrustes(x - mx, y - my)
    s = singular.sum() / (x - mx).square().sum().clamp_min(1e-300) if scale else 1.0
    weight = s * rotation
    return weight, my - mx @ weight


def procrustes_pairs(input_dim: int, output_dim: int, center: bool) -> tuple[int, str]:
    """How many pairs a Procrustes solution needs: its cross-covariance must have full
    rank min(d_in, d_out) for the solution to be unique, and the means take one more."""
    rank = min(input_dim, output_dim)
    why = f"the cross-covariance must reach rank {rank}" + (", plus one pair for the means"
                                                            if center else "")
    return max(2, rank + int(center)), why


class ProcrustesParams(AdapterParams):
    """Defaults: Drift-Adapter's orthogonal Procrustes adapter, a pure rotation."""

    scale: bool = Field(False, description="also fit one global scale (Umeyama 1991); it "
                        "never changes a cosine ranking, only the embeddings' norms")
    center: bool = Field(False, description="subtract each side's mean before solving and "
                         "add the target's mean back (an affine offset beside the rotation)")


class Procrustes(PairAdapter):
    """Orthogonal map in closed form (SVD of the cross-covariance): keeps the geometry of
    the space it maps -- cosine similarities among mapped items are unchanged."""

    Params = ProcrustesParams
    name = "procrustes"

    def __init__(self, params: ProcrustesParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__(params, input_dim, output_dim)
        self.linear = nn.Linear(input_dim, output_dim)

    def min_pairs(self) -> tuple[int, str]:
        return procrustes_pairs(self.input_dim, self.output_dim, self.params.center)

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(old)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        x, y = self.pairs(data)
        set_affine(self.linear, *procrustes_map(x, y, self.params.center, self.params.scale))
        return []


class AffineParams(AdapterParams):
    """Defaults: plain least squares, full rank."""

    ridge: float = Field(0.0, ge=0, allow_inf_nan=False, description="per-pair ridge: "
                         "minimise mean ||x W + b - y||^2 + ridge ||W||_F^2 (the bias is not "
                         "penalised); 0 is ordinary least squares")
    rank: int | None = Field(None, ge=1, description="reduced-rank regression: the best map "
                             "of at most this rank (the fitted values projected on their top "
                             "`rank` principal directions); None: full rank")


class Affine(PairAdapter):
    """Least squares ``y = x W + b`` with ridge, optionally of low rank.

    Low rank is reduced-rank regression (Izenman 1975; with a ridge, Mukherjee & Zhu
    2011), not a truncation of ``W``'s own SVD: with ``V_r`` the top ``rank`` right singular
    vectors of the centred fitted values ``x_c W``, ``W_r = W V_r V_r^T``. Without ridge
    this is the exact minimiser of the squared error under the rank constraint. It is
    stored as two factors ``d_in -> rank -> d_out``, so it also costs less per item.
    """

    Params = AffineParams
    name = "affine"

    def __init__(self, params: AffineParams | None = None, input_dim: int = 0,
                 output_dim: int = 0):
        super().__init__(params, input_dim, output_dim)
        rank = self.params.rank
        if rank is None:
            self.map = nn.Linear(input_dim, output_dim)
        else:
            if input_dim and output_dim and rank > min(input_dim, output_dim):
                raise SpecError(f"affine: rank {rank} exceeds min(d_in, d_out) = "
                                f"{min(input_dim, output_dim)}; choose a smaller rank or None")
            self.map = nn.Sequential(nn.Linear(input_dim, rank, bias=False),
                                     nn.Linear(rank, output_dim))

    def min_pairs(self) -> tuple[int, str]:
        if self.params.ridge > 0:
            return 2, "a fit needs at least two pairs"
        return self.input_dim + 1, ("least squares without a ridge determines the map and "
                                    "its bias from d_in + 1 pairs; with ridge > 0, 2 pairs do")

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        return self.map(old)

    def fit(self, data: HopData) -> list[dict[str, float]]:
        x, y = (t.detach().cpu().double() for t in self.pairs(data))
        mx, my = x.mean(0), y.mean(0)
        weight = ridge_solution(x - mx, y - my, self.params.ridge)
        rank = self.params.rank
        if rank is None:
            set_affine(self.map, weight, my - mx @ weight)
            return []
        _, _, vh = torch.linalg.svd((x - mx) @ weight, full_matrices=False)
        directions = vh[:rank].T                                  # (d_out, rank)
        down, up = self.map
        with torch.no_grad():
            down.weight.copy_((weight @ directions).T)
        set_affine(up, directions.T, my - mx @ weight @ directions @ directions.T)
        return []


def ridge_solution(x: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_W mean ||x W - y||^2 + ridge ||W||_F^2`` (float64): least squares on ``x``
    stacked over ``sqrt(n ridge) I``, the stable form of ``(x^T x + n ridge I)^-1 x^T y``;
    the minimum-norm solution when ``x`` is rank-deficient."""
    n, d = x.shape
    if ridge > 0:
        x = torch.cat([x, math.sqrt(n * ridge) * torch.eye(d, dtype=x.dtype)])
        y = torch.cat([y, y.new_zeros(d, y.shape[1])])
    return torch.linalg.lstsq(x, y, driver="gelsd").solution
