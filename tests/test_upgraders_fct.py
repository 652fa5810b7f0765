"""compatzoo-fct: h's branches and mixer, its MSE fit with BatchNorm frozen for the second
half, every side-information model on a tiny image set, the side transformation g of a
chain, linear CKA and registration."""

from __future__ import annotations

import copy
import math
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compatzoo
from compatzoo.data.augment import BatchAugment
from compatzoo.data.datasets import TensorImages
from compatzoo.errors import DimensionMismatchError, InvalidFeaturesError, PluginError, SpecError
from compatzoo.plugin import HopData, StoredGallery
from compatzoo.registry import get_registry
from compatzoo_fct import (SIDE_INFORMATION, FCTParams, FCTSideTransformation,
                           FCTTransformation, SideModelParams, linear_cka, nt_xent)
from compatzoo_fct.side_info import AltOldMixupSide, SideInfoName

TINY_SIDE = {"epochs": 1, "batch_size": 8, "encoder_params": {"widths": [4, 8]}}


def tiny_images(n: int = 24, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)
    return TensorImages(images, np.arange(n) % 3, (0.5,) * 3, (0.25,) * 3)


def context(old: torch.Tensor, new: torch.Tensor, images: TensorImages | None = None,
            **extra) -> HopData:
    extra.setdefault("augment", BatchAugment())
    return HopData(old_train=images, new_train=images, old_features=old, new_features=new,
                   labels=torch.arange(len(old)) % 3, progress=False, **extra)


def image_context(images: TensorImages, d_old: int = 6, d_new: int = 10) -> HopData:
    g = torch.Generator().manual_seed(1)
    return context(torch.randn(len(images), d_old, generator=g),
                   torch.randn(len(images), d_new, generator=g), images)


def fct(side_info: SideInfoName = "none", d_old: int = 8, d_new: int = 12,
        **params) -> FCTTransformation:
    params = {"side_info": side_info, "side_info_dim": 6, "inner_dim": 32,
              "side_model": TINY_SIDE, **params}
    return compatzoo.create_upgrader("fct-transformation", d_old, d_new, **params)


def mse(upgrader: FCTTransformation, old: torch.Tensor, new: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((upgrader.eval()(old) - new) ** 2).mean())


def test_branches_and_mixer_have_the_reference_widths():
    h = fct("simclr")                                           # d_old 8, d_side 6, d_new 12
    net = h.net

    def widths(seq: nn.Sequential) -> list[tuple[int, int]]:
        return [(m.in_features, m.out_features) for m in seq.modules() if isinstance(m, nn.Linear)]

    assert widths(net.old_branch) == [(8, 16), (16, 24)]
    assert widths(net.side_branch) == [(6, 12), (12, 24)]
    assert widths(net.mixer) == [(48, 32), (32, 32), (32, 12)]
    for block in [*net.old_branch, *net.side_branch, *net.mixer[:2]]:
        assert [type(m) for m in block] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert isinstance(net.mixer[-1], nn.Linear)                   # last layer: no BN / ReLU
    assert h(torch.randn(4, 8), torch.randn(4, 6)).shape == (4, 12)


def test_reference_recipe_defaults():
    p = FCTParams()
    assert (p.side_info, p.side_info_dim, p.inner_dim) == ("simclr", 128, 2048)
    assert (p.optimizer, p.lr, p.weight_decay) == ("adam", 5e-4, 2**-15)
    assert (p.epochs, p.batch_size) == (80, 1024)
    assert (p.warmup_epochs, p.freeze_bn_from) == (5.0, 0.5)


def test_fit_reduces_the_mse_on_a_linear_problem():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(256, 8, generator=g)
    new = old @ torch.randn(8, 12, generator=g)
    h = fct("none", epochs=10, batch_size=32, lr=1e-2, warmup_epochs=1)
    before = mse(h, old, new)
    logs = h.fit(context(old, new))
    assert len(logs) == 10 and logs[-1]["loss"] < logs[0]["loss"]
    assert mse(h, old, new) < 0.25 * before
    assert not h.training                                  # fitted upgraders are in eval mode


