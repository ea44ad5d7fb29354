"""TransDAE encoder: attention maths against explicit references, and timm's contracts."""

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones.transdae import ChannelAttention, DualTransformerBlock, EfficientAttention


@pytest.mark.parametrize("num_heads,sr_ratio", [(1, 1), (2, 1), (2, 2)])
def test_efficient_attention_matches_full_softmax_free_reference(num_heads, sr_ratio):
    torch.manual_seed(0)
    attention = EfficientAttention(dim=8, key_dim=8, value_dim=6, num_heads=num_heads, sr_ratio=sr_ratio).double()
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    # the explicit form: an N x M attention matrix rho_q(Q) rho_k(K)^T, with no softmax over it
    q, k, v = attention.normalised_qkv(x)
    matrix = q @ k.transpose(-2, -1)  # (B, heads, N, M)
    assert matrix.shape[-2:] == (24, 24 // sr_ratio**2)
    reference = attention.reprojection((matrix @ v).transpose(1, 2).reshape(2, 4, 6, -1))
    torch.testing.assert_close(attention(x), reference)
    # and the normalisations are the paper's: queries over channels, keys over tokens
    torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)))
    torch.testing.assert_close(k.sum(-2), torch.ones_like(k.sum(-2)))


def test_efficient_attention_rows_mix_every_token():
    # each output token depends on every input token (global attention), not on a window
    torch.manual_seed(0)
    attention = EfficientAttention(8, 8, 8)
    x = torch.randn(1, 5, 5, 8, requires_grad=True)
    attention(x)[0, 0, 0].sum().backward()
    assert bool((x.grad.abs().sum(-1) > 0).all())


def test_channel_attention_shapes_reference_and_temperature_gradient():
    torch.manual_seed(0)
    attention = ChannelAttention(dim=8, num_heads=2).double()
    with torch.no_grad():
        attention.temperature.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1))
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    out = attention(x)
    assert out.shape == (3, 10, 8)
    # reference: per head, channel x channel cosine similarities over the tokens, times temperature
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        cols = slice(4 * h, 4 * h + 4)
        qh, kh, vh = (F.normalize(t[..., cols].transpose(1, 2), dim=-1) if i < 2 else t[..., cols].transpose(1, 2) for i, t in enumerate((q, k, v)))
        weights = (qh @ kh.transpose(1, 2) * attention.temperature[h]).softmax(-1)  # (B, 4, 4)
        heads.append((weights @ vh).transpose(1, 2))
    torch.testing.assert_close(out, attention.proj(torch.cat(heads, dim=-1)))
    out.square().sum().backward()
    assert attention.temperature.grad is not None and attention.temperature.grad.shape == (2, 1, 1)
    assert bool((attention.temperature.grad.abs() > 0).all())


def test_dual_block_keeps_the_shape_and_trains_every_parameter():
    block = DualTransformerBlock(16, channel_heads=4, sr_ratio=2)
    x = torch.randn(2, 6, 8, 16)
    out = block(x)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("name", ["transdae_tiny", "transdae"])
def test_encoder_works_through_timm_features_only(name):
    model = timm.create_model(name, features_only=True, in_chans=1, **({} if name == "transdae_tiny" else {"embed_dims": (16, 40, 64), "channel_heads": 4}))
    assert model.feature_info.reduction() == [4, 8, 16]
    features = model(torch.rand(2, 1, 64, 48))
    assert [tuple(f.shape) for f in features] == [
        (2, c, 64 // r, 48 // r) for c, r in zip(model.feature_info.channels(), model.feature_info.reduction())
    ]
    subset = timm.create_model(name, features_only=True, out_indices=(1, 2), embed_dims=(8, 16, 32), channel_heads=4)
    assert subset.feature_info.channels() == [16, 32] and len(subset(torch.rand(1, 3, 32, 32))) == 2


def test_encoder_follows_timms_classification_contract():
    model = timm.create_model("transdae_tiny", num_classes=5)
    x = torch.rand(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 128, 4, 4)
    assert model.forward_head(features).shape == (2, 5)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
    four_stages = timm.create_model("transdae_tiny", embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), sr_ratios=(4, 2, 1, 1), features_only=True)
    assert four_stages.feature_info.reduction() == [4, 8, 16, 32]


def test_mismatched_stage_arguments_are_refused():
    with pytest.raises(ValueError, match="one entry per stage"):
        timm.create_model("transdae_tiny", depths=(1, 1))
