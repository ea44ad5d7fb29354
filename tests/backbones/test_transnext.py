"""TransNeXt: aggregated attention against a naive per-pixel reference, timm's model contract,
official checkpoint names, any resolution, ONNX. Tiny variants wherever the size is not the point."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F

import backbones  # noqa: F401  (registers the models)
from backbones import transnext
from backbones.transnext import AggregatedAttention, Attention, checkpoint_filter_fn, stage_geometry

TINY = "transnext_test"


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every zero- or near-zero-initialised parameter a real value, so every path matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(key in name for key in ("learnable_bias", "relative_pos_bias_local", "cpb_fc2", "query_embedding")):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif name.endswith("temperature"):
                p.copy_(torch.randn(p.shape, generator=generator))
    return module


# -- aggregated attention against an explicit per-pixel reference -----------------------------


def cpb_bias(attn, dy: float, dx: float, pretrain: tuple[int, int]) -> torch.Tensor:
    """The paper's continuous position bias for one offset, computed directly: (heads,)."""
    coords = torch.tensor([dy * 8 / (pretrain[0] - 1), dx * 8 / (pretrain[1] - 1)])
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / math.log2(8)
    return attn.cpb_fc2(torch.relu(attn.cpb_fc1(coords)))


def naive_aggregated_attention(attn, x, pooled_size, pretrain) -> torch.Tensor:
    """Each pixel's in-image neighbours gathered one by one, one softmax over them and the pooled keys."""
    batch, height, width, channels = x.shape
    heads, head_dim, radius = attn.num_heads, attn.head_dim, attn.window_size // 2
    query = F.normalize(attn.q(x).view(batch, height, width, heads, head_dim), dim=-1)
    key, value = attn.kv(x).view(batch, height, width, 2, heads, head_dim).unbind(3)
    key = F.normalize(key, dim=-1)
    pooled = F.adaptive_avg_pool2d(F.gelu(attn.sr(x)).permute(0, 3, 1, 2), pooled_size).flatten(2).transpose(1, 2)
    pooled = F.layer_norm(pooled, (channels,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    key_pool, value_pool = attn.kv(pooled).view(batch, -1, 2, heads, head_dim).unbind(2)
    key_pool = F.normalize(key_pool, dim=-1)
    centres_h = F.adaptive_avg_pool1d(torch.arange(height, dtype=torch.float32)[None], pooled_size[0])[0]
    centres_w = F.adaptive_avg_pool1d(torch.arange(width, dtype=torch.float32)[None], pooled_size[1])[0]
    pooled_count = pooled_size[0] * pooled_size[1]
    temperature = F.softplus(attn.temperature).view(heads, 1)
    embedding = attn.query_embedding.view(heads, head_dim)
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]
    out = torch.zeros(batch, height, width, heads, head_dim)
    for i in range(height):
        for j in range(width):
            window = [(i + dy, j + dx, o) for o, (dy, dx) in enumerate(offsets) if 0 <= i + dy < height and 0 <= j + dx < width]
            scaled = (query[:, i, j] + embedding) * temperature * math.log(len(window) + pooled_count)
            logits = [(scaled * key[:, y, z]).sum(-1) + attn.relative_pos_bias_local[:, o] for y, z, o in window]
            for a in range(pooled_size[0]):
                for b in range(pooled_size[1]):
                    bias = cpb_bias(attn, i - centres_h[a].item(), j - centres_w[b].item(), pretrain)
                    logits.append((scaled * key_pool[:, a * pooled_size[1] + b]).sum(-1) + bias)
            probs = torch.stack(logits, dim=-1).softmax(dim=-1)  # (B, heads, |window| + P)
            for n, (y, z, o) in enumerate(window):
                tokens = (query[:, i, j] * attn.learnable_tokens[:, :, o]).sum(-1) + attn.learnable_bias[:, 0, o]
                out[:, i, j] += (probs[..., n] + tokens)[..., None] * value[:, y, z]
            out[:, i, j] += torch.einsum("bnp,bpnd->bnd", probs[..., len(window) :], value_pool)
    return attn.proj(out.view(batch, height, width, channels))


@pytest.mark.parametrize(
    "size, pooled, window",
    [((5, 7), (2, 3), 3), ((4, 4), (4, 4), 3), ((6, 5), (3, 2), 5), ((1, 6), (1, 3), 3)],
    ids=["odd-map-uneven-bins", "pool-equals-map", "window-5", "single-row"],
)
def test_sliding_window_matches_naive_gather_at_borders(size, pooled, window):
    torch.manual_seed(0)
    attn = randomise(AggregatedAttention(dim=12, num_heads=2, window_size=window)).eval()
    x = torch.randn(2, *size, 12)
    pretrain = (9, 11)
    geometry = stage_geometry(*size, pooled, pretrain, window, x.device)
    with torch.no_grad():
        expected = naive_aggregated_attention(attn, x, pooled, pretrain)
        torch.testing.assert_close(attn(x, geometry), expected, atol=2e-5, rtol=0)


def test_aggregated_softmax_sums_to_one_over_both_key_sets():
    torch.manual_seed(0)
    attn = randomise(AggregatedAttention(dim=12, num_heads=2)).eval()
    x = torch.randn(2, 5, 6, 12)
    geometry = stage_geometry(5, 6, (2, 2), (8, 8), 3, x.device)
    with torch.no_grad():
        probs = attn.logits(x, geometry)[0].softmax(dim=-1)
    local, pool = probs[..., :9], probs[..., 9:]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 30))
    # normalised jointly, not per set: each set alone holds only part of the mass
    assert (local.sum(-1) < 1).all() and (pool.sum(-1) < 1).all() and (local.sum(-1) > 0).all()
    # a corner pixel sees 4 of its 9 neighbours; the off-image ones get exactly zero weight
    corner = local[:, :, 0].view(2, 2, 3, 3)
    assert (corner[..., 0, :] == 0).all() and (corner[..., :, 0] == 0).all() and (corner[..., 1:, 1:] > 0).all()