def test_batchnorm_statistics_freeze_for_the_second_half():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(64, 8, generator=g), torch.randn(64, 12, generator=g)
    h = fct("none", epochs=4, batch_size=16)                       # 4 steps per epoch
    bn, linear = h.net.mixer[0][1], h.net.mixer[0][0]
    calls: list[tuple[bool, torch.Tensor, torch.Tensor]] = []
    bn.register_forward_hook(lambda m, i, o: calls.append(
        (m.training, m.running_mean.clone(), linear.weight.detach().clone())))
    h.fit(context(old, new))
    assert [c[0] for c in calls] == [True] * 8 + [False] * 8
    assert not torch.equal(calls[0][1], calls[7][1])              # first half: stats move
    assert all(torch.equal(calls[7][1], c[1]) for c in calls[8:])  # second half: frozen
    assert not torch.equal(calls[8][2], calls[-1][2])             # ... while weights still learn


def test_side_info_names_and_table_agree():
    assert set(get_args(SideInfoName)) == set(SIDE_INFORMATION)


@pytest.mark.parametrize("kind", sorted(SIDE_INFORMATION))
def test_every_side_model_trains_one_tiny_epoch(kind):
    images = tiny_images()
    h = fct(kind, d_old=6, d_new=10, epochs=1, batch_size=8)
    learned = h.side_dim > 0
    before = {k: v.clone() for k, v in h.side_model.state_dict().items()}
    logs = h.fit(image_context(images))
    side = h.side_information(images, batch_size=10, progress=False)
    if learned:
        assert h.side_dim == 6 and side.shape == (len(images), 6)
        assert torch.isfinite(side).all()
        assert any("side/loss" in log for log in logs)
        changed = [k for k, v in h.side_model.state_dict().items()
                   if k.endswith("weight") and not torch.equal(v, before[k])]
        assert changed, "the side encoder did not train"
        out = h.upgrade(np.random.rand(5, 6).astype(np.float32), side[:5].numpy())
    else:
        assert h.side_dim == 0 and side is None
        out = h.upgrade(np.random.rand(5, 6).astype(np.float32))
    assert out.shape == (5, 10)


def test_nt_xent_hand_values():
    t = 0.5
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(nt_xent(e1, e1, t)) == pytest.approx(0.0)             # one image: no negatives
    # two orthogonal images: each view sees its positive at cos 1, two negatives at cos 0
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
    assert float(nt_xent(torch.cat([e1, e2]), torch.cat([e1, e2]), t)) == pytest.approx(expected)


def test_mixup_keeps_each_image_dominant():
    side = AltOldMixupSide(SideModelParams(encoder_params={"widths": [4]}), 6, 8)
    x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 4, 4)          # image i is constant i
    mixed = side.view(x, None, torch.Generator().manual_seed(3))[:, 0, 0, 0]
    assert not torch.equal(mixed, x[:, 0, 0, 0])
    nearest = (mixed[:, None] - torch.arange(6.0)[None]).abs().argmin(dim=1)
    assert nearest.tolist() == list(range(6))                          # weight >= 0.5 on itself


def test_none_feeds_zeros_and_old_embedding_feeds_the_old_features():
    old = torch.randn(3, 8)
    assert torch.equal(fct("none").side_model.branch_input(old, None), torch.zeros(3, 6))
    h = fct("old-embedding")
    assert torch.equal(h.side_model.branch_input(old, None), old)
    assert h.net.side_branch[0][0].in_features == 8


def test_side_information_before_fit_is_an_error():
    with pytest.raises(SpecError, match="not trained yet"):
        fct("alt-old").side_information(tiny_images())


def test_simclr_needs_an_augmentation_and_says_so_before_training():
    images = tiny_images()
    ctx = image_context(images)
    ctx.augment = None
    h = fct("simclr", d_old=6, d_new=10)
    with pytest.raises(SpecError, match="augment"):
        h.fit(ctx)
    assert not bool(h.side_model.fitted)


