"""Learning-rate selection for the grid (--select-lr): a learning rate per method, chosen on held-out training images,
never on a test split. The protocol (issue 17; method-audit §2.10 proposed it):

  - every entry trains at the 3 learning rates of grid.LR_GRID[its method] (an entry with its own --lr keeps it) on the
    selection seeds (default 100 and 101: disjoint from the finals' seeds, so no final run inherits the luck of the run
    that chose its learning rate), each run with --no-eval-test: it builds no test split at all;
  - the selection set: n_val (default 1,000) validation images per run, held out from the training pool the 800 (or
    k-shot) training images leave unused. data.py draws train first, then val, from one seeded permutation, so the
    training images are those of n_val = 200 (tests/test_bench.py checks it). Two seeds × 1,000 = 2,000 images per
    choice: a standard error of about 0.9 points at 80 % accuracy, against 2.8 for one seed's 200 (method-audit §2.1);
  - the choice: the highest last-epoch validation accuracy (never the best epoch), averaged over the selection seeds
    (and, with --select-on, over those tasks with equal weight: one learning rate per method for every final task;
    without it each final task selects its own); ties go to the smaller learning rate, VPT's rule;
  - recorded in selection_runs.csv (one row per selection run, with the command that reproduces it) and selection.csv
    (per task, method and learning rate: the mean in %, the images behind it, and whether it was chosen).

The selection runs cost what the finals do at two seeds per learning rate, plus evaluating 1,000 validation images
after every epoch (about 40 % of an 800-image training epoch).
"""
from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from .runner import append_row, run_all, run_dir_of

SELECTION_RUN_FIELDS = ["label", "task", "lr", "seed", "n_val", "last_val_acc", "best_val_acc", "best_epoch",
                        "wall_time_s", "command"]
SELECTION_FIELDS = ["task", "method", "lr", "n_seeds", "val_images", "mean_last_val_acc", "chosen"]


@dataclass
class Selection:
    """--select-lr's settings (the module docstring): seeds, validation images per run, the tasks to select on
    (name → train options; None: each final task selects its own), and whether to stop after the choice (no finals:
    --select-only, e.g. to choose on one machine and run the finals on another)."""
    seeds: tuple = (100, 101)
    n_val: int = 1000
    on: dict | None = None
    no_finals: bool = False


def choose_lr(means: dict[float, float]) -> float:
    """The learning rate of the highest mean validation accuracy; a tie goes to the smaller learning rate."""
    return max(sorted(means), key=lambda lr: (means[lr], -lr))


