"""Shared fixtures and hardware markers: tests that need TensorRT or CUDA skip with a reason."""

import importlib.util

import pytest


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_trt = importlib.util.find_spec("tensorrt") is not None and _has_cuda()
    has_cuda = _has_cuda()
    for item in items:
        if "needs_tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and an NVIDIA GPU"))
        if "needs_cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA"))
