"""IAGC network, losses, metric protocol and baselines on tiny inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from tasks.low_light import (
    IAGCNet,
    LocalGlobalAttention,
    LowLightEnhancement,
    clahe_baseline,
    global_gamma_baseline,
    luminance,
)

TINY = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 1), window_size=4, gamma_width=4, gamma_thumbnail=16)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return IAGCNet(**TINY)


@pytest.mark.parametrize("shape", [(1, 3, 5, 3), (2, 3, 37, 51), (1, 3, 64, 64), (1, 3, 1, 17)])
def test_any_input_size_including_odd_sizes(net, shape):
    out = net(torch.rand(shape))
    assert out["output"].shape == shape
    assert out["gamma_local"].shape == shape
    assert out["gamma_global"].shape == (shape[0], 1, 1, 1)
    assert torch.isfinite(out["output"]).all()


def test_gradients_reach_both_gamma_heads(net):
    # the local head's last layer starts at zero (so training starts from the global gamma);
    # give it small weights so that every layer of both heads is on the gradient path
    torch.nn.init.normal_(net.local_gamma.body[-1].weight, std=0.01)
    net(torch.rand(2, 3, 24, 24))["output"].sum().backward()
    for head in (net.global_gamma, net.local_gamma):
        for name, parameter in head.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_zero_initialised_local_head_starts_from_the_global_gamma(net):
    out = net(torch.rand(2, 3, 16, 16))
    torch.testing.assert_close(out["gamma_local"], out["gamma_global"].expand_as(out["gamma_local"]))


def test_global_gamma_stays_in_its_range(net):
    gamma = net.global_gamma(torch.rand(4, 3, 30, 30) * 0.05)
    assert ((gamma >= 0.1) & (gamma <= 1.5)).all()


def _naive_window_attention(attention: LocalGlobalAttention, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-window softmax attention plus the window-token attention, one window at a time."""
    b, h, w, c = x.shape
    ws, heads = attention.window_size, attention.num_heads
    d = c // heads
    out = torch.zeros_like(x)
    windows = [(i, j) for i in range(0, h, ws) for j in range(0, w, ws)]
    tokens = torch.stack([x[:, i : i + ws, j : j + ws].reshape(b, -1, c).mean(1) for i, j in windows], 1)
    gq, gk, gv = attention.global_qkv(tokens).split(c, dim=-1)
    context = torch.zeros(b, c, h // ws, w // ws)
    for n, (i, j) in enumerate(windows):
        pixels = x[:, i : i + ws, j : j + ws].reshape(b, -1, c)
        q, k, v = attention.qkv(pixels).split(c, dim=-1)
        local, glob = [], []
        for head in range(heads):
            s = slice(head * d, (head + 1) * d)
            local.append(torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d), -1) @ v[..., s])
            weights = torch.softmax(gq[:, n : n + 1, s] @ gk[..., s].transpose(1, 2) / math.sqrt(d), -1)
            glob.append(weights @ gv[..., s])
        out[:, i : i + ws, j : j + ws] = attention.proj(torch.cat(local, -1)).view(b, ws, ws, c)
        context[:, :, i // ws, j // ws] = attention.global_proj(torch.cat(glob, -1))[:, 0]
    # each window's context sits at the window centre and is interpolated bilinearly in between
    return out + _bilinear(context, h, w).permute(0, 2, 3, 1)


def _bilinear(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Half-pixel-centred bilinear upsampling written out (edge values held), as a reference."""
    gh, gw = grid.shape[-2:]
    ys = ((torch.arange(h) + 0.5) * gh / h - 0.5).clamp(0, gh - 1)
    xs = ((torch.arange(w) + 0.5) * gw / w - 0.5).clamp(0, gw - 1)
    y0, x0 = ys.floor().long(), xs.floor().long()
    y1, x1 = (y0 + 1).clamp(max=gh - 1), (x0 + 1).clamp(max=gw - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[..., y0, :][..., x0] * (1 - wx) + grid[..., y0, :][..., x1] * wx
    bottom = grid[..., y1, :][..., x0] * (1 - wx) + grid[..., y1, :][..., x1] * wx
    return top * (1 - wy) + bottom * wy


def test_local_global_attention_matches_naive_per_window_reference():
    torch.manual_seed(1)
    attention = LocalGlobalAttention(dim=8, num_heads=2, window_size=4)
    x = torch.randn(2, 8, 12, 8)
    torch.testing.assert_close(attention(x), _naive_window_attention(attention, x), atol=1e-5, rtol=1e-5)


def test_global_context_varies_smoothly_across_window_borders():
    # the window grid must not print onto the image: with the local level off, the step
    # between two pixels across a window border is no larger than between neighbours inside
    torch.manual_seed(3)
    attention = LocalGlobalAttention(dim=8, num_heads=1, window_size=4)
    with torch.no_grad():
        attention.proj.weight.zero_()
        attention.proj.bias.zero_()
    out = attention(torch.randn(1, 16, 16, 8))[0]
    steps = (out[:, 1:] - out[:, :-1]).abs().amax(dim=(0, 2))  # per column boundary
    inside, across = steps[[0, 4, 8, 12]], steps[[3, 7, 11]]  # border columns 3|4, 7|8, 11|12
    assert across.max() <= 2 * inside.max() + 1e-6


def test_gamma_loss_makes_the_gamma_stage_brighten_a_dark_image():
    torch.manual_seed(0)
    task = LowLightEnhancement(**TINY, gamma_weight=1.0)
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    target = torch.rand(2, 3, 32, 32) * 0.5 + 0.3
    batch = {"image": target**2.5, "target": target}  # darkened by gamma 2.5
    for _ in range(40):
        optimizer.zero_grad()
        task.training_step(batch, 0).backward()
        optimizer.step()
    out = task.network(batch["image"])
    assert out["gamma_global"].max() < 0.7  # brightening, towards 1 / 2.5
    assert F.l1_loss(out["corrected"], target) < 0.5 * F.l1_loss(batch["image"], target)


def test_every_pixel_sees_the_whole_image_only_through_the_global_level():
    torch.manual_seed(2)
    attention = LocalGlobalAttention(dim=8, num_heads=1, window_size=4)
    x = torch.randn(1, 16, 16, 8)
    far = x.clone()
    far[0, 15, 15] += 5.0  # a pixel in the opposite corner window
    assert (attention(x)[0, 0, 0] - attention(far)[0, 0, 0]).abs().max() > 1e-4
    with torch.no_grad():
        attention.global_proj.weight.zero_()
        attention.global_proj.bias.zero_()
    torch.testing.assert_close(attention(x)[0, :4, :4], attention(far)[0, :4, :4])


def test_training_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    task = LowLightEnhancement(**TINY, lr=3e-3)
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    target = torch.rand(2, 3, 32, 32)
    batch = {"image": target * 0.1, "target": target}
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        out = task.network(batch["image"])["output"]
        loss = F.l1_loss(out, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_psnr_metric_is_the_mean_of_per_image_psnr():
    task = LowLightEnhancement(**TINY)
    metrics = task.configure_metrics()
    target = torch.zeros(2, 3, 16, 16)
    prediction = target.clone()
    prediction[0] += 0.1  # MSE 0.01 -> 20 dB
    prediction[1] += 0.01  # MSE 1e-4 -> 40 dB
    metrics.update(prediction, target)
    assert metrics.compute()["psnr"].item() == pytest.approx(30.0, abs=1e-3)


def test_global_gamma_baseline_maps_a_uniform_grey_to_one_half():
    image = torch.full((2, 3, 8, 8), 0.04)
    image[1] = 0.2
    torch.testing.assert_close(luminance(global_gamma_baseline(image)), torch.full((2, 8, 8), 0.5))


def test_global_gamma_baseline_brightens_every_pixel_of_a_dark_image():
    image = torch.rand(2, 3, 32, 32) ** 3 * 0.2
    assert (global_gamma_baseline(image) >= image).all()


def test_clahe_baseline_keeps_shape_and_range_and_raises_contrast():
    image = torch.rand(1, 3, 40, 48) * 0.1
    out = clahe_baseline(image)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    assert luminance(out).std() > luminance(image).std()


def test_baselines_are_named_as_in_the_issue():
    assert set(LowLightEnhancement(**TINY).baselines()) == {"dark input", "global gamma", "CLAHE"}
