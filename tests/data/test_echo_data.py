"""Echo loaders on tiny fixtures written here: CardiacUDA (NIfTI), CAMUS (NIfTI and MetaImage),
EchoNet-Dynamic (AVI + CSVs), the UDA datamodule, and the built-in two-site generator."""

import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import skimage.draw
import torch

from data.builtin_echo import SITES, _heart, render_video
from data.camus import discover_camus, read_mhd
from data.cardiac_uda import discover_cardiac_uda, fill_outlines
from data.echo_uda import EchoUDADataModule, assign_splits
from data.echo_video import clip_indices
from data.echonet import discover_echonet
from data.errors import (
    DatasetNotFoundError,
    LabelRangeError,
    LayoutError,
    MissingPairError,
    ShapeMismatchError,
    UnreadableFileError,
)

# -- fixture writers -------------------------------------------------------------------------------


def _video(frames=6, height=20, width=24, seed=0):
    """Frames (T, H, W) uint8 and labels with an LV block (1) and an LA block (2)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (frames, height, width), dtype=np.uint8)
    labels = np.zeros((frames, height, width), np.uint8)
    labels[:, 2:8, 3:10] = 1
    labels[:, 12:16, 3:10] = 2
    return images, labels


def write_cardiac_uda(root: Path, sites=("Site_G_100", "Site_R_126"), videos=4, frames=6, unlabelled=()) -> Path:
    for s, site in enumerate(sites):
        (root / site).mkdir(parents=True, exist_ok=True)
        for i in range(videos):
            images, labels = _video(frames, seed=10 * s + i)
            labels[1::2] = 0  # only every other frame annotated
            stem = root / site / f"patient{i + 1}-4"
            nib.save(nib.Nifti1Image(np.moveaxis(images, 0, -1), np.eye(4)), f"{stem}_image.nii.gz")
            if (site, i) not in unlabelled:
                nib.save(nib.Nifti1Image(np.moveaxis(labels, 0, -1), np.eye(4)), f"{stem}_label.nii.gz")
        other = _video(frames)[0]  # a view-1 video, to be skipped for view 4
        nib.save(nib.Nifti1Image(np.moveaxis(other, 0, -1), np.eye(4)), str(root / site / "patient9-1_image.nii.gz"))
    return root


def write_mhd(path: Path, array: np.ndarray, compressed: bool = False) -> None:
    """A MetaImage pair (header + raw), array in (z, y, x) order."""
    data = array.astype(np.uint8).tobytes()
    if compressed:
        data = zlib.compress(data)
    dims = " ".join(str(d) for d in array.shape[::-1])
    raw = path.with_suffix(".zraw" if compressed else ".raw")
    raw.write_bytes(data)
    header = [
        "ObjectType = Image", f"NDims = {array.ndim}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compressed}", f"DimSize = {dims}", "ElementType = MET_UCHAR", f"ElementDataFile = {raw.name}",
    ]  # fmt: skip
    path.write_text("\n".join(header) + "\n")


def write_camus_mhd(root: Path, patients=4, frames=5) -> Path:
    for p in range(patients):
        folder = root / "training" / f"patient{p + 1:04d}"
        folder.mkdir(parents=True)
        images, labels = _video(frames, seed=p)
        labels[labels == 2] = 3  # CAMUS: LA is 3
        name = folder.name
        write_mhd(folder / f"{name}_4CH_sequence.mhd", images, compressed=p % 2 == 1)
        write_mhd(folder / f"{name}_4CH_ED.mhd", images[:1])
        write_mhd(folder / f"{name}_4CH_ED_gt.mhd", labels[:1])
        write_mhd(folder / f"{name}_4CH_ES.mhd", images[-2:-1])
        write_mhd(folder / f"{name}_4CH_ES_gt.mhd", labels[-2:-1])
        (folder / "Info_4CH.cfg").write_text(f"ED: 1\nES: {frames - 1}\nNbFrame: {frames}\n")
    return root


def write_camus_nifti(root: Path, patients=6, frames=5) -> Path:
    for p in range(patients):
        folder = root / "database_nifti" / f"patient{p + 1:04d}"
        folder.mkdir(parents=True)
        images, labels = _video(frames, seed=p)
        labels[labels == 2] = 3
        for part, volume in (("half_sequence", images), ("half_sequence_gt", labels)):
            # stored (x, y, t), as the release is
            nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), str(folder / f"{folder.name}_4CH_{part}.nii.gz"))
    (root / "database_split").mkdir()
    for split, members in (("training", [1, 2, 3, 4]), ("validation", [5]), ("testing", [6])):
        (root / "database_split" / f"subgroup_{split}.txt").write_text("\n".join(f"patient{m:04d}" for m in members) + "\n")
    return root


def write_avi(path: Path, frames: np.ndarray) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 50, (frames.shape[2], frames.shape[1]))
    for frame in frames:
        writer.write(np.repeat(frame[..., None], 3, axis=2))
    writer.release()


def write_echonet(root: Path, names=("0XAAA", "0XBBB", "0XCCC", "0XDDD"), frames=8, size=32) -> Path:
    (root / "Videos").mkdir(parents=True)
    rows = ["FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split"]
    tracings = ["FileName,X1,Y1,X2,Y2,Frame"]
    splits = ["TRAIN", "TRAIN", "VAL", "TEST"]
    for i, name in enumerate(names):
        write_avi(root / "Videos" / f"{name}.avi", np.full((frames, size, size), 40 * (i + 1), np.uint8))
        rows.append(f"{name},60,30,70,{size},{size},50,{frames},{splits[i % 4]}")
        for frame in (1, 5):  # long axis, then three chords
            tracings += [f"{name}.avi,16,4,16,28,{frame}", f"{name}.avi,8,8,24,8,{frame}", f"{name}.avi,8,16,24,16,{frame}", f"{name}.avi,10,24,22,24,{frame}"]
    (root / "FileList.csv").write_text("\n".join(rows) + "\n")
    (root / "VolumeTracings.csv").write_text("\n".join(tracings) + "\n")
    return root


# -- CardiacUDA ----------------------------------------------------------------------------------


def test_cardiac_uda_reads_sites_views_labels_and_annotated_frames(tmp_path):
    root = write_cardiac_uda(tmp_path, unlabelled={("Site_R_126", 3)})
    source = discover_cardiac_uda(root, "Site_G*", "4")
    assert [v.name for v in source] == [f"Site_G_100/patient{i}-4" for i in range(1, 5)]  # view 1 skipped
    frames = source[0].read()
    images, labels = _video(6, seed=0)
    labels[1::2] = 0
    np.testing.assert_allclose(frames.images, images / 255.0, atol=1e-6)
    np.testing.assert_array_equal(frames.labels, labels)
    assert frames.labelled.tolist() == [True, False] * 3
    assert source[0].structures == {"LV": 1, "LA": 2, "RA": 3, "RV": 4}
    target = discover_cardiac_uda(root, "Site_R_126", "4")
    assert [v.has_labels for v in target] == [True, True, True, False]
    assert not target[3].read().labelled.any()


def test_cardiac_uda_fills_outlines_and_keeps_filled_regions():
    outline = np.zeros((1, 9, 9), np.int64)
    outline[0, 2, 2:7] = outline[0, 6, 2:7] = outline[0, 2:7, 2] = outline[0, 2:7, 6] = 3
    filled = fill_outlines(outline)
    assert (filled[0, 2:7, 2:7] == 3).all() and filled.sum() == 25 * 3
    np.testing.assert_array_equal(fill_outlines(filled), filled)


def test_cardiac_uda_labels_of_the_wrong_shape_name_the_label_file(tmp_path):
    root = write_cardiac_uda(tmp_path, sites=("Site_G",), videos=1)
    bad = root / "Site_G" / "patient1-4_label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 5), np.uint8), np.eye(4)), str(bad))
    with pytest.raises(ShapeMismatchError, match="patient1-4_label.nii.gz.*shape"):
        discover_cardiac_uda(root, "Site_G")[0].read()


def test_cardiac_uda_unknown_label_value_and_missing_site_are_named(tmp_path):
    root = write_cardiac_uda(tmp_path, sites=("Site_G",), videos=1)
    labels = np.full((20, 24, 6), 7, np.uint8)
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(root / "Site_G" / "patient1-4_label.nii.gz"))
    with pytest.raises(LabelRangeError, match=r"patient1-4_label.nii.gz: label values \[7\]"):
        discover_cardiac_uda(root, "Site_G")[0].read()
    with pytest.raises(DatasetNotFoundError, match="Site_X"):
        discover_cardiac_uda(root, "Site_X")


def test_a_video_with_no_frames_names_the_file(tmp_path):
    root = tmp_path / "cuda"
    (root / "Site_G").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((20, 24, 0), np.uint8), np.eye(4)), str(root / "Site_G" / "patient1-4_image.nii.gz"))
    with pytest.raises(UnreadableFileError, match="patient1-4_image.nii.gz: holds no frames"):
        discover_cardiac_uda(root, "Site_G")[0].read()
    echonet = write_echonet(tmp_path / "echonet")
    (echonet / "Videos" / "0XAAA.avi").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="0XAAA.avi: holds no frames"):
        discover_echonet(echonet)[0].read()


# -- CAMUS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_read_mhd_round_trips_raw_and_compressed_data(tmp_path, compressed):
    array = np.random.default_rng(0).integers(0, 255, (3, 5, 7)).astype(np.uint8)
    write_mhd(tmp_path / "x.mhd", array, compressed)
    np.testing.assert_array_equal(read_mhd(tmp_path / "x.mhd"), array)


def test_read_mhd_names_a_missing_or_short_data_file(tmp_path):
    write_mhd(tmp_path / "x.mhd", np.zeros((2, 3, 4), np.uint8))
    (tmp_path / "x.raw").write_bytes(b"\0" * 5)
    with pytest.raises(UnreadableFileError, match=r"x.raw: holds 5 bytes"):
        read_mhd(tmp_path / "x.mhd")
    (tmp_path / "x.raw").unlink()
    with pytest.raises(DatasetNotFoundError, match="x.raw"):
        read_mhd(tmp_path / "x.mhd")


def test_camus_metaimage_release_places_ed_and_es_labels_from_the_info_file(tmp_path):
    videos = discover_camus(write_camus_mhd(tmp_path), "4")
    assert [v.name for v in videos] == [f"patient{p:04d}" for p in range(1, 5)] and videos[0].split is None
    for video in videos[:2]:  # plain and compressed data
        frames = video.read()
        images, labels = _video(5, seed=int(video.name[-1]) - 1)
        np.testing.assert_allclose(frames.images, images / 255.0, atol=1e-6)
        assert frames.labelled.tolist() == [True, False, False, True, False]  # ED: 1, ES: 4
        labels[labels == 2] = 3
        np.testing.assert_array_equal(frames.labels[3], labels[3])
        assert not frames.labels[1].any()


def test_camus_nifti_release_uses_its_split_files_and_transposes_to_frames(tmp_path):
    videos = discover_camus(write_camus_nifti(tmp_path), "4CH")
    assert [v.split for v in videos] == ["train"] * 4 + ["val", "test"]
    frames = videos[0].read()
    images, _ = _video(5, seed=0)
    assert frames.images.shape == (5, 20, 24) and frames.labelled.all()
    np.testing.assert_allclose(frames.images, images / 255.0, atol=1e-6)
    assert set(np.unique(frames.labels)) == {0, 1, 3}


def test_camus_refuses_a_folder_of_another_layout(tmp_path):
    with pytest.raises(LayoutError, match="not a CAMUS folder"):
        discover_camus(tmp_path, "4")


# -- EchoNet-Dynamic -----------------------------------------------------------------------------


def test_echonet_reads_avi_splits_and_rasterises_the_tracings(tmp_path):
    videos = discover_echonet(write_echonet(tmp_path))
    assert [v.split for v in videos] == ["train", "train", "val", "test"]
    frames = videos[1].read()
    assert frames.images.shape == (8, 32, 32) and abs(frames.images.mean() - 80 / 255) < 0.02
    assert np.flatnonzero(frames.labelled).tolist() == [1, 5]
    x = np.array([8, 8, 10, 22, 24, 24])
    y = np.array([8, 16, 24, 24, 16, 8])
    rows, cols = skimage.draw.polygon(y, x, (32, 32))
    expected = np.zeros((32, 32), np.int64)
    expected[rows, cols] = 1
    np.testing.assert_array_equal(frames.labels[5], expected)


def test_echonet_tracing_for_a_missing_video_names_it(tmp_path):
    root = write_echonet(tmp_path)
    with (root / "VolumeTracings.csv").open("a") as handle:
        handle.write("0XGHOST.avi,1,1,2,2,3\n")
    with pytest.raises(MissingPairError, match="VolumeTracings.csv: has tracings for 0XGHOST.avi"):
        discover_echonet(root)


def test_echonet_traced_frame_past_the_end_and_bad_header_are_named(tmp_path):
    root = write_echonet(tmp_path)
    with (root / "VolumeTracings.csv").open("a") as handle:
        handle.write("0XAAA.avi,1,1,2,2,99\n")
    with pytest.raises(LabelRangeError, match="traces frame 99 of 0XAAA.avi"):
        discover_echonet(root)[0].read()
    (root / "VolumeTracings.csv").write_text("Name,X,Y\n")
    with pytest.raises(LayoutError, match="VolumeTracings.csv: header"):
        discover_echonet(root)


def test_echonet_tracing_may_reach_one_pixel_past_the_border_and_no_farther(tmp_path):
    root = write_echonet(tmp_path)  # 32 x 32 frames: pixel centres 0..31
    tracings = root / "VolumeTracings.csv"
    text = tracings.read_text()
    tracings.write_text(text.replace("0XAAA.avi,8,8,24,8,5", "0XAAA.avi,-1,8,32,8,5"))  # drawn at the edges
    frames = discover_echonet(root)[0].read()
    rows, cols = skimage.draw.polygon([8, 16, 24, 24, 16, 8], [-1, 8, 10, 22, 24, 32], (32, 32))
    expected = np.zeros((32, 32), np.int64)
    expected[rows, cols] = 1  # clipped to the frame, as the official loader does
    np.testing.assert_array_equal(frames.labels[5], expected)
    assert expected[8].all()  # the top chord spans the whole frame
    tracings.write_text(text.replace("0XAAA.avi,8,8,24,8,5", "0XAAA.avi,-1.5,8,24,8,5"))
    with pytest.raises(LabelRangeError, match=r"VolumeTracings.csv: line 7: chord -1.5 8 24 8 lies outside the 32 x 32 frames of 0XAAA.avi"):
        discover_echonet(root)[0].read()


# -- the datamodule --------------------------------------------------------------------------------


def test_clip_indices_contain_the_anchor_and_respect_the_stride():
    rng = np.random.default_rng(0)
    for anchor in range(0, 30, 3):
        indices = clip_indices(30, 8, 3, rng, anchor)
        assert anchor in indices and (np.diff(indices) == 3).all() and indices.max() < 30
    assert clip_indices(5, 8, 2, rng).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]  # short video: last frame repeated


def test_training_clips_are_a_function_of_their_key_and_a_resumed_epoch_replays_its_tail(tmp_path):
    from data.sampling import ResumableSampler

    root = write_cardiac_uda(tmp_path, videos=6, frames=12)
    dm = EchoUDADataModule(root=str(root), source_site="Site_G_100", target_site="Site_R_126", structures=["LV", "LA"],
                           clip_length=4, resize=24, crop=16, samples_per_epoch=8, batch_size=2, val_fraction=0.2, test_fraction=0.2)  # fmt: skip
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, ResumableSampler)
    paired = dm.datasets["train"]
    np.random.seed(1)
    torch.manual_seed(1)
    first = paired[(3, 12345)]
    np.random.seed(2)  # global random state plays no part
    torch.manual_seed(2)
    again = paired[(3, 12345)]
    for side in ("source", "target"):
        assert torch.equal(first[side]["video"], again[side]["video"]) and torch.equal(first[side]["mask"], again[side]["mask"])
    other = [paired[(3, seed)]["source"]["video"] for seed in range(6)]
    assert any(not torch.equal(other[0], clip) for clip in other[1:])  # the seed moves the clip and the crop
    # target videos do not follow the source order: over an epoch's keys both vary independently
    keys = list(loader.sampler)
    targets = [int(np.random.default_rng(np.random.SeedSequence(seed).generate_state(3)[0]).integers(len(paired.target))) for _, seed in keys]
    assert len(set(zip([i % len(paired.source) for i, _ in keys], targets))) > len(paired.source)
    # a fit resumed after the first batch draws exactly the rest of the uninterrupted epoch
    full = [b["target"]["video"] for b in loader]
    loader.sampler.skip = 2
    resumed = [b["target"]["video"] for b in loader]
    assert len(resumed) == len(full) - 1 and all(torch.equal(a, b) for a, b in zip(full[1:], resumed))


def test_seeded_split_holds_out_labelled_videos_only(tmp_path):
    videos = discover_cardiac_uda(write_cardiac_uda(tmp_path, sites=("S",), videos=10, unlabelled={("S", 0)}), "S")
    splits = assign_splits(videos, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert all(v.has_labels for v in splits["val"] + splits["test"])
    assert splits == assign_splits(videos, 0.2, 0.2, seed=0)


def test_datamodule_pairs_camus_source_with_echonet_target_and_hides_target_labels(tmp_path):
    camus, echonet = write_camus_nifti(tmp_path / "camus"), write_echonet(tmp_path / "echonet")
    dm = EchoUDADataModule(
        source_format="camus", source_root=str(camus), target_format="echonet", target_root=str(echonet),
        structures=["LV"], clip_length=4, resize=40, crop=32, samples_per_epoch=6, batch_size=2,
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"]["video"].shape == (2, 4, 1, 32, 32) and batch["source"]["labelled"].any(dim=1).all()
    assert set(batch["source"]["mask"].unique().tolist()) <= {0, 1}
    assert not batch["target"]["labelled"].any() and not batch["target"]["mask"].any()
    val = next(iter(dm.val_dataloader()))  # CAMUS's validation subgroup
    assert val["video"].shape == (1, 5, 1, 32, 32) and val["name"] == ["patient0005"]
    dm.setup("test")
    test = next(iter(dm.test_dataloader()))  # EchoNet's TEST split, traced frames labelled
    assert test["name"] == ["0XDDD"] and test["labelled"][0].nonzero().flatten().tolist() == [1, 5]
    assert dm.dataset_name == "echonet:echonet (test)"


def test_datamodule_refuses_structures_a_dataset_does_not_label(tmp_path):
    dm = EchoUDADataModule(source_format="echonet", source_root=str(write_echonet(tmp_path / "e")), target_root=str(tmp_path / "e"),
                           target_format="echonet", structures=["LV", "RV"], clip_length=2)  # fmt: skip
    with pytest.raises(LayoutError, match=r"e: has no RV labels \(it labels LV\)"):
        dm.setup("fit")


def test_builtin_sites_share_anatomy_but_not_appearance(tmp_path):
    heart = _heart(np.random.default_rng(0))
    a_images, a_labels = render_video(heart, SITES["Site_A"], 16, 64, np.random.default_rng(1))
    b_images, b_labels = render_video(heart, SITES["Site_B"], 16, 64, np.random.default_rng(1))
    np.testing.assert_array_equal(a_labels, b_labels)  # the same heart
    assert set(np.unique(a_labels)) == {0, 1, 2, 3, 4}
    blood_a, blood_b = a_images[a_labels > 0].mean(), b_images[b_labels > 0].mean()
    assert blood_b > blood_a + 20  # haze and gain fill the target's chambers
    lv_area = (a_labels == 1).sum(axis=(0, 1)).astype(float)
    period = heart["period"]
    assert abs(np.argmax(np.abs(np.fft.rfft(lv_area - lv_area.mean()))) - 16 / period) <= 1  # beats at its period


def test_builtin_set_is_written_in_cardiac_uda_layout_and_read_back(tmp_path):
    dm = EchoUDADataModule(builtin_videos_per_site=5, builtin_frames=8, builtin_size=32, resize=32, crop=32, clip_length=4, samples_per_epoch=2)
    dm.prepare_data()
    root = dm.builtin_root()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["Site_A", "Site_B"]
    assert (root / "Site_B" / "patient0005-4_label.nii.gz").is_file()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["val"]) == 1 and len(dm.datasets["test"]) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"]["video"].shape == (2, 4, 1, 32, 32)
    assert torch.equal(batch["target"]["mask"], torch.zeros_like(batch["target"]["mask"]))
