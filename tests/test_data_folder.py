"""Image folders and ImageNet layouts written here with Pillow: order, labels, shapes, values, subset
lists, label files, and errors that name the file or folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adasmooth.core.errors import ConfigError, DataError
from adasmooth.data import ImageOptions, load_dataset
from adasmooth.data.images import center_crop_box, resize_short_side

CLASSES = ["ant", "cat", "dog"]  # sorted: labels 0, 1, 2


def pattern(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_class_folders(root: Path, per_class=(2, 3, 1), size=(8, 8), suffix=".png") -> dict[str, np.ndarray]:
    """root/<class>/img<k><suffix>; returns the pixels written, by relative path."""
    written = {}
    for c, (name, n) in enumerate(zip(CLASSES, per_class)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            arr = pattern(100 * c + k, *size)
            Image.fromarray(arr).save(root / name / f"img{k}{suffix}")
            written[f"{name}/img{k}{suffix}"] = arr
    return written


@pytest.fixture
def folder(tmp_path):
    train = write_class_folders(tmp_path / "train")
    test = write_class_folders(tmp_path / "test", per_class=(1, 1, 2))
    return tmp_path, train, test


def test_class_folders_order_labels_shapes_and_exact_values(folder):
    root, train_pixels, test_pixels = folder
    opts = ImageOptions(crop=8, resize=8)  # no resizing or cropping: values are the PNG's exactly
    train = load_dataset("folder", "train", root, image=opts)
    assert len(train) == 6 and train.num_classes == 3 and train.input_shape == (3, 8, 8)
    assert train.y.tolist() == [0, 0, 1, 1, 1, 2] and train.classes == CLASSES
    assert [f"{f.parent.name}/{f.name}" for f in train.files] == sorted(train_pixels)
    x = train.x
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    for i, rel in enumerate(sorted(train_pixels)):
        expected = torch.from_numpy(train_pixels[rel]).permute(2, 0, 1).float() / 255
        assert torch.equal(x[i], expected)
    test = load_dataset("folder", "test", root, image=opts)
    assert test.y.tolist() == [0, 1, 2, 2] and test.split == "test"
    assert [(xb.shape[0], yb.tolist()) for xb, yb in test.batches(3)] == [(3, [0, 1, 2]), (1, [2])]


def test_resize_short_side_then_centre_crop(tmp_path):
    arr = pattern(7, 10, 20)  # height 10, width 20
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "test" / "b").mkdir(parents=True)
    Image.fromarray(arr).save(tmp_path / "test" / "a" / "wide.png")
    Image.fromarray(arr[:, :10]).save(tmp_path / "test" / "b" / "square.png")
    # short side already 10: no resize, crop 6 starts at ((20-6)/2, (10-6)/2) = (7, 2)
    data = load_dataset("folder", "test", tmp_path, image=ImageOptions(crop=6, resize=10))
    expected = torch.from_numpy(arr[2:8, 7:13]).permute(2, 0, 1).float() / 255
    assert torch.equal(data.x[0], expected) and data.input_shape == (3, 6, 6)
    # the sizes by hand: short side 5 makes 20x10 into 10x5; the long side is rounded down (10x30 -> 4x12)
    assert resize_short_side(Image.fromarray(arr), 5).size == (10, 5)
    assert resize_short_side(Image.new("RGB", (10, 30)), 4).size == (4, 12)
    assert center_crop_box(10, 5, 4) == (3, 0, 7, 4)
    # with resizing: Pillow's bilinear resize of the file, then the centre crop
    resized = load_dataset("folder", "test", tmp_path, image=ImageOptions(crop=4, resize=5))
    small = np.asarray(Image.fromarray(arr).resize((10, 5), Image.BILINEAR))[0:4, 3:7]
    assert torch.equal(resized.x[0], torch.from_numpy(small.copy()).permute(2, 0, 1).float() / 255)


def test_default_resize_is_crop_times_8_over_7():
    assert ImageOptions().size == 224 and ImageOptions().short_side == 256
    assert ImageOptions(crop=64).short_side == 73
    assert ImageOptions().fit([None, (3, 32, 32)]).size == 32
    assert ImageOptions(crop=16).fit([(3, 32, 32)]).size == 16
    with pytest.raises(ConfigError, match="resize 8 is smaller than the crop 16"):
        ImageOptions(crop=16, resize=8).validate()


def test_jpeg_files_decode_close_to_what_was_written(tmp_path):
    flat = {}
    for name in CLASSES[:2]:
        (tmp_path / "train" / name).mkdir(parents=True)
        value = 60 if name == "ant" else 200
        arr = np.full((12, 12, 3), value, dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "train" / name / "a.JPEG", quality=95)
        flat[name] = value
    data = load_dataset("folder", "train", tmp_path, image=ImageOptions(crop=8))
    assert data.x.shape == (2, 3, 8, 8)
    for i, name in enumerate(CLASSES[:2]):
        assert (data.x[i] * 255 - flat[name]).abs().max() <= 3


@pytest.fixture
def imagenet_style(tmp_path):
    """train/<wnid>/ folders (the class order), a flat val/ with val_labels.txt, and a subset list."""
    wnids = ["n02", "n01", "n03"]  # sorted: n01 -> 0, n02 -> 1, n03 -> 2
    for w in wnids:
        (tmp_path / "train" / w).mkdir(parents=True)
        Image.fromarray(pattern(1, 8, 8)).save(tmp_path / "train" / w / "t.JPEG")
    (tmp_path / "val").mkdir()
    labels = {}
    for k, w in enumerate(["n03", "n01", "n02", "n01", "n03"], start=1):
        fname = f"ILSVRC2012_val_{k:08d}.png"
        Image.fromarray(pattern(50 + k, 8, 8)).save(tmp_path / "val" / fname)
        labels[fname] = w
    (tmp_path / "val_labels.txt").write_text("".join(f"{f} {w}\n" for f, w in labels.items()))
    # RobustBench's list style: <wnid>/<file>, in its own order
    subset = tmp_path / "subset.txt"
    subset.write_text("n01/ILSVRC2012_val_00000004.png\nn03/ILSVRC2012_val_00000001.png\n"
                      "n02/ILSVRC2012_val_00000003.png\n")
    return tmp_path


def test_flat_validation_folder_with_label_file(imagenet_style):
    val = load_dataset("folder", "test", imagenet_style, image=ImageOptions(crop=8, resize=8))
    assert [f.name for f in val.files] == [f"ILSVRC2012_val_{k:08d}.png" for k in range(1, 6)]
    assert val.y.tolist() == [2, 0, 1, 0, 2] and val.num_classes == 3
    expected = torch.from_numpy(pattern(52, 8, 8)).permute(2, 0, 1).float() / 255
    assert torch.equal(val.x[1], expected)


def test_subset_list_selects_in_its_own_order(imagenet_style):
    opts = ImageOptions(crop=8, resize=8, subset=str(imagenet_style / "subset.txt"))
    val = load_dataset("folder", "test", imagenet_style, image=opts)
    assert [f.name for f in val.files] == ["ILSVRC2012_val_00000004.png", "ILSVRC2012_val_00000001.png",
                                           "ILSVRC2012_val_00000003.png"]
    assert val.y.tolist() == [0, 2, 1]
    expected = torch.from_numpy(pattern(54, 8, 8)).permute(2, 0, 1).float() / 255
    assert torch.equal(val.x[0], expected)
    # the same list selects from class folders too
    for w, k in (("n01", 4), ("n03", 1), ("n02", 3)):
        (imagenet_style / "test" / w).mkdir(parents=True, exist_ok=True)
        (imagenet_style / "val" / f"ILSVRC2012_val_{k:08d}.png").rename(
            imagenet_style / "test" / w / f"ILSVRC2012_val_{k:08d}.png")
    by_class = load_dataset("folder", "test", imagenet_style, image=opts)
    assert by_class.y.tolist() == [0, 2, 1] and torch.equal(by_class.x[0], expected)


def test_imagenet_has_1000_classes(imagenet_style, tmp_path_factory):
    with pytest.raises(DataError, match=r"3 classes in .*train, expected 1000"):
        load_dataset("imagenet", "test", imagenet_style, image=ImageOptions(crop=8))
    # integer labels (0-based, sorted-wnid order) and no train/ folder: indices used as they are
    root = tmp_path_factory.mktemp("inet")
    (root / "val").mkdir()
    for k, label in enumerate([999, 0, 17]):
        Image.fromarray(pattern(k, 8, 8)).save(root / "val" / f"v{k}.png")
    (root / "val_labels.txt").write_text("v0.png 999\nv1.png 0\nv2.png 17\n")
    val = load_dataset("imagenet", "test", root, image=ImageOptions(crop=8))
    assert val.num_classes == 1000 and val.y.tolist() == [999, 0, 17] and val.input_shape == (3, 8, 8)
    (root / "val_labels.txt").write_text("v0.png 1000\n")
    with pytest.raises(DataError, match=r"val_labels.txt:1: label 1000 outside \[0, 999\]"):
        load_dataset("imagenet", "test", root)


def test_validation_split_of_a_folder(folder):
    root, _, _ = folder
    opts = ImageOptions(crop=8)
    train = load_dataset("folder", "train", root, val_fraction=0.34, seed=1, image=opts)
    val = load_dataset("folder", "val", root, val_fraction=0.34, seed=1, image=opts)
    assert len(train) == 4 and len(val) == 2 and val.split == "val"
    assert sorted(map(str, train.files + val.files)) == sorted(map(str, load_dataset("folder", "train", root).files))


# ---------------------------------------------------------------------------- errors name the file


def test_corrupt_image_names_the_file(folder):
    root, _, _ = folder
    bad = root / "train" / "cat" / "img1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = load_dataset("folder", "train", root, image=ImageOptions(crop=8))
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        data.x
    with pytest.raises(DataError, match="img1.png"):
        list(data.stream(2, workers=0))


def test_missing_folders_and_files_name_what_is_missing(folder, tmp_path_factory):
    root, _, _ = folder
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataError, match=f"expected the folder {empty / 'train'}"):
        load_dataset("folder", "train", empty)
    with pytest.raises(DataError, match=f"{empty / 'test'} or {empty / 'val'}"):
        load_dataset("folder", "test", empty)
    (root / "test" / "eel").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'test' / 'eel'} is not a class of"):
        load_dataset("folder", "test", root)
    (root / "test" / "eel").rmdir()
    (root / "train" / "eel").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'train' / 'eel'} holds no"):
        load_dataset("folder", "train", root)
    (root / "train" / "eel").rmdir()
    subset = root / "list.txt"
    subset.write_text("cat/img0.png\nbee/img0.png\n")
    with pytest.raises(DataError, match=f"list.txt:2: missing class folder {root / 'test' / 'bee'}"):
        load_dataset("folder", "test", root, image=ImageOptions(subset=str(subset)))
    subset.write_text("cat/img9.png\n")
    with pytest.raises(DataError, match=f"list.txt:1: image {root / 'test' / 'cat' / 'img9.png'} not found"):
        load_dataset("folder", "test", root, image=ImageOptions(subset=str(subset)))
    with pytest.raises(DataError, match="subset list .*nope.txt not found"):
        load_dataset("folder", "test", root, image=ImageOptions(subset=str(root / "nope.txt")))


def test_flat_folder_without_label_file_names_the_expected_file(imagenet_style):
    (imagenet_style / "val_labels.txt").unlink()
    with pytest.raises(DataError, match=f"expected {imagenet_style / 'val_labels.txt'}"):
        load_dataset("folder", "test", imagenet_style)
    (imagenet_style / "val_labels.txt").write_text("ILSVRC2012_val_00000001.png n09\n")
    with pytest.raises(DataError, match=r"val_labels.txt:1: unknown class 'n09'"):
        load_dataset("folder", "test", imagenet_style)