def test_bad_stored_input_fails_before_any_work():
    h = fct("alt-old")
    h.side_model.fitted.fill_(True)
    with pytest.raises(InvalidFeaturesError, match="needs side information of dimension 6"):
        h.upgrade(np.zeros((4, 8), np.float32))
    with pytest.raises(DimensionMismatchError, match="dimension 7 but 8"):
        h.upgrade(np.zeros((4, 7), np.float32), np.zeros((4, 6), np.float32))
    side = np.zeros((4, 6), np.float32)
    side[2, 0] = np.inf
    with pytest.raises(InvalidFeaturesError, match="inf in 1 rows"):
        h.upgrade(np.zeros((4, 8), np.float32), side)


def test_the_side_width_comes_from_the_params_alone():
    assert fct("alt-old", side_info_dim=5).side_dim == 5
    with pytest.raises(SpecError, match="side_dim: unknown parameter.*side_info_dim"):
        compatzoo.create_upgrader("fct-transformation", 8, 12, side_dim=64, side_info="none")


def test_a_learned_side_model_without_images_fails_before_any_training():
    h = fct("alt-old")
    with pytest.raises(SpecError, match="HopData.new_train"):
        h.fit(context(torch.randn(16, 8), torch.randn(16, 12)))
    assert not bool(h.side_model.fitted)


def test_side_transformation_chains_v1_to_v3():
    images = tiny_images()
    ctx12 = image_context(images, d_old=6, d_new=10)
    kw = {"side_info": "alt-old", "side_info_dim": 6, "inner_dim": 16, "side_model": TINY_SIDE,
          "epochs": 1, "batch_size": 8}
    h2 = compatzoo.create_upgrader("fct-transformation", 6, 10, **kw)
    h2.fit(ctx12)
    g2 = compatzoo.create_upgrader("fct-side-transformation", 6, 10, **kw)
    assert isinstance(g2, FCTSideTransformation) and g2.output_dim == 6 and g2.side_dim == 6
    g2.adopt_side_model(h2.side_model)
    logs = g2.fit(ctx12)
    assert any("next_side/loss" in log for log in logs)
    assert not any("side/loss" in log for log in logs)                  # psi_1 was adopted
    assert g2.side_model is h2.side_model and bool(g2.next_side_model.fitted)

    ctx23 = image_context(images, d_old=10, d_new=4)
    h3 = compatzoo.create_upgrader("fct-transformation", 10, 4, **kw)
    h3.adopt_side_model(g2.next_side_model)
    frozen = {k: v.clone() for k, v in g2.next_side_model.state_dict().items()}
    h3.fit(ctx23)
    assert all(torch.equal(v, frozen[k]) for k, v in h3.side_model.state_dict().items())

    phi1 = np.random.rand(5, 6).astype(np.float32)
    s1 = h2.side_information(images, progress=False)[:5].numpy()
    v3 = h3.upgrade(h2.upgrade(phi1, s1), g2.upgrade(phi1, s1))
    assert v3.shape == (5, 4) and np.isfinite(v3).all()


def test_transform_side_learns_g_and_the_next_hop_reads_the_side_model_g_targets(tmp_path):
    from compatzoo.engine.checkpoints import load_state, read_manifest, save_state

    images = tiny_images()
    kw = {"side_info": "alt-old", "side_info_dim": 6, "inner_dim": 16, "side_model": TINY_SIDE,
          "epochs": 1, "batch_size": 8}
    h2 = compatzoo.create_upgrader("fct-transformation", 6, 10, transform_side=True, **kw)
    assert h2.side_transformation is not None and fct("alt-old").side_transformation is None
    logs = h2.fit(image_context(images, d_old=6, d_new=10))
    g2 = h2.side_transformation
    assert any("g/next_side/loss" in log for log in logs)
    assert g2.side_model is h2.side_model and bool(g2.next_side_model.fitted)

    h3 = compatzoo.create_upgrader("fct-transformation", 10, 4, **kw)
    h3.fit(context(torch.randn(24, 10), torch.randn(24, 4), images, previous_upgrader=h2))
    assert h3.side_model is g2.next_side_model            # psi_2: what g2 maps psi_1 to

    phi1 = torch.rand(5, 6)
    s1 = h2.side_information(images, progress=False)[:5]
    v2 = h2.eval().advance(StoredGallery(phi1, s1))
    assert torch.equal(v2.features, torch.from_numpy(h2.upgrade(phi1, s1)))
    assert torch.equal(v2.side, torch.from_numpy(g2.upgrade(phi1, s1)))
    v3 = h3.eval().advance(v2)
    assert torch.equal(v3.features, torch.from_numpy(h3.upgrade(h2.upgrade(phi1, s1),
                                                                g2.upgrade(phi1, s1))))
    assert v3.side is None                                # h3 learned no g: the chain ends

    save_state(tmp_path, {"upgrader": h2}, {})            # g shares psi_1 with h: stored once
    aliases = read_manifest(tmp_path)["aliases"]
    assert aliases and all(k.startswith("upgrader.side_transformation.side_model.")
                           for k in aliases)
    loaded = compatzoo.create_upgrader("fct-transformation", 6, 10, transform_side=True, **kw)
    load_state(tmp_path, {"upgrader": loaded})
    again = loaded.eval().advance(StoredGallery(phi1, s1))
    assert torch.equal(again.features, v2.features) and torch.equal(again.side, v2.side)