def select_lr(entries: dict, lrs: dict, tasks: dict, sel: Selection, preset: str, out: Path, runs: Path, workers: int,
              threads: int, extra, dry_run: bool = False, only: dict | None = None) -> dict | None:
    """Run (or resume) the selection runs; write selection_runs.csv and selection.csv; return (label, final task) →
    the chosen learning rate (None on a dry run). entries: label → train options; lrs: label → the learning rates
    to try (one: fixed by the entry, nothing runs); tasks: the final tasks (name → train options); only: label →
    {"tasks": ...}, the finals' restriction. No selection run builds a test split (--no-eval-test)."""
    only = only or {}
    scopes = {}  # (label, scope name) → the tasks whose mean decides it; one scope per final task, or one per label
    for label in entries:
        finals = [t for t in tasks if t in only.get(label, {}).get("tasks", tasks)]
        if sel.on is None:
            scopes.update({(label, t): [t] for t in finals})
        else:
            scopes[(label, "+".join(sel.on))] = list(sel.on)
    task_opts = {**tasks, **(sel.on or {})}
    keys = list(dict.fromkeys((label, task, lr, seed) for seed in sel.seeds for (label, _), ts in scopes.items()
                              for task in ts for lr in lrs[label] if len(lrs[label]) > 1))
    root = runs / f"select-val{sel.n_val}"
    jobs = [((label, task, lr, seed), f"select {label} | {task} | lr {lr:g} | seed {seed}",
             run_dir_of(root, label, task, seed, lr),
             ["--preset", preset, *task_opts[task], *entries[label], *extra, "--lr", f"{lr:g}", "--n-val",
              str(sel.n_val), "--no-eval-test", "--seed", str(seed)]) for label, task, lr, seed in keys]
    print(f"learning-rate selection: {len(jobs)} runs | seeds {', '.join(map(str, sel.seeds))} | {sel.n_val} "
          f"validation images each, no test split | runs in {root} | results in {out / 'selection.csv'}", flush=True)
    if dry_run:
        for _, name, _, _ in jobs:
            print(f"  {name}")
        return None
    csv_path = out / "selection_runs.csv"
    seen = {}
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            seen = {(r["label"], r["task"], float(r["lr"]), int(r["seed"]), int(r["n_val"])): r
                    for r in csv.DictReader(f)}
    failed = []
    for (label, task, lr, seed), command, s in run_all(jobs, workers, threads,
                                                       lambda s: f"last-epoch val {100 * s['last_val_acc']:.1f} %"):
        if s is None:
            failed.append((label, task, lr, seed))
            continue
        row = {"label": label, "task": task, "lr": f"{lr:g}", "seed": seed, "n_val": sel.n_val,
               "last_val_acc": s["last_val_acc"], "best_val_acc": s["best_val_acc"], "best_epoch": s["best_epoch"],
               "wall_time_s": round(s["wall_time_s"], 1), "command": command}
        if (label, task, lr, seed, sel.n_val) not in seen:
            append_row(csv_path, row, SELECTION_RUN_FIELDS)
            seen[(label, task, lr, seed, sel.n_val)] = row
    if failed:
        raise RuntimeError(f"{len(failed)} selection runs failed (logs next to their run folders); run the same "
                           "command again to retry them")
    chosen, table = {}, []
    for (label, scope), ts in scopes.items():
        val = lambda t, lr, s: float(seen[(label, t, lr, s, sel.n_val)]["last_val_acc"])
        # the mean over the seeds, then over the tasks (equal weight)
        means = {lr: statistics.mean(statistics.mean(val(t, lr, s) for s in sel.seeds) for t in ts)
                 for lr in lrs[label]} if len(lrs[label]) > 1 else {}
        lr = choose_lr(means) if means else lrs[label][0]
        for t in (ts if sel.on is None else tasks):
            chosen[(label, t)] = lr
        table += [{"task": scope, "method": label, "lr": f"{v:g}", "n_seeds": len(sel.seeds) if means else 0,
                   "val_images": sel.n_val * len(sel.seeds) * len(ts) if means else 0,
                   "mean_last_val_acc": f"{100 * means[v]:.2f}" if means else "", "chosen": int(v == lr)}
                  for v in lrs[label]]
    with open(out / "selection.csv", "w", newline="") as f:
        w = csv.DictWriter(f, SELECTION_FIELDS)
        w.writeheader()
        w.writerows(table)
    print("chosen learning rates: " + "; ".join(f"{label} on {t} {lr:g}" for (label, t), lr in chosen.items()),
          flush=True)
    return chosen


def selection_markdown(path: Path) -> str:
    """selection.csv as a table: the mean last-epoch validation accuracy at each learning rate, the chosen in bold."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    lines = ["| selected on | method | last-epoch val acc (%) at each lr, the chosen in bold | val images per lr |",
             "|---|---|---|---|"]
    for (task, method), rs in groups.items():
        cells = [(f"**{r['lr']}: {r['mean_last_val_acc'] or 'fixed'}**" if r["chosen"] == "1" else
                  f"{r['lr']}: {r['mean_last_val_acc']}") for r in rs]
        lines.append(f"| {task} | {method} | {', '.join(cells)} | {rs[0]['val_images']} |")
    return "\n".join(lines)
