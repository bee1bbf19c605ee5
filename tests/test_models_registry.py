"""The model registry: a model registered in a test is built by create_model and round-trips through a
checkpoint; unknown names list the known ones; the recorded input shape is enforced."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adasmooth.core.errors import ConfigError, InputError
from adasmooth.models import MODELS, StagedModel, create_model, list_models, register_model
from adasmooth.models.checkpoint import load_checkpoint, save_checkpoint


class _Toy(StagedModel):
    stage_names = ("stem", "body", "head")

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 3):
        super().__init__()
        self.stem = nn.Flatten()
        self.body = nn.LazyLinear(width)
        self.head = nn.Linear(width, num_classes)


@pytest.fixture
def toy_models():
    register_model("toy")(_Toy)
    register_model("toy-family", pattern=r"toy-(?P<width>\d+)", shown_as="toy-<width>")(_Toy)
    yield
    MODELS.remove("toy")
    MODELS.remove("toy-family")


def test_registered_model_is_built_and_listed(toy_models):
    model = create_model("toy", 4, 1, width=5)
    assert isinstance(model, _Toy) and model.head.out_features == 4 and model.body.out_features == 5
    assert model.spec.name == "toy" and model.spec.kwargs == {"width": 5}
    assert "toy" in list_models() and "toy-<width>" in list_models()
    # A name pattern turns its groups into keyword arguments.
    wide = create_model("toy-7", 4, 1)
    assert wide.body.out_features == 7 and wide.spec.kwargs == {"width": 7}


def test_registered_model_round_trips_through_a_checkpoint(toy_models, tmp_path):
    model = create_model("toy-6", 3, 1, input_shape=(1, 2, 2)).eval()
    x = torch.rand(4, 1, 2, 2)
    with torch.no_grad():
        expected = model(x)
    save_checkpoint(model, tmp_path / "toy")
    loaded, info = load_checkpoint(tmp_path / "toy")
    assert info["architecture"] == "toy-6" and loaded.body.out_features == 6
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_registry_entries_are_gone_after_the_fixture():
    assert "toy" not in MODELS and "toy-<width>" not in list_models()


def test_registering_a_name_twice_is_refused(toy_models):
    with pytest.raises(ValueError, match="registered twice"):
        register_model("toy")(_Toy)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        create_model("no-such-model-xyz", 10)
    message = str(err.value)
    assert message.startswith("unknown model 'no-such-model-xyz'; known: ")
    for name in ("small-cnn", "mlp", "resnet18", "preact-resnet18", "wideresnet", "wrn-<depth>-<width>"):
        assert name in message
    with pytest.raises(ConfigError, match="unknown model 'wrn-34'"):
        create_model("wrn-34", 10)


def test_input_shape_is_recorded_and_enforced():
    model = create_model("small-cnn", 10, 1, width=4, hidden=8, input_shape=(1, 8, 8), dataset="digits")
    assert model.spec.input_shape == (1, 8, 8) and model.spec.dataset == "digits"
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(InputError) as err:
        model(torch.rand(3, 1, 28, 28))
    assert "(1, 8, 8)" in str(err.value) and "(1, 28, 28)" in str(err.value)
    with pytest.raises(InputError, match="expects inputs"):
        model(torch.rand(3, 1, 8, 9))
    # Without an input shape the same architecture takes any size, as before.
    free = create_model("small-cnn", 10, 1, width=4, hidden=8)
    assert free.spec.input_shape is None
    assert free(torch.rand(2, 1, 28, 28)).shape == (2, 10) and free(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("shape,fragment", [((3, 8, 8), "has 3 channels but in_channels is 1"),
                                            ((1, 8), "must be (C, H, W)"),
                                            ((1, 0, 8), "must be (C, H, W)")])
def test_bad_input_shape_is_a_config_error(shape, fragment):
    with pytest.raises(ConfigError) as err:
        create_model("small-cnn", 10, 1, input_shape=shape)
    assert fragment in str(err.value)
