"""The accuracy grid: every method × tasks × seeds, each run a `python -m vapt_min.train` process; resumable.

    python -m vapt_min.bench accuracy                           # every method × 3 tasks × 3 seeds (CPU: ~1.5 h)
    python -m vapt_min.bench accuracy --ablation                # + the full V²APT with one part off (lesson 07)
    python -m vapt_min.bench accuracy --preset paper --threads 8 --workers 1   # the papers' protocol, on a GPU
    python -m vapt_min.bench accuracy --select-lr --preset default --extra '--test-cap none'   # issue 17's protocol
    python -m vapt_min.bench accuracy --select-lr --select-on cifar10-1k --dry-run            # list its runs
    python -m vapt_min.bench accuracy --select-lr --select-only --tasks cifar10-1k  # choose the rates, run no finals
    python -m vapt_min.bench accuracy --report                  # redraw results.md, paired.csv and the plots

`--workers` runs at a time, `--threads` torch threads each (2 cores: 2 × 1, never 2 × 2). A finished run
(summary.json) is read, not re-run; an interrupted one continues with --resume; one cut before its first epoch
restarts. Each finished run appends a row to results.csv with the exact command that reproduces it (same machine, same
thread count, same torch: the same numbers), its learning rate, and its test accuracy at the last epoch and at the best
validation epoch; at the end, results.md (mean ± std, trainable parameters and %, the paired table),
accuracy_vs_params.png, paired.csv and paired_forest.png (runner.py runs the processes; the main thread writes).

Paired evidence (evidence.py): every method against VPT-Deep on the same (task, seed), a seed fixing the split and the
batch order for every method. paired.csv has exactly task,method,n_seeds,lr,mean_acc,mean_diff,ci_low,ci_high
(points, difference = method − VPT-Deep, a t-based 95 % interval); results.md adds the minimum detectable effect at
80 % power and the same comparison at the best-validation epoch.

Learning-rate selection (--select-lr, selection.py): before the finals, each entry's learning rate is chosen from the
3 values of LR_GRID by last-epoch validation accuracy on held-out training images (1,000 per run, seeds 100 and 101,
ties to the smaller), never on a test split (its runs build none: --no-eval-test); selection_runs.csv and selection.csv
record it. The finals then run at the chosen learning rate, on seeds 0-4 unless --seeds is given, in
runs/<label>/<task>/lr<lr>/seed<s>; results.csv and paired.csv carry it.
"""
from __future__ import annotations

import csv
import math
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import evidence
from .build import base_lr
from .config import METHODS, PRESETS, Config, opt, parser_for
from .runner import append_row, csv_header, run_all, run_dir_of  # noqa: F401  (csv_header: re-exported)
from .selection import Selection, select_lr, selection_markdown

