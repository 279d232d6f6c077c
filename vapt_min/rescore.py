"""Scoring trained runs again on the whole test set, from their checkpoints: `python -m vapt_min.bench rescore`.

The default preset scores a run on a fixed, class-balanced subset of the test set (--test-cap 2000, data._capped), and
issue 17's protocol asks for the whole one (10,000 images for CIFAR-10 and MNIST). train.py reads the test split only
after its last step, and the cap never touches the train or validation draw, so a run made with --test-cap 2000 ends
with the weights it would have under --test-cap none: its checkpoints, scored on every test image, give the score it
would have reported. Each score is checked first: the capped images are a subset of the whole set, and the accuracy
on them, read off the same per-image predictions, must equal what the run recorded, to the image.
"""
from __future__ import annotations

import csv
import dataclasses
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .build import build_data, build_loaders, pick_device, use_bf16
from .config import opt
from .data import _capped
from .grid import option_value
from .runner import append_row
from .runs import load_trainable, read_checkpoint
from .train import load_run


@torch.no_grad()
def correct_per_image(model, loader, device, bf16: bool) -> torch.Tensor:
    """1 where the model's prediction is right, 0 where not: one entry per image of `loader`, in its order."""
    model.eval()
    out = []
    for x, y in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, _ = model(x.to(device))
        out.append((logits.argmax(-1).cpu() == y).to(torch.int64))
    return torch.cat(out)


def same_tensors(a: Path, b: Path) -> bool:
    """Do two checkpoints hold the same tensors (names and values)?"""
    from safetensors.torch import load_file
    x, y = (read_checkpoint(p, lambda: load_file(str(p))) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


RESCORE_FIELDS = ["test_images", "recorded_test_images", "recorded_test_acc", "recorded_best_val_test_acc",
                  "rescore_s", "rescore_command"]


def rescore(csv_in, csv_out, command: str | None = None) -> list[dict]:
    """The runs of a per-run CSV (the grid's results.csv: a row per run, its training command naming its folder)
    scored again on their task's whole test set from their checkpoints, written to csv_out as the same columns with
    test_acc (last.safetensors) and best_val_test_acc (best.safetensors) replaced, and the recorded values kept beside.

    Why this is the run's own whole-test score: train.py reads the test split only after its last step, so a run made
    with --test-cap 2000 ends with the same weights it would have under --test-cap none (the cap never touches the
    train or validation draw). The check, per run and checkpoint: the capped images are a subset of the whole set
    (data._capped), and the accuracy on them, read off the same per-image predictions, must equal what the run
    recorded, to the image; otherwise the row is refused (a checkpoint that is not the run's, a changed split or
    transform, or an evaluation that depends on the batch). The training command stays the row's `command` (the compute
    table counts each run once); `rescore_command` is this one. Resumable: rows already in csv_out are skipped."""
    if not csv_out:
        raise ValueError("rescore needs --out FILE: where to write the rescored rows (the input's rows stay as run)")
    csv_in, csv_out = Path(csv_in), Path(csv_out)
    if not csv_in.is_file():
        raise ValueError(f"{csv_in}: no such file (a per-run CSV, e.g. results/issue17/cifar10_vptdeep_lr3e-3.csv)")
    if csv_out.resolve() == csv_in.resolve():
        raise ValueError(f"--out {csv_out} is the input file: write the rescored rows to a new file")
    with open(csv_in, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "command" not in rows[0]:
        raise ValueError(f"{csv_in}: no rows with a command column (a per-run CSV written by python -m vapt_min.bench "
                         "accuracy)")
    done = set()
    if csv_out.is_file():
        with open(csv_out, newline="") as f:
            done = {(r["label"], r["task"], r["seed"]) for r in csv.DictReader(f)}
    jobs = []
    for r in rows:   # every folder is checked before the first is scored: a missing one fails early
        run_dir = option_value(shlex.split(r["command"]), "--out")
        if run_dir is None or not (Path(run_dir) / "last.safetensors").is_file():
            raise ValueError(f"{csv_in}: the run {r['label']} | {r['task']} | seed {r['seed']} has no checkpoint at "
                             f"{run_dir}/last.safetensors: train it again with --test-cap none (its command, in the "
                             "row) instead")
        if (r["label"], r["task"], r["seed"]) not in done:
            jobs.append((r, Path(run_dir)))
    print(f"rescore: {len(rows)} runs in {csv_in}, {len(rows) - len(jobs)} already in {csv_out}", flush=True)
    command = command or f"python -m vapt_min.bench rescore {csv_in} --out {csv_out}"
    out = []
    for r, run_dir in jobs:
        t = time.time()
        model, cfg = load_run(run_dir, "last")
        whole = dataclasses.replace(cfg, test_cap=None, eval_test=True)
        dev = pick_device(whole)
        model.to(dev)
        _, splits = build_data(whole, model.vit.pretrained_cfg)
        loader, labels = build_loaders(whole, splits)[2], splits["test"].labels
        own = None if cfg.test_cap is None else _capped(labels, cfg.test_cap)   # the images the run was scored on
        scores = {}
        for which, col in (("last", "test_acc"), ("best", "best_val_test_acc")):
            if which == "best":
                if not r.get(col):
                    continue   # a run from before the second column
                if same_tensors(run_dir / "last.safetensors", run_dir / "best.safetensors"):
                    scores[col] = scores["test_acc"]   # the best-validation epoch was the last one
                    continue
                load_trainable(model, run_dir / "best.safetensors", cfg)
            ok = correct_per_image(model, loader, dev, use_bf16(whole, dev))
            mine = ok if own is None else ok[own]
            if round(float(r[col]) * len(mine)) != int(mine.sum()):
                raise ValueError(f"{run_dir} ({which}.safetensors): {int(mine.sum())} of the run's own {len(mine)} "
                                 f"test images right now, but it recorded {col} = {r[col]} "
                                 f"({round(float(r[col]) * len(mine))} right): this checkpoint does not score as the "
                                 "run did, so its whole-test score is not the run's; nothing written for it")
            scores[col] = int(ok.sum()) / len(ok)
        recorded_n = len(labels) if own is None else len(own)
        row = {**r, **scores, "test_images": len(labels), "recorded_test_images": recorded_n,
               "recorded_test_acc": r["test_acc"], "recorded_best_val_test_acc": r.get("best_val_test_acc", ""),
               "rescore_s": round(time.time() - t, 1), "rescore_command": command}
        append_row(csv_out, row, [*rows[0].keys(), *RESCORE_FIELDS])
        out.append(row)
        print(f"  {r['label']} | {r['task']} | seed {r['seed']}: test {100 * float(r['test_acc']):.2f} % on "
              f"{recorded_n} images → {100 * scores['test_acc']:.2f} % on {len(labels)}"
              + (f"; best-validation epoch {100 * scores['best_val_test_acc']:.2f} %" if "best_val_test_acc" in scores
                 else "") + f" ({row['rescore_s']:.0f} s)", flush=True)
    return out


@dataclass
class RescoreConfig:
    results: str = opt("", "a per-run CSV (a grid's results.csv, or one committed under results/) whose runs' folders "
                           "still hold their checkpoints", positional=True)
    out: str = opt("", "write the rescored rows here (a run already there is skipped: it resumes)")