def test_side_transformation_needs_learned_side_information():
    with pytest.raises(SpecError, match="stores none"):
        compatzoo.create_upgrader("fct-side-transformation", 6, 10, side_info="none")


def test_adopting_a_mismatched_or_untrained_side_model_is_an_error():
    with pytest.raises(SpecError, match="cannot adopt"):
        fct("alt-old").adopt_side_model(fct("simclr").side_model)
    with pytest.raises(SpecError, match="not trained"):
        fct("alt-old").adopt_side_model(fct("alt-old").side_model)


def test_linear_cka_hand_checks():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    y = torch.randn(50, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x @ q) == pytest.approx(1.0)                 # orthogonal invariance
    assert linear_cka(x, 3.7 * x) == pytest.approx(1.0)               # isotropic scaling
    assert linear_cka(x @ q, 0.5 * y) == pytest.approx(linear_cka(x, y))
    assert linear_cka(x, x + 5.0) == pytest.approx(1.0)               # centring
    assert 0.0 < linear_cka(x, y) < 0.5
    assert linear_cka(x.numpy(), np.zeros((50, 3))) == 0.0             # zero side info
    # hand value: x = [1, 0, -1], y = [1, -1, 0] -> <x,y>^2 / (|x|^2 |y|^2) = 1 / 4
    hand = linear_cka(np.array([[1.0], [0.0], [-1.0]]), np.array([[1.0], [-1.0], [0.0]]))
    assert hand == pytest.approx(0.25)
    with pytest.raises(InvalidFeaturesError, match="same N"):
        linear_cka(x, y[:10])


def test_registered_through_the_entry_point_with_validated_params():
    registry = get_registry()
    for name in ("fct-transformation", "fct-side-transformation"):
        assert registry.get("upgrader", name).distribution == "compatzoo-fct"
    with pytest.raises(SpecError, match="side_info"):
        compatzoo.create_upgrader("fct-transformation", 8, 12, side_info="jigsaw")
    with pytest.raises(SpecError, match="side_info_dim instead"):
        compatzoo.create_upgrader("fct-transformation", 8, 12,
                                  side_model={"encoder_params": {"embedding_dim": 3}})
    with pytest.raises(PluginError, match="no encoder named 'resnet5'"):
        compatzoo.create_upgrader("fct-transformation", 8, 12, side_model={"encoder": "resnet5"})


# -- features: augmented (ml-fct's TransformationTrainer) vs fixed ---------------------

