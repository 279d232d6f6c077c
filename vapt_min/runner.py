"""The grid's runner: each run a `python -m vapt_min.train` process in its own folder, a pool of them, resumable; the
CSV files the main thread appends their rows to. Used by the finals (grid.py) and the learning-rate selection
(selection.py) alike.

A finished run (summary.json) is read, not re-run; one interrupted after an epoch continues with --resume; one cut
before its first epoch finished restarts. The worker threads only run processes; the caller, in the main thread,
writes every file.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

TRAIN = [sys.executable, "-m", "vapt_min.train"]  # how a run starts (the tests start it through a wrapper)


def csv_header(path: Path) -> list[str] | None:
    """The columns of an existing results.csv (rows are appended under its own header), or None for a new one."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f))


def append_row(path: Path, row: dict, fields: list[str]):
    """One row under the file's own header (or `fields` for a new file)."""
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, csv_header(path) or fields, extrasaction="ignore")
        if f.tell() == 0:
            w.writeheader()
        w.writerow(row)


def run_dir_of(runs: Path, label: str, task: str, seed: int, lr: float | None = None) -> Path:
    """runs/<label>/<task>/seed<s>, or runs/<label>/<task>/lr<lr>/seed<s> for a learning rate chosen by the grid."""
    base = runs / label.replace(" ", "_") / task
    return (base if lr is None else base / f"lr{lr:g}") / f"seed{seed}"


def trained_to_the_end(run_dir: Path) -> bool:
    """Every epoch done (metrics.jsonl reaches config.json's epochs) but no summary.json: the run was cut while scoring
    test or writing its summary. --resume refuses a finished run, so the runner starts it again."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        rows = (run_dir / "metrics.jsonl").read_text().splitlines()
        last = json.loads(rows[-1]) if rows else None
    except (OSError, ValueError):
        return False
    return last is not None and (last.get("epoch", 0) >= cfg.get("epochs", float("inf"))
                                 or last.get("step", 0) >= (cfg.get("max_steps") or float("inf")))


def check_reuse(run_dir: Path, args: list[str]):
    """A finished run is reused by its folder name alone; refuse it (ValueError) when it trained another method or
    another V²APT recipe than `args` now mean. V²APT's defaults changed on 2026-12-01 (issue 16): a folder of the
    paper's letter under the label v2apt must not pass for the new default."""
    if not (run_dir / "config.json").is_file():
        return
    from dataclasses import fields
    from .build import vae_recipe
    from .config import Config
    from .train import config_from_args
    saved = json.loads((run_dir / "config.json").read_text())
    known = {f.name for f in fields(Config)}
    # a folder written before an option existed trained at that option's old default
    old = Config(**{"encode_at": 0, "film_init": "small", "free_bits": 0.0, "network_lr_scale": 1.0,
                    **{k: v for k, v in saved.items() if k in known}})
    new = config_from_args([*args, "--out", str(run_dir)])
    if (old.method, vae_recipe(old)) != (new.method, vae_recipe(new)):
        raise ValueError(f"{run_dir} holds a run of --method {old.method} {vae_recipe(old) or ''}, but this entry now "
                         f"means --method {new.method} {vae_recipe(new) or ''}: give the entry another label (or "
                         "another --runs folder), or move that folder away")


def run_one(run_dir: Path, args: list[str], threads: int) -> tuple[str, int, bool]:
    """Run (or resume, or skip) one run of `args` (train options) in its own process, in run_dir; returns the command
    that reproduces it, the exit code, and whether a process ran (False: it had finished before)."""
    args = [*args, "--out", str(run_dir)]
    command = f"OMP_NUM_THREADS={threads} python -m vapt_min.train " + shlex.join(args)
    if (run_dir / "summary.json").is_file():
        return command, 0, False
    if (run_dir / "train_state.pt").is_file() and not trained_to_the_end(run_dir):  # cut after an epoch: continue
        args = ["--resume", str(run_dir)]
    elif run_dir.exists():  # cut before its first epoch ended, or after its last one but before summary.json: again
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as f:
        rc = subprocess.run([*TRAIN, *args, "--no-progress"], env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return command, rc, True


def run_all(jobs: list[tuple], workers: int, threads: int, result):
    """Run jobs [(key, name, run_dir, train options)] `workers` at a time; yield (key, command, summary) as each ends,
    summary None for a failed run (the tail of its log printed). result(summary) → the progress line's figure. The
    caller, in the main thread, writes every file."""
    started, ran = time.time(), 0
    for _, _, run_dir, args in jobs:          # before any process starts: a stale folder is an error, not a result
        check_reuse(run_dir, args)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_one, run_dir, args, threads): (key, name, run_dir)
                   for key, name, run_dir, args in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            (key, name, run_dir), (command, rc, fresh) = futures[future], future.result()
            ran += fresh
            if rc:
                log = run_dir.parent / f"{run_dir.name}.log"
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                print(f"FAILED {name} (exit {rc}); log {log}:\n{tail}", flush=True)
                yield key, command, None
                continue
            s = json.loads((run_dir / "summary.json").read_text())
            left = len(jobs) - done
            eta = (time.time() - started) / ran * left if ran and left else 0
            print(f"[{done}/{len(jobs)}] {name}: {result(s)} ({s['wall_time_s']:.0f} s)"
                  f"{f' | about {eta / 60:.0f} min left' if eta else ''}", flush=True)
            yield key, command, s