def naive_attention(attn, x, pretrain) -> torch.Tensor:
    """Plain multi-head attention with the length-scaled cosine similarity and the bias MLP."""
    batch, height, width, channels = x.shape
    heads, head_dim, tokens = attn.num_heads, attn.head_dim, height * width
    query, key, value = attn.qkv(x).view(batch, tokens, 3, heads, head_dim).unbind(2)
    scale = F.softplus(attn.temperature).view(heads, 1) * math.log(tokens)
    scaled = (F.normalize(query, dim=-1) + attn.query_embedding.view(heads, head_dim)) * scale
    logits = torch.einsum("bqnd,bknd->bnqk", scaled, F.normalize(key, dim=-1))
    positions = [(i, j) for i in range(height) for j in range(width)]
    bias = torch.stack(
        [torch.stack([cpb_bias(attn, qi - ki, qj - kj, pretrain) for ki, kj in positions], -1) for qi, qj in positions], -2
    )
    out = torch.einsum("bnqk,bknd->bqnd", (logits + bias).softmax(-1), value)
    return attn.proj(out.reshape(batch, height, width, channels))


def test_last_stage_attention_matches_naive_reference():
    torch.manual_seed(0)
    attn = randomise(Attention(dim=12, num_heads=3)).eval()
    x = torch.randn(2, 3, 4, 12)
    geometry = stage_geometry(3, 4, (3, 4), (5, 5), None, x.device)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, geometry), naive_attention(attn, x, (5, 5)), atol=2e-5, rtol=0)


@pytest.mark.parametrize("length, pooled", [(56, 7), (28, 7), (14, 7), (7, 7), (64, 7), (10, 7), (13, 4), (2, 2), (1, 1)])
def test_export_path_offsets_equal_the_exactly_deduplicated_ones(length, pooled, monkeypatch):
    """While tracing for export the offsets are a static-shape superset; the biases must agree."""
    exact_values, exact_index = transnext.pooled_axis_offsets(length, pooled, torch.device("cpu"))
    monkeypatch.setattr(transnext, "_tracing", lambda: True)
    dense_values, dense_index = transnext.pooled_axis_offsets(length, pooled, torch.device("cpu"))
    assert len(dense_values) >= len(exact_values)
    torch.testing.assert_close(dense_values[dense_index], exact_values[exact_index], rtol=0, atol=0)
    centres = F.adaptive_avg_pool1d(torch.arange(length, dtype=torch.float32)[None], pooled)[0]
    torch.testing.assert_close(exact_values[exact_index], torch.arange(length)[:, None] - centres[None, :])


