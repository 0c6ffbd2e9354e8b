"""Shared fixtures: tiny random MusicGen checkpoints, built once per test session."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels can still be exercised through its interpreter. This must be set
# before anything imports triton, which is why it happens at conftest import time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from fastgen.tiny import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mono_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mono"))


@pytest.fixture(scope="session")
def tiny_stereo_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-stereo"), stereo=True)


@pytest.fixture(scope="session")
def tiny_melody_mono_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from fastgen.tiny_melody import build_tiny_melody_checkpoint
    return build_tiny_melody_checkpoint(tmp_path_factory.mktemp("tiny-melody-mono"))


@pytest.fixture(scope="session")
def tiny_melody_stereo_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from fastgen.tiny_melody import build_tiny_melody_checkpoint
    return build_tiny_melody_checkpoint(tmp_path_factory.mktemp("tiny-melody-stereo"), stereo=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The accelerator when there is one, so the same tests run on CPU CI and on GPU machines."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