TASKS = {  # name → the train options that select it
    "cifar10-1k": ["--dataset", "cifar10"],
    "mnist-1k": ["--dataset", "mnist"],
    # 20 epochs: at the preset's 8, 100 images make 32 steps, too few for prompts to converge (seed 0: VPT-Deep 39.7 %
    # test at 8 epochs, below the linear probe's 49.0 %); 20 is the default preset's, README's low-data protocol.
    "cifar10-10shot": ["--dataset", "cifar10", "--protocol", "shots", "--shots", "10", "--epochs", "20"],
    # VTAB-1k's Structured group, rendered (structured.py): 800/200 drawn from a 6,400-image pool per seed
    "struct-count-1k": ["--dataset", "struct-count"],
    "struct-position-1k": ["--dataset", "struct-position"],
    "struct-orientation-1k": ["--dataset", "struct-orientation"],
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

# --select-lr's learning rates (AdamW), 3 per method, about a factor 3 apart on a log scale around the method's default
# (build.base_lr). A multiplier a method applies on top (--network-lr-scale, ViaPT's --viapt-learnt-lr-scale) stays.
#   method                                   default  grid                why
#   linear, vpt-shallow, vpt-deep            1e-3     3e-4, 1e-3, 3e-3    prompt tensors (and a head): VPT-Deep's scale
#   v2apt, viapt, davpt, davpt+, full-v2apt  1e-3     3e-4, 1e-3, 3e-3    the same prompt tensors at the same scale
#   vapt                                     1e-3     1e-4, 3e-4, 1e-3    one step of the shared kernel moves a prompt
#                                                                         ~20x further than a VPT prompt (method-audit
#                                                                         §2.4): the grid leans down, default on top
#   full                                     1e-4     3e-5, 1e-4, 3e-4    every backbone weight: a tenth, as its default
LR_GRID = {**{m: (3e-4, 1e-3, 3e-3) for m in METHODS}, "vapt": (1e-4, 3e-4, 1e-3), "full": (3e-5, 1e-4, 3e-4)}

CSV_FIELDS = ["label", "task", "seed", "lr", "test_acc", "best_val_test_acc", "best_val_acc", "best_epoch",
              "trainable_params", "trainable_pct", "wall_time_s", "device", "precision", "command"]
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


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {usable_cpus()} cores{gpu}, torch {torch.__version__}"


def option_value(options: list[str], name: str, default=None):
    """The value of train option `name` in an option list (`--lr 3e-4` or `--lr=3e-4`; the last one wins, as in
    argparse), or default."""
    value = default
    for i, o in enumerate(options):
        if o == name and i + 1 < len(options):
            value = options[i + 1]
        elif o.startswith(name + "="):
            value = o.split("=", 1)[1]
    return value


def lr_from_command(command: str) -> float:
    """The learning rate of a run from its command (rows of a results.csv from before the lr column)."""
    args = shlex.split(command)
    lr = option_value(args, "--lr")
    if lr is not None:
        return float(lr)
    return base_lr(Config(method=option_value(args, "--method", "vpt-deep"),
                          optimizer=option_value(args, "--optimizer", "adamw")))


def entry_lrs(label: str, options: list[str]) -> tuple[float, ...]:
    """The learning rates --select-lr tries for an entry: LR_GRID of its method, or its own --lr (nothing to select)."""
    if option_value(options, "--lr") is not None:
        return (float(option_value(options, "--lr")),)
    if option_value(options, "--optimizer", "adamw") != "adamw":
        raise ValueError(f"entry {label!r}: LR_GRID holds AdamW learning rates, and the entry trains with --optimizer "
                         f"{option_value(options, '--optimizer')}: give it its own --lr")
    method = option_value(options, "--method", "vpt-deep")
    if method not in LR_GRID:
        raise ValueError(f"entry {label!r}: unknown --method {method!r}: choose one of {', '.join(LR_GRID)}")
    return LR_GRID[method]


def read_results(path: Path) -> list[dict]:
    """results.csv's rows, numbers parsed; `lr` always (from the command where the file predates the column),
    `best_val_test_acc` None where the file or the run predates it."""
    if not path.is_file():
        return []
    number = lambda v: None if v in (None, "") else float(v)
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "test_acc": float(r["test_acc"]),
                 "trainable_params": int(r["trainable_params"]), "trainable_pct": float(r["trainable_pct"]),
                 "lr": number(r.get("lr")) or lr_from_command(r.get("command") or ""),
                 "best_val_test_acc": number(r.get("best_val_test_acc"))}
                for r in csv.DictReader(f)]


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


def ordered_labels(rows: list[dict]) -> list[str]:
    """The rows' labels in the package's order, not the order in which parallel runs happened to finish; labels of
    your own (--entry) after them, in first-seen order."""
    known = [*ENTRIES, *ABLATION]
    seen = list(dict.fromkeys(r["label"] for r in rows))
    return sorted(seen, key=lambda l: (known.index(l), 0) if l in known else (len(known), seen.index(l)))