# -- the four variants --------------------------------------------------------------------------


@pytest.mark.parametrize("name, paper_millions", [("micro", 12.8), ("tiny", 28.2), ("small", 49.7), ("base", 89.7)])
def test_parameter_counts_match_the_paper(name, paper_millions, monkeypatch):
    monkeypatch.setattr(transnext, "trunc_normal_", lambda tensor, **kwargs: tensor)  # slow on meta tensors
    with torch.device("meta"):
        model = timm.create_model(f"transnext_{name}")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - paper_millions) / paper_millions < 0.01, count


# -- timm's contract (as timm's tests check it) --------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomise(timm.create_model(TINY)).eval()


def test_forward_features_is_unpooled_at_the_configured_pool_size(tiny):
    cfg = tiny.pretrained_cfg
    x = torch.randn(2, *cfg["input_size"])
    with torch.no_grad():
        features = tiny.forward_features(x)
        assert features.shape == (2, tiny.num_features, *cfg["pool_size"])
        torch.testing.assert_close(tiny(x), tiny.forward_head(features))
        assert tiny.forward_head(features, pre_logits=True).shape == (2, tiny.head_hidden_size)
    state = tiny.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert tiny.get_classifier() is tiny.head.fc


def test_reset_classifier_and_global_pool():
    model = timm.create_model(TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, model.num_features, 2, 2)
    model.reset_classifier(7, "avg")
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    unpooled = timm.create_model(TINY, num_classes=0, global_pool="")
    assert unpooled(x).shape == (2, unpooled.num_features, 2, 2)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3)])
