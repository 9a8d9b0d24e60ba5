"""The model registry, the architectures' shapes and sizes, and the third-party checkpoints."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError
from core.models import KNOWN_CHECKPOINTS, create_model, list_models, register_model

# Too big to run (or even allocate) on a 2-core CI box: built on the meta device, which checks shapes
# without memory or arithmetic.
META_ONLY = {"wrn_34_20", "wrn_70_16", "wrn_70_16_swish"}

EXPECTED_NAMES = {
    "resnet18",
    "resnet34",
    "resnet50",
    "preact_resnet18",
    "mobilenet_v2",
    "wide_resnet",
    "wrn_34_10",
    "wrn_34_20",
    "wrn_70_16",
    "wrn_70_16_swish",
    "tiny_cnn",
    "abcrown_resnet2b",
    "abcrown_resnet4b",
    "cnn_a",
    "conv_small",
}

# Published sizes of the CIFAR architectures (10 classes).
EXPECTED_PARAMS = {
    "resnet18": 11_173_962,
    "mobilenet_v2": 2_296_922,
    "wrn_34_10": 46_160_474,
}

# Clean accuracy on the first 200 test images must clear these floors (chance is 10%). SOURCES.md lists
# 77% / 70% / 67% / 58% / 64% / 63% / 31% on all 1,017 images.
MIN_CLEAN_ACCURACY = {
    "abcrown_cifar10_resnet4b_adv2px.pth": 0.65,
    "abcrown_cifar10_resnet2b_adv2px.pth": 0.55,
    "abcrown_sdp_cifar_cnn_a_adv.model": 0.55,
    "abcrown_sdp_cifar_cnn_a_adv4.model": 0.45,
    "abcrown_oval_cifar_wide_kw.pth": 0.5,
    "abcrown_eran_cifar_conv_small_pgd.pth": 0.5,
    "convex_adversarial_cifar_small_8px.pth": 0.2,
}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_all_documented_names_are_registered() -> None:
    assert set(list_models()) == EXPECTED_NAMES
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_forward_gives_one_logit_per_class(name: str, num_classes: int) -> None:
    device = torch.device("meta") if name in META_ONLY else torch.device("cpu")
    with device:
        model = create_model(name, num_classes=num_classes).eval()
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(x)
    assert logits.shape == (2, num_classes)
    if device.type == "cpu":
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,expected", sorted(EXPECTED_PARAMS.items()))
def test_parameter_counts_match_published_sizes(name: str, expected: int) -> None:
    with torch.device("meta"):
        assert count_params(create_model(name, 10)) == expected


def test_wide_resnet_kwargs_build_the_presets() -> None:
    with torch.device("meta"):
        generic = create_model("wide_resnet", 10, depth=34, widen_factor=10)
        swish = create_model("wide_resnet", 10, depth=70, widen_factor=16, activation="swish")
        assert count_params(generic) == count_params(create_model("wrn_34_10", 10))
        assert count_params(swish) == count_params(create_model("wrn_70_16_swish", 10))
    assert isinstance(swish.relu, torch.nn.SiLU)


def test_small_wide_resnet_trains_with_dropout() -> None:
    model = create_model("wide_resnet", 10, depth=10, widen_factor=1, dropout=0.3).train()
    loss = model(torch.rand(2, 3, 32, 32)).sum()
    loss.backward()
    assert model.conv1.weight.grad is not None


def test_resnet18_uses_the_kuangliu_key_layout() -> None:
    keys = set(create_model("resnet18", 10).state_dict())
    assert {"conv1.weight", "bn1.running_mean", "linear.weight", "linear.bias"} <= keys
    assert "layer2.0.shortcut.0.weight" in keys and "layer2.0.shortcut.1.running_var" in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)  # identity where shapes match
    assert not any("fc" in k for k in keys)


def test_mobilenet_v2_uses_the_kuangliu_key_layout() -> None:
    model = create_model("mobilenet_v2", 10)
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.weight", "conv2.weight", "bn2.weight", "linear.weight"} <= keys
    assert "layers.0.conv3.weight" in keys and "layers.0.shortcut.0.weight" in keys
    assert len(model.layers) == 17
    assert model.conv1.out_channels == 32 and model.conv1.stride == (1, 1)
    assert model.layers[1].conv2.stride == (1, 1)  # the CIFAR change in the 24-channel stage


def test_wrn_34_10_uses_the_trades_key_layout_without_sub_block1() -> None:
    with torch.device("meta"):
        keys = set(create_model("wrn_34_10", 10).state_dict())
    assert {"conv1.weight", "bn1.weight", "fc.weight", "fc.bias"} <= keys
    assert "block1.layer.0.convShortcut.weight" in keys and "block3.layer.4.conv2.weight" in keys
    assert sum(k.endswith("convShortcut.weight") for k in keys) == 3
    assert not any(k.startswith("sub_block1") for k in keys)


def test_preact_resnet18_has_a_final_norm() -> None:
    keys = set(create_model("preact_resnet18", 10).state_dict())
    assert "bn.weight" in keys and "layer2.0.shortcut.0.weight" in keys


@pytest.mark.parametrize("size", [8, 13, 64])
def test_tiny_cnn_takes_any_input_size(size: int) -> None:
    model = create_model("tiny_cnn", 7)
    assert model(torch.rand(3, 3, size, size)).shape == (3, 7)
    assert count_params(model) < 5_000


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet19", 10)
    assert "resnet18" in str(info.value) and "wrn_34_10" in str(info.value)


@pytest.mark.parametrize(
    "name,num_classes,kwargs",
    [
        ("resnet18", 10, {"depth": 18}),
        ("wide_resnet", 10, {"depth": 33}),
        ("wide_resnet", 10, {"widen_factor": 0}),
        ("wide_resnet", 10, {"activation": "gelu"}),
        ("wide_resnet", 10, {"dropout": 1.5}),
        ("tiny_cnn", 0, {}),
        ("tiny_cnn", "10", {}),
    ],
)
def test_bad_arguments_raise_config_error(name: str, num_classes: object, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        create_model(name, num_classes, **kwargs)  # type: ignore[arg-type]


def test_names_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError):
        register_model("resnet18")(lambda num_classes: torch.nn.Linear(1, num_classes))


@pytest.fixture(scope="module")
def cifar10_first_200(shared_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    path = shared_dir / "data" / "cifar-10-batches-py-partial" / "test_batch"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    x = torch.as_tensor(batch["data"][:200]).reshape(-1, 3, 32, 32).float() / 255
    y = torch.as_tensor(batch["labels"][:200])
    return x, y


@pytest.mark.parametrize("filename", sorted(KNOWN_CHECKPOINTS))
def test_third_party_checkpoint_loads_strictly_and_classifies(
    filename: str, shared_dir: Path, cifar10_first_200: tuple[torch.Tensor, torch.Tensor]
) -> None:
    path = shared_dir / "weights" / filename
    if not path.exists():
        pytest.skip(f"{path} is missing")
    info = KNOWN_CHECKPOINTS[filename]
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for step in info.state_dict_path:
        state_dict = state_dict[step]
    model = create_model(info.arch, 10)
    model.load_state_dict(state_dict, strict=True)
    model.eval()

    x, y = cifar10_first_200
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    with torch.no_grad():
        accuracy = (model((x - mean) / std).argmax(1) == y).float().mean().item()
    assert accuracy > MIN_CLEAN_ACCURACY[filename]


@pytest.mark.parametrize("arch", ["abcrown_resnet2b", "abcrown_resnet4b", "cnn_a", "conv_small"])
def test_third_party_heads_follow_num_classes(arch: str) -> None:
    assert create_model(arch, 100)(torch.rand(1, 3, 32, 32)).shape == (1, 100)
