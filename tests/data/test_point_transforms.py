"""Point augmentations: geometry they must keep, what they must change, and the config list."""

import math

import pytest
import torch

from data.point_transforms import DEFAULT_TRAIN, Compose, ElasticDistortion, GridSample, SphereCrop, rotate_z


def scene(n: int = 600, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    normal = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return {
        "coord": torch.rand(n, 3, generator=g) * torch.tensor([4.0, 3.0, 2.5]),
        "color": torch.rand(n, 3, generator=g),
        "normal": normal,
        "segment": torch.arange(n) % 13,
    }


def test_rotation_about_z_keeps_distances_heights_and_turns_normals():
    s = scene()
    turned = rotate_z(s, 0.7)
    exact = "donot_use_mm_for_euclid_dist"
    torch.testing.assert_close(
        torch.cdist(turned["coord"], turned["coord"], compute_mode=exact), torch.cdist(s["coord"], s["coord"], compute_mode=exact), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(turned["coord"][:, 2], s["coord"][:, 2])
    c, si = math.cos(0.7), math.sin(0.7)
    torch.testing.assert_close(turned["normal"][:, 0], c * s["normal"][:, 0] - si * s["normal"][:, 1])


def test_grid_sample_keeps_one_labelled_point_per_voxel():
    s = scene(2000)
    out = GridSample(0.5)(s, torch.Generator().manual_seed(0))
    cells = torch.floor(out["coord"] / 0.5).long()
    assert len(torch.unique(cells, dim=0)) == len(cells) == len(torch.unique(torch.floor(s["coord"] / 0.5).long(), dim=0))
    # labels and colours travel with their points
    index = [int((s["coord"] == p).all(1).nonzero()[0]) for p in out["coord"][:20]]
    assert torch.equal(out["segment"][:20], s["segment"][index]) and torch.equal(out["color"][:20], s["color"][index])


def test_sphere_crop_keeps_the_nearest_points_to_one_centre():
    s = scene(1000)
    out = SphereCrop(300)(s, torch.Generator().manual_seed(1))
    assert len(out["coord"]) == 300
    kept = torch.zeros(len(s["coord"]), dtype=torch.bool)
    kept[[int((s["coord"] == q).all(1).nonzero()[0]) for q in out["coord"]]] = True
    # some kept point is the centre: every kept point is nearer to it than any dropped point
    distance = torch.cdist(out["coord"], s["coord"])
    assert ((distance[:, kept].max(1).values <= distance[:, ~kept].min(1).values)).any()


def test_elastic_distortion_is_smooth_and_bounded():
    s = scene(3000)
    out = ElasticDistortion([[0.2, 0.05]], p=1.0)(s, torch.Generator().manual_seed(2))
    moved = out["coord"] - s["coord"]
    assert 0.001 < float(moved.norm(dim=1).mean()) < 0.2
    # nearby points move alike, far points do not: displacement is a smooth field
    distance = torch.cdist(s["coord"], s["coord"])
    near = (distance < 0.05) & (distance > 0)
    far = distance > 1.5
    difference = torch.cdist(moved, moved)
    assert float(difference[near].mean()) < 0.5 * float(difference[far].mean())


def test_same_generator_seed_gives_the_same_augmentation():
    pipeline = Compose(DEFAULT_TRAIN + [{"name": "elastic_distortion"}, {"name": "chromatic_jitter"}])
    a = pipeline(scene(), torch.Generator().manual_seed(5))
    b = pipeline(scene(), torch.Generator().manual_seed(5))
    c = pipeline(scene(), torch.Generator().manual_seed(6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["color"], c["color"]) or not torch.equal(a["coord"], c["coord"])


@pytest.mark.parametrize(
    "spec,message",
    [({"name": "random_twist"}, "unknown point transform 'random_twist'"), ({"name": "random_scale", "lo": 1}, "random_scale")],
)
def test_bad_pipeline_entries_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        Compose([spec])
