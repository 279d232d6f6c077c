"""The lessons' scale: the CPU budget of their saved outputs, or the papers' scale on a GPU, by one switch.

    VAPT_MIN_SCALE=paper jupyter lab lessons/      # 224 px, the full 1k training split, the full test set, 100 epochs

Every lesson takes its training budget from `lesson_budget(...)` and its device from `lesson_device()`. Without the
variable (or with VAPT_MIN_SCALE=cpu) the budget is what the lesson wrote, the one its saved outputs and
`pytest --nbval` were made with; the device is the GPU when there is one (numbers then differ from the saved ones a
little: other kernels, other rounding). With VAPT_MIN_SCALE=paper the budget becomes the `paper` preset of train.py:
meant for a GPU, hours on a CPU.
"""
from __future__ import annotations

import os

import torch

ENV = "VAPT_MIN_SCALE"
SCALES = ("cpu", "paper")


def scale() -> str:
    s = os.environ.get(ENV, "cpu").strip().lower() or "cpu"
    if s not in SCALES:
        raise ValueError(f"{ENV}={s!r}: use one of {', '.join(SCALES)} (cpu: the saved outputs' budget; paper: a GPU)")
    return s


def lesson_budget(**cpu) -> dict:
    """The lesson's Config options: `cpu` as given, or at paper scale 224 px, 100 epochs, the whole test set, and the 1k
    protocol's 800/200 images where the lesson draws a smaller vtab1k split (few-shot protocols keep their shots)."""
    if scale() == "cpu":
        return dict(cpu)
    from .train import PRESETS
    paper = {**cpu, **PRESETS["paper"], "num_workers": min(8, os.cpu_count() or 1)}
    if cpu.get("protocol", "vtab1k") == "vtab1k":
        paper.update(n_train=800, n_val=200)
    return paper


def lesson_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