def test_features_only_gives_strides_4_8_16_32(out_indices):
    model = timm.create_model(TINY, features_only=True, out_indices=out_indices).eval()
    strides = [4, 8, 16, 32]
    assert model.feature_info.reduction() == [strides[i] for i in out_indices]
    channels = model.feature_info.channels()
    features = model(torch.randn(2, 3, 96, 128))
    assert [f.shape for f in features] == [(2, c, 96 // strides[i], 128 // strides[i]) for c, i in zip(channels, out_indices)]


def test_forward_intermediates_equal_features_only(tiny):
    x = torch.randn(1, 3, 64, 80)
    features = timm.create_model(TINY, features_only=True)
    stages = {name.replace("stages.", "stages_", 1): v for name, v in tiny.state_dict().items() if name.startswith("stages.")}
    features.load_state_dict(stages, strict=True)
    with torch.no_grad():
        expected = features.eval()(x)
        final, intermediates = tiny.forward_intermediates(x)
        assert len(intermediates) == 4
        for a, b in zip(intermediates, expected):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(final, tiny.forward_features(x))


def test_gradients_reach_every_parameter_with_and_without_checkpointing():
    torch.manual_seed(0)
    model = randomise(timm.create_model(TINY, num_classes=5, drop_path_rate=0.1)).train()
    x = torch.randn(2, 3, 48, 72)
    torch.manual_seed(1)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    torch.manual_seed(1)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)


def test_one_input_channel():
    model = timm.create_model(TINY, in_chans=1).eval()
    assert model.stages[0].patch_embed.proj.in_channels == 1
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_any_resolution_without_rebuilding(tiny):
    sizes = [(64, 64), (256 // 4, 320 // 4), (96, 96), (33, 71), (40, 130)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = tiny(x)
        for size in sizes:
            features = tiny.forward_features(torch.randn(2, 3, *size))
            assert features.shape == (2, tiny.num_features, math.ceil(size[0] / 32), math.ceil(size[1] / 32))
            assert torch.isfinite(features).all()
        torch.testing.assert_close(tiny(x), before)  # nothing about the first size was cached


def test_transnext_micro_at_256_by_320_and_384():
    model = timm.create_model("transnext_micro", features_only=True).eval()
    with torch.no_grad():
        for size in [(256, 320), (384, 384)]:
            features = model(torch.randn(1, 3, *size))
            assert [f.shape[-2:] for f in features] == [(size[0] // s, size[1] // s) for s in (4, 8, 16, 32)]


def test_bfloat16_autocast_on_cpu(tiny):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(torch.randn(2, 3, 64, 48))
    assert torch.isfinite(out.float()).all()


# -- official checkpoints ------------------------------------------------------------------------


def official_state_dict(embed_dims, depths, num_heads, mlp_ratios, in_chans=3, num_classes=10, seed=0) -> dict:
    """A state dict with the official repository's key names and shapes (random values)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {}
    previous = in_chans
    for i, (dim, depth, heads, ratio) in enumerate(zip(embed_dims, depths, num_heads, mlp_ratios), start=1):
        kernel, head_dim, hidden = (7 if i == 1 else 3), dim // heads, int(2 * int(dim * ratio) / 3)
        shapes[f"patch_embed{i}.proj.weight"] = (dim, previous, kernel, kernel)
        for name in ("patch_embed{}.proj.bias", "patch_embed{}.norm.weight", "patch_embed{}.norm.bias", "norm{}.weight", "norm{}.bias"):
            shapes[name.format(i)] = (dim,)
        for j in range(depth):
            block = f"block{i}.{j}."
            shapes.update({block + n: (dim,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")})
            attn = block + "attn."
            shapes.update({attn + "temperature": (heads, 1, 1), attn + "query_embedding": (heads, 1, head_dim)})
            shapes.update({attn + "cpb_fc1.weight": (512, 2), attn + "cpb_fc1.bias": (512,)})
            shapes.update({attn + "cpb_fc2.weight": (heads, 512), attn + "cpb_fc2.bias": (heads,)})
            shapes.update({attn + "proj.weight": (dim, dim), attn + "proj.bias": (dim,)})
            if i < 4:
                shapes.update({attn + "q.weight": (dim, dim), attn + "q.bias": (dim,)})
                shapes.update({attn + "kv.weight": (2 * dim, dim), attn + "kv.bias": (2 * dim,)})
                shapes.update({attn + "sr.weight": (dim, dim, 1, 1), attn + "sr.bias": (dim,)})
                shapes.update({attn + "norm.weight": (dim,), attn + "norm.bias": (dim,)})
                shapes.update({attn + "relative_pos_bias_local": (heads, 9), attn + "learnable_bias": (heads, 1, 9)})
                shapes[attn + "learnable_tokens"] = (heads, head_dim, 9)
            else:
                shapes.update({attn + "qkv.weight": (3 * dim, dim), attn + "qkv.bias": (3 * dim,)})
            mlp = block + "mlp."
            shapes.update({mlp + "fc1.weight": (2 * hidden, dim), mlp + "fc1.bias": (2 * hidden,)})
            shapes.update({mlp + "dwconv.dwconv.weight": (hidden, 1, 3, 3), mlp + "dwconv.dwconv.bias": (hidden,)})
            shapes.update({mlp + "fc2.weight": (dim, hidden), mlp + "fc2.bias": (dim,)})
        previous = dim
    shapes.update({"head.weight": (num_classes, previous), "head.bias": (num_classes,)})
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


TINY_ARCH = dict(embed_dims=(16, 24, 32, 48), depths=(1, 1, 2, 1), num_heads=(2, 2, 2, 4), mlp_ratios=(2, 2, 2, 2))


def test_official_state_dict_loads_strictly_through_the_filter():
    official = official_state_dict(**TINY_ARCH)
    model = timm.create_model(TINY)
    model.load_state_dict(checkpoint_filter_fn({"model": official}, model), strict=True)
    state = model.state_dict()
    torch.testing.assert_close(state["head.fc.weight"], official["head.weight"])
    torch.testing.assert_close(state["stages.2.blocks.1.attn.sr.weight"], official["block3.1.attn.sr.weight"].flatten(1))
    torch.testing.assert_close(state["stages.3.blocks.0.mlp.dwconv.weight"], official["block4.0.mlp.dwconv.dwconv.weight"])
    torch.testing.assert_close(state["stages.0.patch_embed.proj.weight"], official["patch_embed1.proj.weight"])
    # a state dict already in this layout passes through unchanged
    assert checkpoint_filter_fn(state, model) is state


def test_official_micro_key_set_maps_onto_transnext_micro(monkeypatch):
    monkeypatch.setattr(transnext, "trunc_normal_", lambda tensor, **kwargs: tensor)  # slow on meta tensors
    official = official_state_dict((48, 96, 192, 384), (2, 2, 15, 2), (2, 4, 8, 16), (8, 8, 4, 4), num_classes=1000)
    with torch.device("meta"):
        model = timm.create_model("transnext_micro")
    mapped = checkpoint_filter_fn(official, model)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert {name: tuple(v.shape) for name, v in mapped.items()} == expected


def test_pretrained_loads_a_local_official_file_with_head_and_channel_adaptation(tmp_path):
    path = tmp_path / "transnext_official.pth"
    official = official_state_dict(**TINY_ARCH)
    torch.save({"model": official}, path)
    model = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.state_dict()["head.fc.weight"], official["head.weight"])
    adapted = timm.create_model(TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), num_classes=3, in_chans=1)
    first = adapted.stages[0].patch_embed.proj.weight
    torch.testing.assert_close(first, official["patch_embed1.proj.weight"].sum(1, keepdim=True))
    assert adapted.head.fc.out_features == 3
    torch.testing.assert_close(adapted.stages[3].norm.weight, official["norm4.weight"])


def test_every_2d_task_encoder_starts_from_a_local_file_named_in_its_config(tmp_path):
    from tasks.echo_uda.segmentor import FPNSegmentor
    from tasks.low_light import GlobalGammaEstimator
    from tasks.medical_segmentation.network import SegmentationNetwork
    from tasks.scene_classification import SceneClassifier

    path = tmp_path / "transnext_official.pth"
    official = official_state_dict(**TINY_ARCH)
    torch.save({"model": official}, path)
    kwargs = {"weights": str(path)}
    encoders = {
        "low light": GlobalGammaEstimator(backbone=TINY, backbone_kwargs=kwargs).encoder,
        "scene": SceneClassifier(5, TINY, kwargs).backbone,
        "medical": SegmentationNetwork(TINY, kwargs, decoder="unet", num_classes=3).encoder,
        "echo": FPNSegmentor(3, TINY, kwargs).encoder,
    }
    for name, encoder in encoders.items():
        state = encoder.state_dict()
        weight = state[next(key for key in state if re.search(r"stages[._]2\.blocks\.1\.attn\.sr\.weight$", key))]
        torch.testing.assert_close(weight, official["block3.1.attn.sr.weight"].flatten(1), msg=name)
    with pytest.raises(FileNotFoundError, match="nowhere.pth: backbone weights file for 'transnext_test' does not exist"):
        SceneClassifier(5, TINY, {"weights": str(tmp_path / "nowhere.pth")})


def test_pretrained_without_a_local_file_says_where_to_get_one():
    with pytest.raises(RuntimeError, match=re.escape("pretrained_cfg_overlay=dict(file=")) as error:
        timm.create_model("transnext_tiny", pretrained=True)
    assert "huggingface.co/DaiShiResearch/transnext-tiny-224-1k" in str(error.value)
    assert "nothing is downloaded" in str(error.value)


# -- ONNX ----------------------------------------------------------------------------------------


def test_onnx_export_runs_in_onnxruntime_at_two_resolutions(tmp_path):
    """One export with dynamic batch, height and width, checked at two other sizes.

    Two stages (aggregated attention, then plain attention) hold every operation of the four-stage
    model; each extra stage only lengthens the exporter's symbolic shape reasoning (minutes on CPU).
    """
    torch.manual_seed(0)
    two_stages = dict(embed_dims=(16, 32), depths=(1, 1), num_heads=(2, 2), mlp_ratios=(2, 2), sr_ratios=(8, 1))
    model = randomise(timm.create_model(TINY, **two_stages)).eval()
    height, width = torch.export.Dim("height", min=16, max=4096), torch.export.Dim("width", min=16, max=4096)
    path = tmp_path / "transnext.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(2, 3, 64, 64),),
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch"), 2: height, 3: width}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    assert [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(3, 3, 96, 128), (1, 3, 75, 45)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        (out,) = session.run(None, {"image": x.numpy()})
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
