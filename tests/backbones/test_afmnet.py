"""AFM-Net: the Mixture-of-Experts gate and balancing loss, the scans, and timm's contract."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the variants)
from backbones.afmnet import (
    SCAN_DIRECTIONS,
    MambaMixer,
    MixtureOfExperts,
    cross_merge,
    cross_scan,
    load_balancing_loss,
    resize_to,
    rotary_2d,
)

#: a very small AFM-Net (every part present) for fast contract tests
TINY = dict(
    img_size=64, embed_dim=16, d_state=4, adapter_dim=8, fusion_dim=8, moe_experts=4, moe_top_k=2, moe_hidden=8,
    cnn_kwargs=dict(layers=[1, 1, 1, 1], channels=(8, 8, 16, 16), stem_width=8),
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("afmnet_tiny", num_classes=5, **TINY).eval()


# -- the Mixture of Experts -------------------------------------------------------------------


def test_gate_gives_exactly_k_experts_nonzero_weight_per_sample_equal_to_their_probabilities():
    torch.manual_seed(0)
    moe = MixtureOfExperts(12, num_experts=7, top_k=3, num_shared_experts=1, hidden_dim=5)
    x = torch.randn(9, 12)
    weights, probs, selected = moe.route(x)
    assert ((weights != 0).sum(dim=1) == 3).all()
    for w, p, s in zip(weights, probs, selected):
        assert set(torch.nonzero(w).flatten().tolist()) == set(s.tolist())
        assert set(s.tolist()) == set(p.topk(3).indices.tolist())  # the three most probable
        torch.testing.assert_close(w[s], p[s])  # weighted by their (not renormalised) probability
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(9))


def test_moe_output_equals_explicit_top_k_dispatch():
    torch.manual_seed(1)
    moe = MixtureOfExperts(6, num_experts=5, top_k=2, num_shared_experts=2, hidden_dim=4)
    x = torch.randn(4, 6)
    out = moe(x)
    probs = (x @ moe.gate.weight.t()).softmax(dim=-1)
    for b in range(4):
        expected = torch.zeros(6)
        for e in probs[b].topk(2).indices.tolist():
            hidden = F.silu(x[b] @ moe.w_gate[e]) * (x[b] @ moe.w_up[e])
            expected += probs[b, e] * (hidden @ moe.w_down[e])
        shared = moe.shared
        expected += shared["down"](F.silu(shared["gate"](x[b])) * shared["up"](x[b]))
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6)


def test_unselected_experts_get_no_gradient():
    torch.manual_seed(2)
    moe = MixtureOfExperts(6, num_experts=6, top_k=1, num_shared_experts=0, hidden_dim=4)
    x = torch.randn(1, 6)
    moe(x).sum().backward()
    chosen = moe.route(x)[2].item()
    grads = moe.w_down.grad.abs().sum(dim=(1, 2))
    assert grads[chosen] > 0 and grads.sum() == grads[chosen]


def test_balancing_loss_matches_hand_computation():
    # 4 samples, 4 experts, top 2; loads f_i = E / (k T) * count_i, P_i = mean probability
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.3, 0.1]])
    selected = torch.tensor([[0, 1], [0, 1], [3, 2], [0, 2]])
    counts = torch.tensor([3.0, 2.0, 2.0, 1.0])
    expected = (counts * 4 / (2 * 4) * probs.mean(dim=0)).sum()
    torch.testing.assert_close(load_balancing_loss(probs, selected, 4), expected)


def test_balancing_loss_is_smallest_for_uniform_routing():
    experts, k, tokens = 8, 2, 64
    # perfectly balanced: every expert chosen equally often, probabilities uniform -> exactly 1
    uniform = torch.full((tokens, experts), 1 / experts)
    balanced = torch.stack([torch.arange(k) * (experts // k) + t % (experts // k) for t in range(tokens)])
    assert load_balancing_loss(uniform, balanced, experts).item() == pytest.approx(1.0)
    # collapsed: every sample routed to the same k experts with all the probability -> E / k
    collapsed_probs = torch.zeros(tokens, experts)
    collapsed_probs[:, :k] = 1 / k
    collapsed = torch.arange(k).expand(tokens, k)
    assert load_balancing_loss(collapsed_probs, collapsed, experts).item() == pytest.approx(experts / k)
    # gates of growing sharpness (real top-k routing of random logits) never beat uniform
    torch.manual_seed(3)
    logits = torch.randn(tokens, experts) + torch.linspace(0, 3, experts)  # a built-in preference
    losses = []
    for temperature in (0.0, 0.5, 1.0, 2.0, 4.0):
        probs = (logits * temperature).softmax(dim=-1)
        losses.append(load_balancing_loss(probs, probs.topk(k).indices, experts).item())
    assert min(losses[1:]) > 1.0 and losses == sorted(losses)


def test_aux_loss_is_recorded_in_training_mode_only():
    moe = MixtureOfExperts(6, num_experts=4, top_k=2, hidden_dim=4).eval()
    moe(torch.randn(3, 6))
    assert moe.aux_loss is None
    moe.train()(torch.randn(3, 6))
    assert moe.aux_loss is not None and moe.aux_loss.requires_grad


def test_balancing_loss_gradient_spreads_the_routing():
    """A few steps on the balancing loss alone move a collapsed gate towards uniform routing."""
    torch.manual_seed(4)
    moe = MixtureOfExperts(8, num_experts=4, top_k=1, num_shared_experts=0, hidden_dim=4)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 1.0  # expert 0 wins for inputs with positive sums
    x = torch.randn(256, 8).abs()
    optimizer = torch.optim.SGD(moe.gate.parameters(), lr=0.5)
    first = None
    for _ in range(30):
        moe(x)
        first = first if first is not None else moe.aux_loss.item()
        optimizer.zero_grad()
        moe.aux_loss.backward()
        optimizer.step()
    moe(x)
    assert moe.aux_loss.item() < first


# -- scanning ---------------------------------------------------------------------------------


def test_cross_scan_orders_are_rows_and_columns_both_ways_and_merge_inverts_them():
    assert SCAN_DIRECTIONS == ("rows forward", "rows backward", "columns forward", "columns backward")
    h, w = 3, 4
    tokens = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)  # row-major index
    scanned = cross_scan(tokens, (h, w)).view(4, h * w).long().tolist()
    grid = torch.arange(h * w).view(h, w)
    assert scanned[0] == grid.flatten().tolist()
    assert scanned[1] == grid.flatten().flip(0).tolist()
    assert scanned[2] == grid.t().flatten().tolist()
    assert scanned[3] == grid.t().flatten().flip(0).tolist()
    x = torch.randn(2, h * w, 5)
    merged = cross_merge(cross_scan(x, (h, w)), (h, w))
    for path in merged:
        torch.testing.assert_close(path, x)


def test_mamba_mixer_is_causal():
    torch.manual_seed(5)
    mixer = MambaMixer(8, d_state=4)
    x = torch.randn(2, 10, 8)
    changed = x.clone()
    changed[:, 6] += 1.0
    before, after = mixer(x), mixer(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert (before[:, 6:] - after[:, 6:]).abs().max() > 1e-4


def test_every_token_sees_the_whole_grid_through_the_four_scans(model):
    """Changing one corner patch changes the Mamba features of the opposite corner."""
    x = torch.rand(1, 3, 64, 64)
    changed = x.clone()
    changed[..., :16, :16] += 0.5
    with torch.no_grad():
        first, second = model.mamba(x)[0], model.mamba(changed)[0]
    assert (first[..., -1, -1] - second[..., -1, -1]).abs().max() > 1e-5


def test_rotary_positions_preserve_norms_and_encode_relative_offsets():
    torch.manual_seed(6)
    grid = (3, 5)
    x = torch.randn(1, 15, 16)
    rotated = rotary_2d(x, grid, 14)
    pairs = lambda t: torch.stack([t[..., :8], t[..., 8:16]], -1).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(rotated), pairs(x))
    torch.testing.assert_close(rotated[:, 0], x[:, 0])  # position (0, 0) is not rotated
    # the same vector at two positions: the dot product depends only on their offset
    v = torch.randn(16).expand(1, 15, 16)
    r = rotary_2d(v, grid, 14)[0].view(3, 5, 16)
    torch.testing.assert_close(r[0, 0] @ r[1, 2], r[1, 1] @ r[2, 3])


def test_resize_to_averages_exactly_when_shrinking_by_integer_factors():
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(resize_to(x, (2, 2)), F.avg_pool2d(x, 4))
    assert resize_to(x, (16, 12)).shape == (2, 3, 16, 12)


# -- timm's contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["afmnet_tiny", "afmnet_small", "afmnet_base"])
def test_variants_are_registered_with_a_pretrained_config(name):
    assert name in timm.list_models("afmnet*")
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.classifier == "head.fc" and cfg.input_size[0] == 3


def test_forward_equals_forward_head_of_forward_features(model):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features, 2, 2)
        torch.testing.assert_close(model(x), model.forward_head(features))
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model(x).shape == (2, 5)


def test_pooled_features_are_the_concatenated_mean_of_every_fused_level(model):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        levels = model.forward_intermediates(x, intermediates_only=True)
        pooled = model.head.global_pool(model.forward_features(x))
    torch.testing.assert_close(pooled, torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1))


def test_reset_classifier_and_num_classes_zero():
    torch.manual_seed(0)
    m = timm.create_model("afmnet_tiny", num_classes=5, **TINY).eval()
    x = torch.rand(2, 3, 64, 64)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.num_classes == 3 and m.get_classifier().out_features == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, m.head_hidden_size)
    m.reset_classifier(0, "")
    assert m(x).shape == (2, m.num_features, 2, 2)
    unpooled = timm.create_model("afmnet_tiny", num_classes=0, global_pool="", **TINY).eval()
    assert unpooled(x).ndim == 4


def test_features_only_gives_the_fused_pyramid_with_feature_info():
    m = timm.create_model("afmnet_tiny", features_only=True, **TINY).eval()
    assert m.feature_info.reduction() == [4, 8, 16, 32]
    assert m.feature_info.channels() == [8, 8, 8, 8]
    features = m(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 8, 16, 16), (2, 8, 8, 8), (2, 8, 4, 4), (2, 8, 2, 2)]
    some = timm.create_model("afmnet_tiny", features_only=True, out_indices=(0, 2), **TINY).eval()
    assert [f.shape[-1] for f in some(torch.rand(1, 3, 64, 64))] == [16, 4]
    assert len(some.model.fusion.levels) == 3  # the level after the last requested one is pruned


def test_other_input_channels_and_sizes():
    m = timm.create_model("afmnet_tiny", num_classes=4, in_chans=5, **TINY).eval()
    assert m(torch.rand(1, 5, 64, 64)).shape == (1, 4)
    assert m(torch.rand(1, 5, 96, 128)).shape == (1, 4)  # position embedding resampled


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    m = timm.create_model("afmnet_tiny", num_classes=3, drop_path_rate=0.0, **TINY)
    x = torch.rand(2, 3, 64, 64)
    m.train()
    m(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(m.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_no_weight_decay_names_real_parameters(model):
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names) and "mamba.pos_embed" in model.no_weight_decay()
    assert any(n.endswith("A_log") for n in model.no_weight_decay())


def test_inference_is_deterministic(model):
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_default_sizes_follow_the_official_code():
    with torch.device("meta"):
        base = timm.create_model("afmnet_base")
    assert base.mamba.patch_embed.out_channels == 192 and sum(len(s) for s in base.mamba.stages) == 10
    moe = base.head.moe
    assert (moe.num_experts, moe.top_k, moe.w_gate.shape[-1], moe.shared["up"].out_features) == (64, 6, 1408, 2 * 1408)
    assert math.isclose(base.fusion.levels[0].fuse.project[0].out_channels, 256)
