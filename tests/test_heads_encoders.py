import math

import pytest
import torch
import torch.nn.functional as F

import compatzoo
from compatzoo.encoders.pooling import GeM
from compatzoo.errors import CheckpointError


def test_cosface_and_arcface_apply_the_margin_to_the_target_only():
    torch.manual_seed(0)
    features = torch.randn(4, 6)
    labels = torch.tensor([0, 1, 2, 1])
    cosface = compatzoo.create_head("cosface", 6, 3, scale=10.0, margin=0.4)
    cosine = F.normalize(features) @ F.normalize(cosface.weight).T
    expected = cosine.clone()
    expected[torch.arange(4), labels] -= 0.4
    torch.testing.assert_close(cosface(features, labels), 10.0 * expected)
    torch.testing.assert_close(cosface(features), 10.0 * cosine)  # no labels: no margin

    arcface = compatzoo.create_head("arcface", 6, 3)
    cosine = F.normalize(features) @ F.normalize(arcface.weight).T
    theta = torch.acos(cosine[torch.arange(4), labels].clamp(-1, 1))
    target = torch.where(theta + 0.3 < math.pi, torch.cos(theta + 0.3),
                         cosine[torch.arange(4), labels] - math.sin(math.pi - 0.3) * 0.3)
    logits = arcface(features, labels)
    torch.testing.assert_close(logits[torch.arange(4), labels], 30.0 * target, atol=1e-4, rtol=0)
    assert arcface.temperature == 30.0


def test_linear_and_normface_heads():
    linear = compatzoo.create_head("linear", 5, 7)
    assert linear(torch.randn(2, 5)).shape == (2, 7) and linear.temperature == 1.0
    normface = compatzoo.create_head("normface", 5, 7, scale=16)
    logits = normface(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert logits.abs().max() <= 16.0 + 1e-5


def test_gem_pooling_matches_formula_and_reduces_to_avg_at_p1():
    x = torch.rand(2, 3, 4, 4) + 0.1
    gem = GeM(p=3.0)
    torch.testing.assert_close(gem(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    assert gem.p.requires_grad
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", ["tiny-cnn", "resnet18", "mobilenet_v3_small"])
def test_encoders_project_to_embedding_dim(name):
    encoder = compatzoo.create_encoder(name, embedding_dim=24, pooling="gem")
    assert encoder.embedding_dim == 24
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, 24)


def test_encoder_without_projection_keeps_backbone_width():
    encoder = compatzoo.create_encoder("resnet18", embedding_dim=None)
    assert encoder.embedding_dim == 512


def test_local_backbone_weights_load_strictly(tmp_path):
    from safetensors.torch import save_file

    source = compatzoo.create_encoder("tiny-cnn", widths=[4, 8])
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    loaded = compatzoo.create_encoder("tiny-cnn", widths=[4, 8], weights=str(path))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="do not match"):
        compatzoo.create_encoder("tiny-cnn", widths=[4, 16], weights=str(path))
    with pytest.raises(CheckpointError, match="never downloads"):
        compatzoo.create_encoder("tiny-cnn", weights=str(tmp_path / "missing.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        compatzoo.create_encoder("tiny-cnn", weights=str(tmp_path / "bad.safetensors"))


def test_open_clip_tower_builds_without_download():
    pytest.importorskip("open_clip")
    encoder = compatzoo.create_encoder("open-clip", model_name="RN50", embedding_dim=16)
    assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 16)
