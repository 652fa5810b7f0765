"""compatzoo-bict: psi's layers, its cosine-regression fit, eq. 9's momentum input and
registration through the entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compatzoo
from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, SpecError
from compatzoo.plugin import HopData, StoredGallery
from compatzoo.registry import get_registry
from compatzoo_bict import BiCTMLP, BiCTMLPParams, momentum_input


def linear_problem(n: int = 256, d_old: int = 8, d_new: int = 12, seed: int = 0):
    """Old features and their image under a fixed random linear map (the new features)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(n, d_old, generator=g)
    return old, old @ torch.randn(d_old, d_new, generator=g)


def feature_context(old: torch.Tensor, new: torch.Tensor, **extra) -> HopData:
    """Hop data from plain tensors: no images, no orchestrator."""
    return HopData(old_features=old, new_features=new,
                   labels=torch.zeros(len(old), dtype=torch.long), progress=False, **extra)


def cosine_loss(upgrader: BiCTMLP, old: torch.Tensor, new: torch.Tensor) -> float:
    with torch.no_grad():
        return float((1 - F.cosine_similarity(upgrader.eval()(old), new, dim=1)).mean())


def test_psi_is_three_fc_bn_relu_blocks_then_fc():
    psi = BiCTMLP(BiCTMLPParams(hidden_dim=32), input_dim=8, output_dim=12)
    assert [type(m) for m in psi.mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 3 + [nn.Linear]
    linears = [(m.in_features, m.out_features) for m in psi.mlp if isinstance(m, nn.Linear)]
    assert linears == [(8, 32), (32, 32), (32, 32), (32, 12)]
    assert psi.side_dim == 0 and psi.side_information(None) is None
    assert psi(torch.randn(5, 8)).shape == (5, 12)


def test_paper_defaults():
    p = BiCTMLPParams()
    assert (p.hidden_dim, p.hidden_layers, p.epochs, p.batch_size) == (4096, 3, 30, 512)
    assert (p.optimizer, p.lr, p.momentum, p.weight_decay) == ("sgd", 1.0, 0.9, 1e-4)
    assert p.warmup_epochs == 1.0


def test_fit_reduces_the_cosine_loss_on_a_linear_problem():
    old, new = linear_problem()
    psi = BiCTMLP(BiCTMLPParams(hidden_dim=64, epochs=8, batch_size=64, lr=0.5), 8, 12)
    before = cosine_loss(psi, old, new)
    logs = psi.fit(feature_context(old, new))
    assert [log["epoch"] for log in logs] == list(range(1, 9))
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert cosine_loss(psi, old, new) < 0.25 * before


def test_fit_rejects_features_of_the_wrong_width_before_training():
    old, new = linear_problem()
    psi = BiCTMLP(BiCTMLPParams(hidden_dim=16), 8, 12)
    weight = psi.mlp[0].weight.detach().clone()
    with pytest.raises(DimensionMismatchError, match="dimension 12 but 8"):
        psi.fit(feature_context(new, new))
    bad = old.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(InvalidFeaturesError, match="NaN"):
        psi.fit(feature_context(bad, new))
    assert torch.equal(psi.mlp[0].weight, weight)


def test_momentum_input_follows_eq_9():
    f0, f1, f2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([[5.0, 8.0]])
    assert torch.equal(momentum_input([f0]), f0)                            # i = 1: F_0
    assert torch.equal(momentum_input([f0, f1]), torch.tensor([[2.0, 3.0]]))  # 0.5 F_1 + 0.5 F_0
    # i = 3, m = 0.25: 0.75 F_2 + 0.25 F_1
    assert torch.equal(momentum_input([f0, f1, f2], m=0.25), torch.tensor([[4.5, 7.0]]))
    assert np.array_equal(momentum_input([f0.numpy(), f1.numpy()], m=1.0), f0.numpy())


def test_momentum_input_rejects_bad_histories():
    with pytest.raises(SpecError, match="F_0"):
        momentum_input([])
    with pytest.raises(SpecError, match=r"\[0, 1\]"):
        momentum_input([torch.zeros(1, 2)] * 2, m=1.5)
    with pytest.raises(DimensionMismatchError, match="equal width"):
        momentum_input([torch.zeros(1, 2), torch.zeros(1, 3)])


def test_registered_through_the_entry_point_with_validated_params():
    record = get_registry().get("upgrader", "bict-mlp")
    assert (record.distribution, record.plugin) == ("compatzoo-bict", "bict")
    psi = compatzoo.create_upgrader("bict-mlp", input_dim=8, output_dim=4, hidden_dim=16)
    assert isinstance(psi, BiCTMLP) and psi.mlp[0].out_features == 16
    with pytest.raises(SpecError, match="hidden_dims: unknown parameter"):
        compatzoo.create_upgrader("bict-mlp", input_dim=8, output_dim=4, hidden_dims=16)
    with pytest.raises(SpecError, match="optimizer"):
        compatzoo.create_upgrader("bict-mlp", input_dim=8, output_dim=4, optimizer="lbfgs")


def test_a_chained_psi_upgrades_the_momentum_input_and_keeps_the_copy_it_replaces():
    psi = compatzoo.create_upgrader("bict-mlp", input_dim=4, output_dim=4, hidden_dim=8).eval()
    g = torch.Generator().manual_seed(0)
    f0, f1 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert psi.reads_previous and psi.params.input_momentum == 0.5     # sec. 4.4 default
    second = psi.advance(StoredGallery(f1, None, f0))                  # F_2 = psi(0.5 F_1 + 0.5 F_0)
    assert torch.equal(second.features, torch.from_numpy(psi.upgrade(0.5 * f1 + 0.5 * f0)))
    assert second.previous is f1 and second.side is None              # the one extra copy
    first = psi.advance(StoredGallery(f0))                             # i = 1: F_0 alone
    assert torch.equal(first.features, torch.from_numpy(psi.upgrade(f0)))
    vanilla = compatzoo.create_upgrader("bict-mlp", input_dim=4, output_dim=4, hidden_dim=8,
                                        input_momentum=0.0)
    vanilla.load_state_dict(psi.state_dict())
    assert not vanilla.reads_previous
    assert torch.equal(vanilla.eval().advance(StoredGallery(f1, None, f0)).features,
                       torch.from_numpy(psi.upgrade(f1)))


def test_a_chained_psi_trains_on_the_training_items_as_the_chain_stores_them(monkeypatch):
    import compatzoo_bict.upgrader as module

    g = torch.Generator().manual_seed(0)
    phi2, target = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    f0, f1 = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    seen = []
    real_check = module.check_features
    monkeypatch.setattr(module, "check_features",
                        lambda x, dim, what: seen.append(x.clone()) or real_check(x, dim, what))
    psi = compatzoo.create_upgrader("bict-mlp", input_dim=4, output_dim=4, hidden_dim=8,
                                    epochs=1, batch_size=8)
    assert psi.fits_on_stored                                 # the run passes HopData.stored
    psi.fit(feature_context(phi2, target, stored=StoredGallery(f1, None, f0)))
    assert torch.equal(seen[-1], 0.5 * f1 + 0.5 * f0)                    # not phi_2(x)
    psi.fit(feature_context(phi2, target))                               # a first hop: phi_1(x)
    assert torch.equal(seen[-1], phi2)
