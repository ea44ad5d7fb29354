"""The built-in low-light set: the camera model, determinism, layout and atomic generation."""

import numpy as np
import pytest

from data.base import build_once, cache_root
from data.builtin_low_light import build_builtin_lol, darken, srgb_to_linear
from data.lol import LowLightDataModule, discover_splits, find_pairs


def test_darken_is_darker_noisy_and_deterministic():
    rng = np.random.default_rng(0)
    reference = np.full((64, 64, 3), 180, np.uint8)
    dark = darken(reference, np.random.default_rng(1))
    assert dark.dtype == np.uint8 and dark.shape == reference.shape
    assert dark.mean() < 0.6 * reference.mean()
    assert dark.std() > 0  # sensor noise on a flat grey
    np.testing.assert_array_equal(dark, darken(reference, np.random.default_rng(1)))
    assert not np.array_equal(dark, darken(reference, rng))


def test_srgb_linearisation_is_monotone_and_fixes_the_ends():
    v = np.linspace(0, 1, 101)
    lin = srgb_to_linear(v)
    assert lin[0] == 0 and lin[-1] == pytest.approx(1.0) and np.all(np.diff(lin) > 0)


def test_builtin_set_is_written_in_lol_v1_layout_and_read_by_the_loader():
    root = build_builtin_lol(train_images=6, test_variants=1, crop=64)
    layout, splits = discover_splits(root)
    assert layout == "lol_v1"
    assert len(find_pairs(splits["train"])) == 6
    assert [low.stem for low, _ in find_pairs(splits["test"])] == ["chelsea_1", "coffee_1", "rocket_1"]
    assert build_builtin_lol(train_images=6, test_variants=1, crop=64) == root  # generated once
    dm = LowLightDataModule(builtin_train_images=6, builtin_test_variants=1, builtin_crop=64)
    dm.prepare_data()
    dm.setup("test")
    assert dm.dataset_name.startswith("built-in")
    assert [tuple(b["image"].shape) for b in dm.test_dataloader()] == [(1, 3, 300, 451), (1, 3, 400, 600), (1, 3, 400, 600)]


def test_interrupted_generation_leaves_nothing_behind():
    def writer(folder):
        (folder / "half.txt").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_once("broken", {"a": 1}, writer)
    assert not [p for p in cache_root().iterdir() if "broken" in p.name]
