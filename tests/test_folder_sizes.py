"""Image folders use the images' own size when they all share one, warn when images are blown up 2x or
more, record the sizes used, and warn about a model whose class count is not the folder's."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from adasmooth.cli import main
from adasmooth.data import load_dataset
from adasmooth.data.images import ImageOptions

from test_data_folder import CLASSES, pattern, write_class_folders


def pixels(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def upscale_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "resized up" in r.getMessage()]


def test_images_of_one_size_are_used_as_they_are(tmp_path, caplog):
    written = write_class_folders(tmp_path / "test", per_class=(2, 1, 1), size=(32, 32))
    options = ImageOptions()
    with caplog.at_level(logging.WARNING):
        data = load_dataset("folder", "test", tmp_path, image=options)
        x = data.x
    assert data.input_shape == (3, 32, 32) and x.shape == (4, 3, 32, 32)  # before: 224x224, blown up 7x
    assert (options.crop, options.resize) == (32, 32)  # what the run's config then records
    for i, name in enumerate(sorted(written)):
        assert torch.equal(x[i], pixels(written[name]))  # not resized, not cropped: the PNG's values
    assert upscale_warnings(caplog) == []


def test_non_square_images_of_one_size_are_centre_cropped_without_resizing(tmp_path):
    written = write_class_folders(tmp_path / "test", per_class=(1, 1, 1), size=(30, 40))  # 40 wide, 30 high
    data = load_dataset("folder", "test", tmp_path, image=ImageOptions())
    assert data.input_shape == (3, 30, 30)
    first = written[sorted(written)[0]]
    assert torch.equal(data.x[0], pixels(first[:, 5:35]))  # columns (40 - 30) / 2 = 5 .. 35


def test_the_checkpoints_crop_on_images_of_that_size_is_not_resized(tmp_path):
    written = write_class_folders(tmp_path / "test", per_class=(1, 1, 1), size=(16, 16))
    options = ImageOptions(crop=16)  # what ImageOptions.fit gives for a checkpoint trained on 16x16
    data = load_dataset("folder", "test", tmp_path, image=options)
    assert options.resize == 16  # before: round(16 * 8/7) = 18, a blurred and shifted copy
    assert torch.equal(data.x[0], pixels(written[sorted(written)[0]]))


def test_larger_images_of_one_size_keep_the_resize_then_crop_protocol(tmp_path):
    write_class_folders(tmp_path / "test", per_class=(1, 1, 1), size=(300, 300))
    options = ImageOptions(crop=224)
    load_dataset("folder", "test", tmp_path, image=options)
    assert options.resize == 256  # Res256Crop224 as before
    between = ImageOptions(crop=224)
    write_class_folders(tmp_path / "between" / "test", per_class=(1, 1, 1), size=(240, 240))
    load_dataset("folder", "test", tmp_path / "between", image=between)
    assert between.resize == 240  # cropped from the images as they are, not resized up to 256 first


def test_blowing_images_up_2x_or_more_is_a_warning(tmp_path, caplog):
    write_class_folders(tmp_path / "test", per_class=(1, 1, 1), size=(32, 32))
    with caplog.at_level(logging.WARNING):
        options = ImageOptions(crop=224)  # e.g. an ImageNet model on a folder of 32x32 images
        load_dataset("folder", "test", tmp_path, image=options).x
    assert options.resize == 224  # the least blowing up the crop needs
    [message] = upscale_warnings(caplog)
    assert "32x32" in message and "7.0x" in message and "crop 224" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_dataset("folder", "test", tmp_path, image=ImageOptions(crop=48)).x  # 1.5x: no warning
    assert upscale_warnings(caplog) == []


def test_images_of_several_sizes_keep_the_defaults_and_warn_once_when_blown_up(tmp_path, caplog):
    for c, name in enumerate(CLASSES):
        (tmp_path / "test" / name).mkdir(parents=True)
        for k, side in enumerate((20, 24)):
            Image.fromarray(pattern(10 * c + k, side, side)).save(tmp_path / "test" / name / f"{k}.png")
    options = ImageOptions()
    with caplog.at_level(logging.WARNING):
        data = load_dataset("folder", "test", tmp_path, image=options)
        assert data.subset(4).x.shape == (4, 3, 224, 224)
    assert (options.crop, options.resize) == (224, 256)
    [message] = upscale_warnings(caplog)
    assert "20x20" in message and "12.8x" in message


@pytest.fixture(scope="module")
def small_folder_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    write_class_folders(root / "data" / "train", per_class=(4, 4, 4), size=(12, 12))
    write_class_folders(root / "data" / "test", per_class=(2, 2, 2), size=(12, 12))
    code = main(["train-base", "--dataset", "folder", "--data-dir", str(root / "data"), "--arch", "small-cnn",
                 "--epochs", "1", "--batch-size", "6", "--eval-examples", "6", "--eval-pgd-steps", "1",
                 "--eps", "0.03", "--no-progress", "--device", "cpu", "-o", str(root / "model")])
    assert code == 0
    return root


def test_train_and_evaluate_record_the_sizes_used(small_folder_model):
    root = small_folder_model
    info = json.loads((root / "model.json").read_text())
    assert info["input_shape"] == [3, 12, 12]  # the images' own size, not 224
    assert info["training"]["config"]["image"]["crop"] == 12 and info["training"]["config"]["image"]["resize"] == 12
    code = main(["evaluate", "--model", str(root / "model"), "--data-dir", str(root / "data"),
                 "--attacks", "apgd-ce", "--no-progress", "--device", "cpu", "-o", str(root / "eval.json")])
    assert code == 0
    image = json.loads((root / "eval.json").read_text())["config"]["image"]
    assert image["crop"] == 12 and image["resize"] == 12  # before: resize null


def test_a_model_of_another_class_count_than_the_folder_gets_a_warning(small_folder_model, tmp_path, caplog):
    root = small_folder_model
    two = tmp_path / "two"
    write_class_folders(two / "test", per_class=(2, 2, 0), size=(12, 12))  # ant and cat only
    (two / "test" / "dog").rmdir()
    with caplog.at_level(logging.WARNING):
        code = main(["evaluate", "--model", str(root / "model"), "--data-dir", str(two), "--attacks", "apgd-ce",
                     "--no-progress", "--device", "cpu", "-o", str(tmp_path / "eval.json")])
    assert code == 0
    [message] = [r.getMessage() for r in caplog.records if "classes" in r.getMessage()]
    assert f"{root / 'model'} predicts 3 classes but folder test has 2" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the folder it was trained on: no warning
        assert main(["evaluate", "--model", str(root / "model"), "--data-dir", str(root / "data"),
                     "--attacks", "apgd-ce", "--no-progress", "--device", "cpu",
                     "-o", str(tmp_path / "same.json")]) == 0
    assert not [r for r in caplog.records if "classes" in r.getMessage()]
