"""Shared test helpers: `need` for tests that read prepared data, the `root` fixture, `run_main` and `cli_here` for the
CLIs."""
import os
import pathlib
import subprocess
import warnings

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


def run_main(main, argv, capfd) -> subprocess.CompletedProcess:
    """`python -m <module> argv` in this process: `main(argv)` with its exit code, stdout and stderr (file descriptors
    too, so C-level writes count), and every warning it raised appended to stderr as a child process would print it.
    A child costs 4-9 s of interpreter and torch start-up here, so the error-path tests call main in-process; a few
    tests still start real processes (test_train.py: a short run and a kill; test_config.py: an unknown option)."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            main(list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capfd.readouterr()
    err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(list(argv), code, out, err)


@pytest.fixture
def cli_here(capfd):
    """`python -m vapt_min.train ARGS` in this process (run_main): cli_here(*args) → exit code, stdout, stderr."""
    from vapt_min.train import main
    return lambda *args: run_main(main, args, capfd)
