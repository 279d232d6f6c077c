"""The run folder: what a training run writes, how it resumes, and how a damaged file is reported.

    runs/<method>-<dataset>-seed<seed>-<time>/
        config.json        the Config, as given (--resume reads it back)
        classes.json       class names in label order
        metrics.jsonl      one line per finished epoch
        last.safetensors   the trainable tensors after the last epoch, plus the generator's buffers (ViaPT's running
                           PCA statistics, DA-VPT's class map): never the frozen backbone
        best.safetensors   the same, at the best validation accuracy
        train_state.pt     optimizer, scheduler, epoch, step, best, the RNG states: what --resume needs besides
        summary.json       the final metrics, once the run has finished

Every checkpoint is written to a temporary name and renamed, so a crash mid-write never leaves half a file. A file
that cannot be read gives one line naming it, what is wrong and the way out (ValueError: exit code 2 in the CLI).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written checkpoint behind


def read_checkpoint(path: Path, read):
    """`read()`, or one line naming the damaged file and the way out (a crash or a full disk mid-copy, a file of
    another kind): ValueError, which the CLI turns into exit code 2 before anything is written."""
    try:
        return read()
    except Exception as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {(str(e).splitlines() or ['unreadable'])[0]}): "
                         f"resume from another run folder (or from a copy made before the damage), or start a new run "
                         f"with --out") from None


def read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}; pass the folder of an earlier run")
    return read_checkpoint(path, lambda: json.loads(path.read_text()))


def run_folder(cfg) -> tuple[Path, dict | None]:
    """--resume's folder and its train state, or --out (or a new runs/<method>-<dataset>-seed<seed>-<time>) and None.
    Never a folder that holds another run, nor a finished run to resume (that would only overwrite its summary)."""
    dataset = cfg.dataset.replace(":", "_").replace("/", "_")
    name = f"{cfg.method}-{dataset}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.resume or cfg.out or Path("runs") / name)
    if not cfg.resume:
        if (out / "metrics.jsonl").exists():
            raise FileExistsError(f"{out} already holds a run: pass --resume {out} to continue it, or --out another "
                                  "folder")
        return out, None
    path = out / "train_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {out}: no train_state.pt there; pass the folder of an earlier run")
    st = read_checkpoint(path, lambda: torch.load(path, weights_only=False, map_location="cpu"))
    if st["epoch"] + 1 >= cfg.epochs or (cfg.max_steps is not None and st["step"] >= cfg.max_steps):
        raise ValueError(f"--resume {out}: that run already finished (epoch {st['epoch'] + 1} of {cfg.epochs}, step "
                         f"{st['step']}); pass a larger --epochs or --max-steps to train on")
    return out, st


def start_run(out: Path, config: dict, classes: list[str], resumed_after: int | None):
    """Write config.json and classes.json; on --resume, drop the metrics lines of epochs after the checkpoint's."""
    out.mkdir(parents=True, exist_ok=True)
    for name, obj in (("config.json", config), ("classes.json", classes)):
        atomic_write(out / name, lambda p: p.write_text(json.dumps(obj, indent=1)))  # other ranks may be reading it
    metrics = out / "metrics.jsonl"
    if resumed_after is not None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        metrics.write_text("".join(l + "\n" for l in lines if json.loads(l)["epoch"] <= resumed_after))


def trainable_state(model: nn.Module) -> dict:
    """What a checkpoint holds: the trainable tensors, plus the generator's buffers (method state such as ViaPT's
    running PCA statistics or DA-VPT's class map). Copies on every device: a snapshot that loading another checkpoint
    into the model leaves alone (a plain .cpu() would share the parameters' storage on the CPU alone)."""
    def copy(t):
        return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    state = {k: copy(p) for k, p in model.named_parameters() if p.requires_grad}
    state.update({k: copy(b) for k, b in model.named_buffers() if k.startswith("generator.")})
    return state


def load_trainable(model: nn.Module, path: Path, cfg):
    """Put a checkpoint's tensors (`trainable_state`) into `model` once their names and shapes are checked."""
    state = read_checkpoint(path, lambda: load_file(str(path)))
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
    if got != expected:
        shapes = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(got.keys() & expected.keys())
                  if got[k] != expected[k]]
        raise ValueError(f"checkpoint {path} does not match method {cfg.method!r} on {cfg.model}: missing "
                         f"{sorted(expected.keys() - got.keys())[:3]}, unexpected "
                         f"{sorted(got.keys() - expected.keys())[:3]}, other shapes {shapes[:3]}; the options that "
                         "shape the model must be the run's")
    model.load_state_dict(state, strict=False)


def save_epoch(out: Path, row: dict, model: nn.Module, improved: bool, train_state: dict):
    """After an epoch: its metrics line, then the checkpoints, each written atomically."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    state = trainable_state(model)
    if improved:
        atomic_write(out / "best.safetensors", lambda p: save_file(state, str(p)))
    atomic_write(out / "last.safetensors", lambda p: save_file(state, str(p)))
    atomic_write(out / "train_state.pt", lambda p: torch.save(train_state, p))


def nonfinite_loss(out: Path, epoch: int, step: int, batch: int, terms: dict) -> FloatingPointError:
    """The error for a NaN or infinite loss, stopped before its optimizer step: where, every term, and what to do."""
    where = (f"non-finite loss in epoch {epoch + 1}, step {step + 1} (batch {batch + 1} of the epoch): "
             + ", ".join(f"{k} {v:.4g}" for k, v in terms.items()) + "; stopped before the optimizer step. ")
    if epoch == 0:
        return FloatingPointError(where + f"No epoch finished, nothing to resume: run again with --out {out} and a "
                                          "lower --lr (or --precision fp32)")
    return FloatingPointError(where + f"{out} still holds the checkpoint of epoch {epoch}: continue with --resume "
                                      f"{out} and a lower --lr (or --precision fp32)")


def markdown_table(rows: list[dict], columns: dict) -> str:
    """A markdown table: `columns` maps each header to a function of the row that gives the cell's text."""
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(str(cell(r)) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    """The summary table a finished run prints."""
    return markdown_table(rows, {
        "method": lambda r: r["method"], "dataset": lambda r: r["dataset"], "seed": lambda r: r["seed"],
        "best val": lambda r: f"{r['best_val_acc']:.3f}", "last val": lambda r: f"{r['last_val_acc']:.3f}",
        "test": lambda r: "—" if r["test_acc"] is None else f"{r['test_acc']:.3f}",  # None: --no-eval-test
        "trainable params": lambda r: f"{r['trainable_params']:,}",
        "trainable %": lambda r: f"{r['trainable_pct']:.3f}", "train img/s": lambda r: f"{r['train_img_per_s']:.1f}",
        "wall s": lambda r: f"{r['wall_time_s']:.0f}"})