def results_markdown(rows: list[dict], tasks: list[str]) -> str:
    """One row per label: test accuracy mean ± std per task (n seeds when fewer than the most), trainable params, %."""
    summ = {(r["label"], r["task"]): r for r in summarise(rows)}
    labels = ordered_labels(rows)
    most = max((r["n"] for r in summ.values()), default=0)
    lines = ["| method | trainable params | trainable % | " + " | ".join(tasks) + " |", "|---" * (3 + len(tasks)) + "|"]
    for label in labels:
        first = next(summ[(label, t)] for t in tasks if (label, t) in summ)
        cells = []
        for t in tasks:
            r = summ.get((label, t))
            fewer = f" (n={r['n']})" if r is not None and r["n"] < most else ""
            spread = f" ± {r['std']:.1f}" if r is not None and r["n"] > 1 else " (one seed)"  # no std from one run
            cells.append("—" if r is None else f"{r['mean']:.1f}{spread}{fewer if r['n'] > 1 else ''}")
        lines.append(f"| {label} | {first['trainable_params']:,} | {first['trainable_pct']:.3f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: Path, tasks: list[str], header: str = "") -> str:
    """Write results.md, accuracy_vs_params.png, paired.csv and paired_forest.png from results.csv; returns the
    markdown."""
    import matplotlib.pyplot as plt

    from .plots import plot_forest, plot_grid_results
    rows = read_results(out / "results.csv")
    if not rows:
        raise ValueError(f"{out / 'results.csv'} holds no results yet: run python -m vapt_min.bench accuracy "
                         f"--out {out}")
    tasks = [t for t in tasks if any(r["task"] == t for r in rows)] or list(dict.fromkeys(r["task"] for r in rows))
    old = (out / "results.md").read_text() if (out / "results.md").is_file() else ""
    if not header and old.startswith("Test accuracy"):
        header = old.split("\n\n")[0] + "\n\n"   # --report keeps the command, machine and date of the run
    md = header + results_markdown(rows, tasks) + "\n"
    order = ordered_labels(rows)
    paired = evidence.paired_table(sorted(rows, key=lambda r: order.index(r["label"])), tasks)
    if paired:
        evidence.write_paired_csv(out / "paired.csv", paired)
        md += (f"\nPaired against {evidence.REFERENCE} on the same seeds (paired.csv): test accuracy (%) at the last "
               "epoch, the mean difference (points) with its t-based 95 % confidence interval, the minimum detectable "
               "effect at 80 % power (two-sided paired t-test, α = 0.05, at the observed spread of the differences), "
               "and the same at the best-validation epoch.\n\n" + evidence.paired_markdown(paired) + "\n")
        if any(r["method"] != evidence.REFERENCE for r in paired):
            fig = plot_forest(paired, [t for t in tasks if any(r["task"] == t for r in paired)])
            fig.savefig(out / "paired_forest.png", dpi=110)
            plt.close(fig)
    if (out / "selection.csv").is_file():
        md += ("\nLearning rates, selected on held-out training images (selection.csv; never on a test split):\n\n"
               + selection_markdown(out / "selection.csv") + "\n")
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


# ---------------------------------------------------------------------------------------------------------------------
# The finals


def accuracy(entries: dict, tasks: dict, seeds=(0, 1, 2), preset: str = "cpu", out="results/cpu", runs=None,
             workers: int = 2, threads: int = 1, extra=(), dry_run: bool = False, only: dict | None = None,
             command: str | None = None, select: Selection | None = None) -> list[dict]:
    """Run (or resume) the grid; append each finished run to out/results.csv; write results.md, paired.csv and the
    plots. entries: row label → train options; tasks: name → train options; only: label → {"tasks": ..., "seeds":
    ...}; select: choose each entry's learning rate first (select_lr), and run the finals at it (none with
    select.no_finals: the choice is recorded in selection.csv and the grid returns)."""
    out, runs = Path(out), Path(runs or f"runs/bench-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra)
    if select is not None:
        given = [o for opts in (*tasks.values(), *(select.on or {}).values(), extra) for o in opts]
        if option_value(given, "--lr") is not None:
            raise ValueError("--select-lr chooses the learning rate: drop --lr from --extra (an --entry may fix "
                             "its own)")
        if option_value(given, "--protocol") == "full":
            raise ValueError("--select-lr holds out --select-n-val images, which under --protocol full come out of the "
                             "training set: select on a vtab1k, shots or percent task")
    csv_path = out / "results.csv"
    have = {(r["label"], r["task"], r["seed"]): r for r in read_results(csv_path)}
    jobs = grid_jobs(entries, tasks, seeds, only)
    lrs = select_lr(entries, {label: entry_lrs(label, o) for label, o in entries.items()}, tasks, select, preset,
                    out, runs, workers, threads, extra, dry_run, only) if select is not None else None
    if select is not None and select.no_finals:   # --select-only: the choice is in selection.csv; no finals
        if lrs is not None:
            print(f"--select-only: no finals run; the chosen learning rates are in {out / 'selection.csv'}", flush=True)
        return []
    moved = [k for k in jobs if lrs and k in have and not math.isclose(have[k]["lr"], lrs[k[:2]])]
    if moved:  # one results.csv holds one learning rate per entry and task
        (label, task, seed), lr = moved[0], have[moved[0]]["lr"]
        raise ValueError(f"{csv_path} holds {label} on {task}, seed {seed} at lr {lr:g}, but the selection chose "
                         f"{lrs[(label, task)]:g}: write these finals to another --out")
    dirs = {k: run_dir_of(runs, *k, lr=lrs[k[:2]] if lrs else None) for k in jobs}
    finished = sum((d / "summary.json").is_file() for d in dirs.values())
    print(f"accuracy grid: {len(entries)} entries, {len(tasks)} tasks, seeds {', '.join(map(str, seeds))}: {len(jobs)} "
          f"runs ({finished} finished before) | preset {preset} | {workers} workers × {threads} threads | runs in "
          f"{runs} | results in {csv_path}", flush=True)
    if dry_run:
        for label, task, seed in jobs:
            print(f"  {label} | {task} | seed {seed}" + (" | at the selected lr" if select is not None else ""))
        return []

    def args(label, task, seed):
        lr = ["--lr", f"{lrs[(label, task)]:g}"] if lrs else []
        return ["--preset", preset, *tasks[task], *entries[label], *lr, "--seed", str(seed), *extra]
    rows, failed = {}, []
    for key, cmd, s in run_all([(k, " | ".join(k[:2]) + f" | seed {k[2]}", dirs[k], args(*k)) for k in jobs], workers,
                               threads, lambda s: f"test {100 * s['test_acc']:.1f} %"):
        if s is None:
            failed.append(key)
            continue
        label, task, seed = key
        row = {"label": label, "task": task, "seed": seed, "lr": s.get("lr", ""), "test_acc": s["test_acc"],
               "best_val_test_acc": s.get("best_val_test_acc"), "best_val_acc": s["best_val_acc"],
               "best_epoch": s.get("best_epoch", ""), "trainable_params": s["trainable_params"],
               "trainable_pct": s["trainable_pct"], "wall_time_s": round(s["wall_time_s"], 1), "device": s["device"],
               "precision": s["precision"], **probe_columns(s), "command": cmd}
        if key not in have:
            append_row(csv_path, row, CSV_FIELDS[:-1] + PROBE_FIELDS + ["command"])
            have[key] = row
        rows[key] = row
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
    seeds: list[int] = opt([0, 1, 2], "seeds (with --select-lr: 0 1 2 3 4)")
    preset: str = opt("cpu", "train preset: cpu (8 epochs, 1,000 test images: about 1.5 h on 2 cores) or paper "
                             "(224 px, 100 epochs: a GPU)", choices=list(PRESETS))
    out: str | None = opt(None, "results folder (default: results/<preset>)")
    runs: str | None = opt(None, "run folders (default: runs/bench-<preset>)")
    workers: int = opt(2, "runs at a time")
    threads: int = opt(1, "torch threads per run (part of what makes a row reproducible)")
    entry: list[str] = opt([], "rows of your own, each 'LABEL: TRAIN OPTIONS' (e.g. 'viapt, dropout on all: --method "
                               "viapt --prompt-dropout-on all'); with them, --methods defaults to none")
    extra: list[str] = opt([], "train options added to every run, as one string (e.g. '--test-cap 2000')")
    select_lr: bool = opt(False, "first choose each entry's learning rate (3 per method, LR_GRID) by last-epoch "
                                 "validation accuracy on held-out training images, never on a test split; the finals "
                                 "run at the chosen one")
    select_seeds: list[int] = opt([100, 101], "--select-lr: the selection runs' seeds (disjoint from the finals')")
    select_n_val: int = opt(1000, "--select-lr: validation images per selection run, held out from the training pool "
                                  "the training images leave unused")
    select_on: list[str] = opt([], "--select-lr: select on these tasks, one learning rate per method for every final "
                                   "task (default: each final task selects its own)", choices=list(TASKS))
    select_only: bool = opt(False, "--select-lr: stop once the learning rates are chosen and recorded (selection.csv); "
                                   "run no finals")
    dry_run: bool = opt(False, "list the runs and exit")
    report: bool = opt(False, "only rewrite results.md, paired.csv and the plots from results.csv")


def main(a: GridConfig, argv: list[str]):
    out = Path(a.out or f"results/{a.preset}")
    if a.report:
        print(report(out, a.tasks))
        return
    if not a.select_lr and any(f"--{o}" in argv for o in ("select-seeds", "select-n-val", "select-on", "select-only")):
        raise ValueError("--select-seeds, --select-n-val, --select-on and --select-only set up --select-lr: add "
                         "--select-lr")
    if a.select_n_val < 1:
        raise ValueError(f"--select-n-val must be >= 1, got {a.select_n_val}")
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
    seeds = [0, 1, 2, 3, 4] if a.select_lr and "--seeds" not in argv else a.seeds
    select = Selection(tuple(a.select_seeds), a.select_n_val, {t: TASKS[t] for t in a.select_on} or None,
                       a.select_only) if a.select_lr else None
    accuracy(entries, {t: TASKS[t] for t in a.tasks}, seeds, a.preset, out, a.runs, a.workers, a.threads,
             extra=[o for e in a.extra for o in shlex.split(e)], dry_run=a.dry_run, only=only,
             command=shlex.join(["python", "-m", "vapt_min.bench", *argv]), select=select)


def add_parser(sub) -> None:
    parser_for(GridConfig, sub.add_parser("accuracy", help="test accuracy of every method on 3 tasks × 3 seeds "
                                          "(resumable); --select-lr: a learning rate per method first",
                                          allow_abbrev=False))
