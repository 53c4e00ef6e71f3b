"""Datasets, layouts, bad-data errors, check_dataset, augmentation and synthetic data."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from condseg.data import (DatasetError, MissingFilesError, SegmentationDataset, augment, available_splits,
                          check_dataset, find_samples, make_synthetic_dataset, read_image, read_mask)

KVASIR_MISSING = ["cju1gkndf6yi10801o1qnje19", "cju2hqt33lmra0988fr5ijv8j"]


def _write_pair(root, sid, size=(24, 20), image_ext="png", mask_name=None, mask_value=255, seed=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(abs(hash(sid)) % 2**32 if seed is None else seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{sid}.{image_ext}")
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = mask_value
    Image.fromarray(mask).save(root / "masks" / (mask_name or f"{sid}.png"))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    for i in range(4):
        _write_pair(root, f"a{i}", image_ext="jpg" if i % 2 else "png")
    (root / "train.txt").write_text("a0\na1\na2")       # no trailing newline
    (root / "val.txt").write_text("a3\n\n")
    return root


def test_folder_layout_and_splits(folder):
    samples, layout = find_samples(folder, "train")
    assert [s.id for s in samples] == ["a0", "a1", "a2"] and layout.name == "folder"
    assert [s.id for s in find_samples(folder, "val")[0]] == ["a3"]
    assert len(find_samples(folder)[0]) == 4
    ds = SegmentationDataset(folder, "train", image_size=32)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) == {0, 1}
    pre = SegmentationDataset(folder, "train", image_size=32, preload=True)
    assert torch.equal(pre[1]["image"], ds[1]["image"]) and torch.equal(pre[1]["mask"], ds[1]["mask"])
    later = SegmentationDataset(folder, "train", image_size=32)
    assert later.empty_masks() is None  # not known before the pairs are decoded
    later.load_all()
    assert torch.equal(later._cache["mask"], pre._cache["mask"]) and later.empty_masks() == pre.empty_masks()
    sub = SegmentationDataset(folder, str(folder / "val.txt"), image_size=(32, 48), ids=["a3"])
    assert sub.ids == ["a3"] and sub[0]["image"].shape == (3, 32, 48)


def test_missing_ids_listed_with_folder_and_skippable(folder):
    (folder / "train.txt").write_text("a0\nghost1\na1\nghost2\n")
    with pytest.raises(MissingFilesError) as err:
        find_samples(folder, "train")
    msg = str(err.value)
    assert "ghost1" in msg and "ghost2" in msg and str(folder / "images") in msg and "skip_missing" in msg
    assert err.value.ids == ["ghost1", "ghost2"]
    warnings = []
    samples, _ = find_samples(folder, "train", skip_missing=True, warn=warnings.append)
    assert [s.id for s in samples] == ["a0", "a1"] and "ghost1" in warnings[0]


def test_missing_mask_names_mask_folder(folder):
    (folder / "masks" / "a1.png").unlink()
    with pytest.raises(MissingFilesError, match="a1") as err:
        find_samples(folder, "train")
    assert str(folder / "masks") in str(err.value)


def test_real_kvasir_split_reports_the_two_missing_ids(kvasir_root):
    with pytest.raises(MissingFilesError) as err:
        find_samples(kvasir_root, "train")
    assert err.value.ids == KVASIR_MISSING
    assert str(kvasir_root / "images") in str(err.value)
    samples, _ = find_samples(kvasir_root, "train", skip_missing=True, warn=lambda m: None)
    assert len(samples) == 878
    ds = SegmentationDataset(kvasir_root, "val", image_size=64)
    assert len(ds) == 120
    mask = ds[0]["mask"]
    assert mask.shape == (1, 64, 64) and 0 < int(mask.sum()) < 64 * 64


def test_split_files_as_written_by_hand(folder, monkeypatch, tmp_path):
    # A byte order mark (Windows Notepad) and file names instead of ids once made ids "missing".
    (folder / "train.txt").write_text("\ufeffa0\r\na1.jpg\r\na2.PNG\r\n", encoding="utf-8")
    assert [s.id for s in find_samples(folder, "train")[0]] == ["a0", "a1", "a2"]
    monkeypatch.chdir(tmp_path)  # a split file named relative to the dataset, not the working folder
    assert [s.id for s in find_samples(folder, "val.txt")[0]] == ["a3"]
    with pytest.raises(DatasetError, match="ids not in split 'train'.*: ghost"):
        SegmentationDataset(folder, "train", ids=["a0", "ghost"])


def test_corrupt_file_error_names_it(folder):
    bad = folder / "images" / "a0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = SegmentationDataset(folder, "train", image_size=32)
    with pytest.raises(DatasetError, match="a0.png") as err:
        ds[0]
    assert err.value.path == str(bad)
    truncated = folder / "images" / "a1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DatasetError, match="a1.jpg"):
        ds[1]


def test_size_mismatch_and_empty_split_errors(folder):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "masks" / "a2.png")
    ds = SegmentationDataset(folder, "train", image_size=32)
    with pytest.raises(DatasetError, match=r"a2\.png is 24x20 but its mask .*a2\.png is 10x10"):
        ds[2]
    (folder / "test.txt").write_text("\n \n")
    with pytest.raises(DatasetError, match="test.txt is empty"):
        find_samples(folder, "test")
    with pytest.raises(DatasetError, match="no split file .* or take every pair with the split 'all'"):
        find_samples(folder, "nosuch")
    assert len(find_samples(folder, "all")[0]) == 4  # every pair, as the message says
    with pytest.raises(DatasetError, match="dataset folder not found"):
        find_samples(folder / "nowhere")


def test_duplicate_ids_error(folder):
    _write_pair(folder, "a0", image_ext="bmp")
    with pytest.raises(DatasetError, match="two image files share the id 'a0'"):
        find_samples(folder, "train")


def test_check_dataset_reports_a_missing_mask_once(folder):
    (folder / "masks" / "a1.png").unlink()  # a1 is listed in train.txt
    report = check_dataset(folder)
    assert len(report.problems) == 1, str(report)
    assert "a1.jpg: image has no mask" in str(report)


def test_check_dataset_reports_everything_at_once(folder):
    (folder / "images" / "a0.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "masks" / "a1.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "masks" / "orphan.png")
    (folder / "val.txt").write_text("a3\nghost\n")
    report = check_dataset(folder)
    text = str(report)
    assert not report.ok and len(report.problems) == 4, text
    for needle in ("a0.png", "a1.png", "orphan.png", "ghost"):
        assert needle in text
    _write_pair(folder, "a0")
    _write_pair(folder, "a1", image_ext="jpg")
    (folder / "masks" / "orphan.png").unlink()
    (folder / "val.txt").write_text("a3\n")
    assert check_dataset(folder).ok


def test_check_dataset_goes_on_past_duplicate_ids_and_fails_an_empty_dataset(folder, tmp_path):
    # A duplicate id once stopped the scan of its folder: nothing else there was checked.
    _write_pair(folder, "a0", image_ext="bmp")
    (folder / "images" / "a2.png").write_bytes(b"garbage")
    report = check_dataset(folder)
    assert [p.message.split(":")[0] for p in report.problems] == [
        "two image files share the id 'a0'", f"cannot read image {folder / 'images' / 'a2.png'}"], str(report)
    assert report.pairs == 4
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    report = check_dataset(empty)
    assert not report.ok and "no image/mask pairs" in str(report)


def test_masks_in_other_encodings(tmp_path):
    truth = np.zeros((8, 10), np.uint8)
    truth[2:5, 3:9] = 1
    cases = {
        "zero-one.png": Image.fromarray(truth),                                        # 0/1 in 8 bits
        "zero-one-16.png": Image.fromarray(truth.astype(np.uint16)),                  # 0/1 in 16 bits
        "grey-alpha.png": Image.fromarray(np.stack([truth * 255, np.full_like(truth, 255)], -1), "LA"),
        "palette.png": Image.fromarray(truth * 255).convert("P"),
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        assert np.array_equal(read_mask(tmp_path / name), truth), name
    soft = np.where(truth == 1, 0.8, 0.0).astype(np.float32)  # a float mask: range 0..1 already
    soft[0, 0] = 1.0
    Image.fromarray(soft, "F").save(tmp_path / "soft.tif")
    assert read_mask(tmp_path / "soft.tif").sum() == truth.sum() + 1
    noisy = np.where(truth == 1, 1, 0).astype(np.uint8)  # a JPEG "empty" mask with noise of 1 stays empty
    Image.fromarray(noisy).save(tmp_path / "noise.jpg", quality=100)
    assert read_mask(tmp_path / "noise.jpg").sum() == 0


def test_cmyk_and_ycbcr_images_read_as_rgb(tmp_path):
    from condseg.data.io import _to_array

    colour = Image.new("RGB", (6, 4), (200, 30, 10))
    colour.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(read_image(tmp_path / "cmyk.jpg").astype(int) - (200, 30, 10)).max() <= 3
    for mode in ("YCbCr", "LAB", "HSV"):  # in memory: older Pillow cannot read back its YCbCr TIFFs
        pixels, top = _to_array(colour.convert(mode))
        assert top == 255 and np.abs(pixels.astype(int) - (200, 30, 10)).max() <= 3, mode


def test_check_dataset_warns_of_masks_that_read_as_empty(folder):
    # 0/255 stored in 16 bits binarises at 32768: all background. Usable, so a warning.
    mask = np.array(Image.open(folder / "masks" / "a1.png")).astype(np.uint16)
    Image.fromarray(mask).save(folder / "masks" / "a1.png")
    report = check_dataset(folder)
    assert report.ok and len(report.warnings) == 1, str(report)
    assert "a1.png" in str(report) and "largest value is 255, under the threshold 32768" in str(report)


def test_check_real_kvasir(kvasir_root):
    report = check_dataset(kvasir_root)
    assert len(report.problems) == 1 and all(i in str(report) for i in KVASIR_MISSING)
    assert report.splits == {"train": 878, "val": 120}


def test_image_and_mask_formats(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((8, 9), 77, np.uint8)).save(gray)
    assert read_image(gray).shape == (8, 9, 3) and read_image(gray, channels=1).shape == (8, 9, 1)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.full((8, 9, 4), 200, np.uint8)).save(rgba)
    assert read_image(rgba).shape == (8, 9, 3)
    img16 = tmp_path / "i16.png"
    Image.fromarray(np.full((8, 9), 65535, np.uint16)).save(img16)
    assert read_image(img16).max() == 255
    m16 = np.zeros((8, 9), np.uint16)
    m16[0, 0], m16[0, 1], m16[0, 2] = 65535, 32768, 32767
    Image.fromarray(m16).save(tmp_path / "m16.png")
    assert read_mask(tmp_path / "m16.png")[0, :3].tolist() == [1, 1, 0]
    m8 = np.array([[255, 128, 127, 0]], np.uint8)
    Image.fromarray(np.stack([m8] * 3, -1)).save(tmp_path / "m8rgb.png")
    assert read_mask(tmp_path / "m8rgb.png").tolist() == [[1, 1, 0, 0]]
    Image.fromarray(np.array([[0, 1, 2]], np.uint8)).save(tmp_path / "labels.png")
    assert read_mask(tmp_path / "labels.png", "nonzero").tolist() == [[0, 1, 1]]
    assert read_mask(tmp_path / "labels.png", classes=3).tolist() == [[0, 1, 2]]
    with pytest.raises(DatasetError, match="outside the 2 class"):
        read_mask(tmp_path / "labels.png", classes=2)


@pytest.mark.parametrize("data, truth", [("ISBI2016_ISIC_Part1_{}_Data", "ISBI2016_ISIC_Part1_{}_GroundTruth"),
                                         ("ISIC2018_Task1-2_{}_Input", "ISIC2018_Task1_{}_GroundTruth")],
                         ids=["2016", "2018"])
def test_isic_layout(tmp_path, data, truth):
    root = tmp_path / "isic"
    for split, word in (("train", "Training"), ("test", "Test")):
        images, masks = root / data.format(word), root / truth.format(word)
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(2):
            sid = f"ISIC_{split}{i}"
            Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(images / f"{sid}.jpg")
            Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(images / f"{sid}_superpixels.png")
            Image.fromarray(np.full((6, 7), 255, np.uint8)).save(masks / f"{sid}_Segmentation.png")
    samples, layout = find_samples(root, "train")
    assert layout.name == "isic" and [s.id for s in samples] == ["ISIC_train0", "ISIC_train1"]
    with pytest.raises(DatasetError, match="the split 'all' .* keeps its splits in separate folders"):
        find_samples(root, "all")  # not just the training folder
    assert [s.id for s in find_samples(root, "test")[0]] == ["ISIC_test0", "ISIC_test1"]
    ds = SegmentationDataset(root, "test", image_size=32)
    assert ds[0]["mask"].all()
    # ISIC keeps its splits in folders: a stray (empty) split file is not read, so no error
    (root / "val.txt").write_text("\n")
    assert available_splits(root) == ["train", "test"]


def test_glas_layout(tmp_path):
    root = tmp_path / "glas"
    root.mkdir()
    for i, sid in enumerate(("train_1", "train_2", "testA_1", "testB_1")):
        Image.fromarray(np.full((6, 7, 3), i, np.uint8)).save(root / f"{sid}.bmp")  # four distinct images
        Image.fromarray(np.array([[0, 1, 2, 3, 0, 0, 0]] * 6, np.uint8)).save(root / f"{sid}_anno.bmp")
    assert [s.id for s in find_samples(root, "train")[0]] == ["train_1", "train_2"]
    samples, layout = find_samples(root, "test")
    assert layout.name == "glas" and [s.id for s in samples] == ["testA_1", "testB_1"]
    ds = SegmentationDataset(root, "train", image_size=(6, 7))
    assert ds[0]["mask"][0, 0].tolist() == [0, 1, 1, 1, 0, 0, 0]  # instance labels binarised
    report = check_dataset(root)  # GlaS validates on its test pairs: by design, not a problem
    assert report.ok and not report.warnings, str(report)


def test_geometric_moves_image_and_mask_together():
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(16, 1, 32, 32, generator=g) > 0.7).float()
    masks = torch.nn.functional.max_pool2d(masks, 5, 1, 2)  # blobs rather than single pixels
    images = masks.repeat(1, 3, 1, 1)
    out_i, out_m = augment.geometric(images, masks, rotation=20, generator=g)
    agree = ((out_i[:, :1] >= 0.5).float() == out_m).float().mean()
    assert agree > 0.99 and out_m.dtype == masks.dtype
    assert not torch.equal(out_m, masks)
    labels = torch.randint(0, 3, (2, 1, 16, 16), generator=g).to(torch.uint8)
    _, out_l = augment.geometric(torch.rand(2, 3, 16, 16), labels, labels=True, generator=g)
    assert set(out_l.unique().tolist()) <= {0, 1, 2}


def test_strong_augmentation_per_image_and_seeded():
    x = torch.rand(1, 3, 32, 32).repeat(8, 1, 1, 1)
    a = augment.strong(x, generator=torch.Generator().manual_seed(1))
    b = augment.strong(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and 0 <= a.min() and a.max() <= 1
    assert len({round(float(v), 5) for v in (a - x).abs().mean(dim=(1, 2, 3))}) == 8  # per image
    gray = augment.strong(torch.rand(4, 1, 32, 32), generator=torch.Generator().manual_seed(2))
    assert gray.shape == (4, 1, 32, 32)
    hsv = augment._rgb_to_hsv(x)
    assert torch.allclose(augment._hsv_to_rgb(hsv), x, atol=1e-5)
    norm = augment.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    expected = (1 - torch.tensor(augment.IMAGENET_MEAN)) / torch.tensor(augment.IMAGENET_STD)
    assert torch.allclose(norm[0, :, 0, 0], expected)


def test_synthetic_dataset(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", train=4, val=2, size=32, seed=3)
    samples, _ = find_samples(root, "train")
    assert len(samples) == 4 and len(find_samples(root, "val")[0]) == 2
    ds = SegmentationDataset(root, "train", image_size=32)
    assert all(0 < int(ds[i]["mask"].sum()) < 32 * 32 for i in range(4))
    again = make_synthetic_dataset(tmp_path / "syn2", train=4, val=2, size=32, seed=3)
    assert (again / "images" / "blob_0000.png").read_bytes() == (root / "images" / "blob_0000.png").read_bytes()
    assert check_dataset(root).ok


def test_check_dataset_lists_missing_split_ids_beside_duplicate_ids(folder):
    # A duplicate id once hid every split's missing ids and pair counts.
    _write_pair(folder, "a0", image_ext="bmp")
    (folder / "train.txt").write_text("a0\na1\nghost\n")
    (folder / "val.txt").write_text("a3\nphantom\n")
    report = check_dataset(folder)
    assert [str(p).split(":")[0] for p in report.problems] == [
        str(folder / "images" / "a0.png"), str(folder / "train.txt"), str(folder / "val.txt")], str(report)
    assert "ghost" in str(report.problems[1]) and "phantom" in str(report.problems[2])
    assert report.splits == {"train": 2, "val": 1}


def test_check_dataset_reports_pairs_two_splits_share(folder, tmp_path):
    """Validation pairs that training also uses inflate every score: a problem for the check, by
    file (split sub-folders may reuse an id for another image, which is fine)."""
    (folder / "val.txt").write_text("a3\na1\na0\n")
    report = check_dataset(folder)
    assert [p.path for p in report.problems] == [str(folder / "val.txt")], str(report)
    assert "splits 'train' and 'val' share 2 image(s) (the same file or an identical copy): a0, a1" in str(report)
    # A test split equal to val (no separate validation set) is worth a warning, not a failure.
    (folder / "val.txt").write_text("a3\n")
    (folder / "test.txt").write_text("a3\n")
    report = check_dataset(folder)
    assert report.ok and [w.path for w in report.warnings] == [str(folder / "test.txt")], str(report)
    assert "splits 'val' and 'test' share 1 image(s)" in str(report)
    # split sub-folders: the same id may name another image (fine); a byte-identical copy is a leak
    root = tmp_path / "sub"
    _write_pair(root / "train", "x0", seed=1)
    _write_pair(root / "val", "x0", seed=2)
    assert check_dataset(root).ok
    _write_pair(root / "train", "x1", seed=3)
    shutil.copy(root / "train" / "images" / "x1.png", root / "val" / "images" / "copy_of_x1.png")
    shutil.copy(root / "train" / "masks" / "x1.png", root / "val" / "masks" / "copy_of_x1.png")
    report = check_dataset(root)
    assert [p.path for p in report.problems] == [str(root / "val" / "images")], str(report)
    assert "share 1 image(s) (the same file or an identical copy): copy_of_x1" in str(report)


def test_check_dataset_reads_split_sub_folders(tmp_path):
    # ROOT/train/images, ROOT/val/images...: the layout training reads, with no ROOT/images.
    root = tmp_path / "ds"
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            _write_pair(root / split, f"{split}{i}")
    report = check_dataset(root)
    assert report.ok and report.pairs == 3 and report.splits == {"train": 2, "val": 1}, str(report)
    (root / "val" / "images" / "val0.png").write_bytes(b"garbage")
    report = check_dataset(root)
    assert [p.path for p in report.problems] == [str(root / "val" / "images" / "val0.png")], str(report)


def test_palette_masks(tmp_path):
    labels = np.zeros((6, 8), np.uint8)
    labels[1:3, 1:4], labels[4:6, 5:8] = 1, 2
    voc = Image.fromarray(labels, "P")  # VOC style: the indices are the classes, the colours are for viewers
    voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])
    voc.save(tmp_path / "voc.png")
    assert np.array_equal(read_mask(tmp_path / "voc.png", classes=3), labels)
    binary = Image.fromarray((labels == 1).astype(np.uint8), "P")  # binary: index 1 shown white
    binary.putpalette([0, 0, 0, 255, 255, 255])
    binary.save(tmp_path / "binary.png")
    assert np.array_equal(read_mask(tmp_path / "binary.png"), labels == 1)


@pytest.mark.parametrize("data, truth, other, other_file", [
    ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth", "ISIC-2017_Training_Part2_GroundTruth",
     "{}_features.json"),
    ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth",
     "ISIC2018_Task2_Training_GroundTruth_v3", "{}_attribute_globules.png")], ids=["2017", "2018"])
def test_isic_layout_beside_other_ground_truth(tmp_path, data, truth, other, other_file):
    root = tmp_path / "isic"
    for folder in (data, truth, other):
        (root / folder).mkdir(parents=True)
    for sid in ("ISIC_0000000", "ISIC_0000001"):
        Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(root / data / f"{sid}.jpg")
        Image.fromarray(np.full((6, 7), 255, np.uint8)).save(root / truth / f"{sid}_segmentation.png")
        extra = root / other / other_file.format(sid)
        if extra.suffix == ".png":
            Image.fromarray(np.zeros((6, 7), np.uint8)).save(extra)
        else:
            extra.write_text("{}")
    samples, _ = find_samples(root, "train")
    assert [s.mask for s in samples] == [root / truth / f"{i}_segmentation.png" for i in ("ISIC_0000000",
                                                                                        "ISIC_0000001")]
    report = check_dataset(root)
    assert report.ok and report.pairs == 2, str(report)


def test_an_empty_id_list_is_a_clear_error(folder):
    # One pair and no val split: holding one out for validation leaves an empty training list.
    for i in (1, 2, 3):
        (folder / "images" / f"a{i}.{'jpg' if i % 2 else 'png'}").unlink()
    with pytest.raises(DatasetError, match=f"no pairs selected from {folder} .*val split"):
        SegmentationDataset(folder, None, image_size=16, ids=[], preload=True)


def test_exif_orientation_is_applied(tmp_path):
    # Stored 12 wide and 6 high with Orientation=6, viewers (and OpenCV) show it turned clockwise.
    raw = np.zeros((6, 12), np.uint8)
    raw[:3, :4] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.stack([raw] * 3, -1)).save(tmp_path / "photo.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "photo.png")[:, :, 0], np.rot90(raw, -1))
    Image.fromarray(raw).save(tmp_path / "mask.png", exif=exif)
    assert np.array_equal(read_mask(tmp_path / "mask.png"), np.rot90(raw, -1) // 255)
    # a camera JPEG whose mask was drawn on the image as shown: the pair is of one size
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.stack([raw] * 3, -1)).save(root / "images" / "p.jpg", exif=exif, quality=100)
    Image.fromarray(np.rot90(raw, -1)).save(root / "masks" / "p.png")
    assert check_dataset(root).ok, str(check_dataset(root))
