"""Shared test helpers: `need` for tests that read prepared data, and the `root` fixture."""
import os
import pathlib

import pytest
import torch

from vapt_min.data import data_root
from vapt_min.vit import ViT

PREPARE = "python data/prepare.py --from ../shared/data"


def need(path) -> pathlib.Path:
    """`path` if it exists. Otherwise skip locally, but fail in CI, where missing data is a set-up bug."""
    path = pathlib.Path(path)
    if not path.exists():
        message = f"{path} not found; run `{PREPARE}` (or set VAPT_MIN_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def root() -> pathlib.Path:
    return data_root()


def tiny_vit(seed=0, dim=48, depth=3) -> ViT:
    """A random 3-block ViT on 32 px images with 8 px patches (16 patches): fast enough for any unit test."""
    torch.manual_seed(seed)
    return ViT(img_size=32, patch_size=8, dim=dim, depth=depth, num_heads=3, num_classes=0)


def block_inputs(model, x) -> list:
    """The sequence entering every block of a PromptedViT, captured with forward pre-hooks."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone())) for b in model.vit.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen
