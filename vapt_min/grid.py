"""The accuracy grid: every method × tasks × seeds, each run a `python -m vapt_min.train` process; resumable.

    python -m vapt_min.bench accuracy                           # every method × 3 tasks × 3 seeds (CPU: ~1.5 h)
    python -m vapt_min.bench accuracy --ablation                # + the full V²APT with one part off (lesson 07)
    python -m vapt_min.bench accuracy --preset paper --threads 8 --workers 1   # the papers' protocol, on a GPU
    python -m vapt_min.bench accuracy --report                  # redraw results.md and the plot from results.csv

`--workers` runs at a time, `--threads` torch threads each (2 cores: 2 × 1, never 2 × 2). A finished run
(summary.json) is read, not re-run; an interrupted one continues with --resume; one cut before its first epoch
restarts. Each finished run appends a row to results.csv with the exact command that reproduces it (same machine, same
thread count, same torch: the same numbers); at the end, results.md (mean ± std, trainable parameters and %) and
accuracy_vs_params.png. The main thread collects the results; the worker threads only run processes.
"""
from __future__ import annotations

import concurrent.futures
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import METHODS, PRESETS, opt, parser_for

TASKS = {  # name → the train options that select it
    "cifar10-1k": ["--dataset", "cifar10"],
    "mnist-1k": ["--dataset", "mnist"],
    # 20 epochs: at the preset's 8, 100 images make 32 steps, too few for prompts to converge (seed 0: VPT-Deep 39.7 %
    # test at 8 epochs, below the linear probe's 49.0 %); 20 is the default preset's, README's low-data protocol.
    "cifar10-10shot": ["--dataset", "cifar10", "--protocol", "shots", "--shots", "10", "--epochs", "20"],
}
ENTRIES = {m: ["--method", m] for m in METHODS}  # row label → train options: every method at its defaults
ABLATION = {  # the full V²APT with one part off (lesson 07); with all parts off it is VPT-Deep
    # −vae keeps the instance slots as static prompts: the other parts keep their prompt counts (not a confound)
    "full-v2apt −vae": ["--method", "full-v2apt", "--no-vae", "--no-vae-slots", "static"],
    "full-v2apt −pca": ["--method", "full-v2apt", "--no-pca"],
    "full-v2apt −guide": ["--method", "full-v2apt", "--no-guide"],
    "full-v2apt −bias": ["--method", "full-v2apt", "--no-kv-bias"],
    "full-v2apt −pca −guide": ["--method", "full-v2apt", "--no-pca", "--no-guide"],  # the two that cost most, both off
}
CSV_FIELDS = ["label", "task", "seed", "test_acc", "best_val_acc", "trainable_params", "trainable_pct", "wall_time_s",
              "device", "precision", "command"]
# the swap test and the latent's information on the validation split (summary.json's probe; empty without a generator
# or a latent): does the row's generator use the image? A results.csv begun before these columns keeps its own header.
PROBE_FIELDS = ["val_acc_own", "val_acc_swapped", "val_acc_null", "val_changed_swapped", "mi_bits_val"]


def probe_columns(summary: dict) -> dict:
    """summary.json's probe → the grid's probe columns ("" where the run has no generator or no latent)."""
    swap, latent = summary.get("probe", {}).get("swap"), summary.get("probe", {}).get("latent")
    cols = dict.fromkeys(PROBE_FIELDS, "")
    if swap:
        cols.update(val_acc_own=swap["acc_own"], val_acc_swapped=swap["acc_swapped"], val_acc_null=swap["acc_null"],
                    val_changed_swapped=swap["changed_swapped"])
    if latent:
        cols["mi_bits_val"] = latent["mi_bits"]
    return cols


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores{gpu}, torch {torch.__version__}"


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "test_acc": float(r["test_acc"]),
                 "trainable_params": int(r["trainable_params"]), "trainable_pct": float(r["trainable_pct"])}
                for r in csv.DictReader(f)]


def csv_header(path: Path) -> list[str] | None:
    """The columns of an existing results.csv (rows are appended under its own header), or None for a new one."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sample std of test accuracy (%) over seeds, per (label, task), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["task"]), []).append(r)
    out = []
    for (label, task), rs in groups.items():
        accs = [100 * r["test_acc"] for r in rs]
        out.append({"label": label, "task": task, "n": len(accs), "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": sorted(r["seed"] for r in rs),
                    "trainable_params": rs[0]["trainable_params"], "trainable_pct": rs[0]["trainable_pct"]})
    return out


def results_markdown(rows: list[dict], tasks: list[str]) -> str:
    """One row per label: test accuracy mean ± std per task (n seeds when fewer than the most), trainable params, %."""
    summ = {(r["label"], r["task"]): r for r in summarise(rows)}
    known = [*ENTRIES, *ABLATION]  # the package's order, not the order in which parallel runs happened to finish
    seen = list(dict.fromkeys(r["label"] for r in rows))
    labels = sorted(seen, key=lambda l: (known.index(l), 0) if l in known else (len(known), seen.index(l)))
    most = max((r["n"] for r in summ.values()), default=0)
    lines = ["| method | trainable params | trainable % | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
    for label in labels:
        first = next(summ[(label, t)] for t in tasks if (label, t) in summ)
        cells = []
        for t in tasks:
            r = summ.get((label, t))
            fewer = f" (n={r['n']})" if r is not None and r["n"] < most else ""
            cells.append("—" if r is None else f"{r['mean']:.1f} ± {r['std']:.1f}{fewer}")
        lines.append(f"| {label} | {first['trainable_params']:,} | {first['trainable_pct']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: Path, tasks: list[str], header: str = "") -> str:
    """Write results.md and accuracy_vs_params.png from results.csv; returns the markdown."""
    import matplotlib.pyplot as plt

    from .plots import plot_grid_results
    rows = read_results(out / "results.csv")
    if not rows:
        raise ValueError(f"{out / 'results.csv'} holds no results yet: run python -m vapt_min.bench accuracy "
                         f"--out {out}")
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)] or list(dict.fromkeys(r["task"] for r in rows))
    old = (out / "results.md").read_text() if (out / "results.md").is_file() else ""
    if not header and old.startswith("Test accuracy"):
        header = old.split("\n\n")[0] + "\n\n"   # --report keeps the command, machine and date of the run
    md = header + results_markdown(rows, tasks) + "\n"
    (out / "results.md").write_text(md)
    summary = summarise(rows)
    have = {(r["label"], r["task"]) for r in summary}
    complete = {label for label, _ in have if all((label, t) in have for t in tasks)}  # the plot: rows with every task
    fig = plot_grid_results([r for r in summary if r["label"] in complete and r["task"] in tasks], tasks)
    fig.savefig(out / "accuracy_vs_params.png", dpi=110)
    plt.close(fig)
    return md


def grid_jobs(entries: dict, tasks: dict, seeds, only: dict | None = None) -> list[tuple[str, str, int]]:
    """(label, task, seed) for every entry on every task and seed, or only on `only[label]`'s {"tasks": [...],
    "seeds": [...]}. Seed-major: after the first third every (method, task) has one result, whatever stops the grid."""
    only = only or {}
    return [(label, task, seed) for seed in seeds for task in tasks for label in entries
            if task in only.get(label, {}).get("tasks", tasks) and seed in only.get(label, {}).get("seeds", seeds)]


def run_one(job, entries: dict, tasks: dict, preset: str, runs: Path, threads: int, extra) -> tuple[Path, str, int]:
    """Run (or resume, or skip) one grid run in its own process; returns its folder, its command and the exit code."""
    label, task, seed = job
    run_dir = runs / label.replace(" ", "_") / task / f"seed{seed}"
    args = ["--preset", preset, *tasks[task], *entries[label], "--seed", str(seed), *extra, "--out", str(run_dir)]
    command = f"OMP_NUM_THREADS={threads} python -m vapt_min.train " + shlex.join(args)
    if (run_dir / "summary.json").is_file():
        return run_dir, command, 0
    if (run_dir / "train_state.pt").is_file():     # interrupted after an epoch: continue it
        args = ["--resume", str(run_dir)]
    elif run_dir.exists():                         # interrupted before its first epoch finished: nothing to keep
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir.parent / f"seed{seed}.log", "w") as f:
        rc = subprocess.run([sys.executable, "-m", "vapt_min.train", *args, "--no-progress"], env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    return run_dir, command, rc


def accuracy(entries: dict, tasks: dict, seeds=(0, 1, 2), preset: str = "cpu", out="results/cpu", runs=None,
             workers: int = 2, threads: int = 1, extra=(), dry_run: bool = False, only: dict | None = None,
             command: str | None = None) -> list[dict]:
    """Run (or resume) the grid; append each finished run to out/results.csv; write results.md and the plot.
    entries: row label → train options; tasks: name → train options; only: label → {"tasks": ..., "seeds": ...}."""
    out, runs = Path(out), Path(runs or f"runs/bench-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    have = {(r["label"], r["task"], r["seed"]) for r in read_results(csv_path)}
    jobs = grid_jobs(entries, tasks, seeds, only)
    finished = sum((runs / l.replace(" ", "_") / t / f"seed{s}" / "summary.json").is_file() for l, t, s in jobs)
    print(f"accuracy grid: {len(entries)} entries, {len(tasks)} tasks, seeds {', '.join(map(str, seeds))}: {len(jobs)} "
          f"runs ({finished} finished before) | preset {preset} | {workers} workers × {threads} threads | runs in "
          f"{runs} | results in {csv_path}", flush=True)
    if dry_run:
        for label, task, seed in jobs:
            print(f"  {label} | {task} | seed {seed}")
        return []
    rows, failed, started, ran = {}, [], time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run_one, job, entries, tasks, preset, runs, threads, extra): job for job in jobs}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            (label, task, seed), (run_dir, cmd, rc) = futures[future], future.result()
            if rc:
                log = run_dir.parent / f"seed{seed}.log"
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                print(f"FAILED {label} | {task} | seed {seed} (exit {rc}); log {log}:\n{tail}", flush=True)
                failed.append(futures[future])
                continue
            s = json.loads((run_dir / "summary.json").read_text())
            row = {"label": label, "task": task, "seed": seed, "test_acc": s["test_acc"],
                   "best_val_acc": s["best_val_acc"], "trainable_params": s["trainable_params"],
                   "trainable_pct": s["trainable_pct"], "wall_time_s": round(s["wall_time_s"], 1),
                   "device": s["device"], "precision": s["precision"], **probe_columns(s), "command": cmd}
            if (label, task, seed) not in have:
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, csv_header(csv_path) or CSV_FIELDS[:-1] + PROBE_FIELDS + ["command"],
                                       extrasaction="ignore")
                    if f.tell() == 0:
                        w.writeheader()
                    w.writerow(row)
                have.add((label, task, seed))
                ran += 1
            rows[futures[future]] = row
            left = len(jobs) - done
            eta = (time.time() - started) / ran * left if ran and left else 0
            print(f"[{done}/{len(jobs)}] {label} | {task} | seed {seed}: test {100 * s['test_acc']:.1f} % "
                  f"({s['wall_time_s']:.0f} s){f' | about {eta / 60:.0f} min left' if eta else ''}", flush=True)
    header = (f"Test accuracy (%) over seeds {', '.join(map(str, seeds))}: "
              f"`{command or f'python -m vapt_min.bench accuracy --preset {preset}'}`, {workers} workers × {threads} "
              f"threads; {machine()}; {time.strftime('%Y-%m-%d')}.\n\n")
    print(report(out, list(tasks), header))
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed (logs next to their run folders); run the same command again "
                           "to retry them")
    return [rows[job] for job in jobs if job in rows]


def row_label(text: str) -> str:
    """The ablation labels use a minus sign (−); the ASCII hyphen a shell user types works too."""
    return text.replace(" -", " −")


@dataclass
class GridConfig:
    methods: list[str] = opt(list(ENTRIES), "row labels: the methods, and the full V²APT ablation ("
                             + ", ".join(ABLATION) + "; a hyphen for the minus sign works too)",
                             choices=list(ENTRIES) + list(ABLATION), type=row_label)
    ablation: bool = opt(False, "add the full V²APT ablation rows (on cifar10-1k and the ablation seeds)")
    ablation_seeds: list[int] = opt([0, 1], "the ablation's seeds")
    tasks: list[str] = opt(list(TASKS), "tasks", choices=list(TASKS))
    seeds: list[int] = opt([0, 1, 2], "seeds")
    preset: str = opt("cpu", "train preset: cpu (8 epochs, 1,000 test images: about 1.5 h on 2 cores) or paper "
                             "(224 px, 100 epochs: a GPU)", choices=list(PRESETS))
    out: str | None = opt(None, "results folder (default: results/<preset>)")
    runs: str | None = opt(None, "run folders (default: runs/bench-<preset>)")
    workers: int = opt(2, "runs at a time")
    threads: int = opt(1, "torch threads per run (part of what makes a row reproducible)")
    entry: list[str] = opt([], "rows of your own, each 'LABEL: TRAIN OPTIONS' (e.g. 'viapt, dropout on all: --method "
                               "viapt --prompt-dropout-on all'); with them, --methods defaults to none")
    extra: list[str] = opt([], "train options added to every run, as one string (e.g. '--test-cap 2000')")
    dry_run: bool = opt(False, "list the runs and exit")
    report: bool = opt(False, "only rewrite results.md and the plot from results.csv")


def main(a: GridConfig, argv: list[str]):
    out = Path(a.out or f"results/{a.preset}")
    if a.report:
        print(report(out, a.tasks))
        return
    methods = [] if a.entry and "--methods" not in argv else a.methods
    entries = {m: {**ENTRIES, **ABLATION}[m] for m in methods}
    for spec in a.entry:
        label, sep, options = spec.partition(":")
        if not sep or not label.strip() or not options.split():
            raise ValueError(f"--entry {spec!r}: use 'LABEL: TRAIN OPTIONS', e.g. 'vapt lr 3e-4: --method vapt "
                             "--lr 3e-4'")
        entries[label.strip()] = shlex.split(options)
    if a.ablation:
        entries.update(ABLATION)
    # --ablation adds lesson 07's rows on CIFAR-10-1k and the ablation seeds; one named in --methods runs everywhere
    only = {label: {"tasks": ["cifar10-1k"], "seeds": a.ablation_seeds} for label in ABLATION if label not in a.methods}
    accuracy(entries, {t: TASKS[t] for t in a.tasks}, a.seeds, a.preset, out, a.runs, a.workers, a.threads,
             extra=[o for e in a.extra for o in shlex.split(e)], dry_run=a.dry_run, only=only,
             command=shlex.join(["python", "-m", "vapt_min.bench", *argv]))


def add_parser(sub) -> None:
    parser_for(GridConfig, sub.add_parser("accuracy", help="test accuracy of every method on 3 tasks × 3 seeds "
                                          "(resumable)", allow_abbrev=False))