class FlipAndShift:
    """A deterministic, per-image augmentation: what a step's view is does not depend on
    the generator, so a test can recompute it."""

    is_identity = False

    def __call__(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        return images.flip(-1) + 0.5


def encoders_context(images: TensorImages, augment=None, d_old: int = 6,
                     d_new: int = 10) -> HopData:
    """Hop data with the frozen models behind its features, as a run gives it."""
    torch.manual_seed(3)
    source = compatzoo.create_encoder("tiny-cnn", widths=[4, 8], embedding_dim=d_old).eval()
    target = compatzoo.create_encoder("tiny-cnn", widths=[4, 8], embedding_dim=d_new).eval()
    x, _ = images.get_batch(np.arange(len(images)))
    with torch.no_grad():
        old, new = source(x), target(x)
    return context(old, new, images, source_encoder=source, target_encoder=target,
                   augment=augment or BatchAugment())


def test_augmented_inputs_are_the_three_models_on_one_augmented_view():
    from compatzoo_fct.transformation import augmented_inputs

    images = tiny_images()
    data = encoders_context(images)                       # the default BatchAugment
    h = fct("alt-old", d_old=6, d_new=10)
    h.fit_side_model(data)
    index = torch.tensor([5, 0, 17, 3])
    old, side, target = augmented_inputs(data, h.side_model, data.target_encoder)(
        index, torch.Generator().manual_seed(11))
    x, _ = images.get_batch(index)
    view = data.augment(x, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(old, data.source_encoder(view))
        assert torch.equal(target, data.target_encoder(view))
        assert torch.equal(side, h.side_model.encoder.eval()(view))
    assert not torch.allclose(old, data.old_features[index], atol=1e-3)   # not the fixed ones


def test_an_augmented_step_is_the_reference_mse_on_the_augmented_features():
    images = tiny_images(16)
    data = encoders_context(images, FlipAndShift())
    h = fct("alt-old", d_old=6, d_new=10, epochs=1, batch_size=16, features="augmented")
    h.fit_side_model(data)
    before = copy.deepcopy(h).train()
    logs = h.fit(data)                                    # one step over all 16 items
    x, _ = images.get_batch(np.arange(16))
    view = FlipAndShift()(x)
    with torch.no_grad():
        expected = F.mse_loss(before.net(data.source_encoder(view),
                                         before.side_model.encoder.eval()(view)),
                              data.target_encoder(view))
        fixed = F.mse_loss(before.net(data.old_features, h.side_model.extract(images, 16, False)),
                           data.new_features)
    assert logs[-1]["loss"] == pytest.approx(float(expected), rel=1e-5)   # batch order differs
    assert abs(float(fixed) - float(expected)) > 1e-3                     # the switch matters


def test_fixed_features_never_run_the_encoders():
    images = tiny_images(16)
    data = encoders_context(images)
    calls = []
    data.source_encoder.register_forward_hook(lambda *a: calls.append(1))
    fct("none", d_old=6, d_new=10, epochs=1, batch_size=8, features="fixed").fit(data)
    assert calls == []


def test_auto_features_follow_what_the_hop_data_has():
    images = tiny_images(8)
    h = fct("none", d_old=6, d_new=10)
    assert h.uses_augmented_features(encoders_context(images))            # a run's hop data
    assert not h.uses_augmented_features(image_context(images))            # features only
    identity = BatchAugment(BatchAugment().params.model_copy(update={"enabled": False}))
    assert not h.uses_augmented_features(encoders_context(images, identity))


def test_augmented_features_without_the_encoders_fail_before_any_training():
    h = fct("simclr", d_old=6, d_new=10, features="augmented")
    with pytest.raises(SpecError, match="source_encoder, target_encoder"):
        h.fit(image_context(tiny_images()))
    assert not bool(h.side_model.fitted)


def test_g_recomputes_its_target_with_the_next_side_model_on_the_same_view():
    images = tiny_images(16)
    data = encoders_context(images, FlipAndShift())
    g = compatzoo.create_upgrader("fct-side-transformation", 6, 0, side_info="alt-old",
                                  side_info_dim=6, inner_dim=32, side_model=TINY_SIDE,
                                  epochs=1, batch_size=16, features="augmented")
    g.fit_side_model(data)
    before = copy.deepcopy(g).train()
    logs = g.fit(data)                  # trains psi_(i+1), then g in one step over 16 items
    view = FlipAndShift()(images.get_batch(np.arange(16))[0])
    with torch.no_grad():
        expected = F.mse_loss(before.net(data.source_encoder(view),
                                         before.side_model.encoder.eval()(view)),
                              g.next_side_model.encoder.eval()(view))
    assert logs[-1]["loss"] == pytest.approx(float(expected), rel=1e-5)
