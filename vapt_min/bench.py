"""Benchmarks that print a table (speed targets live here, never in timed tests).

    python -m vapt_min.bench speed                              # every method, ViT-Ti/16, 112 px, CPU or GPU
    python -m vapt_min.bench speed --methods vpt-deep v2apt --img-size 224 --batch-size 64
    python -m vapt_min.bench speed --methods vpt-deep full --precision fp32 --attention explicit   # as the official code
    python -m vapt_min.bench infer runs/viapt/*-seed0 --samples 1 5   # fixed sampling vs multi-round inference
    python -m vapt_min.bench accuracy                           # every method × 3 tasks × 3 seeds, real ViT-Ti/16 (CPU: ~1.5 h)
    python -m vapt_min.bench accuracy --preset paper --threads 8 --workers 1   # the papers' protocol, on a GPU

Speed: the training step (forward, backward, optimizer) and inference time of each method on the same
backbone, same batch, same precision and attention path as `train.py` would pick. Methods are measured in
interleaved rounds and each figure is the median over rounds, so slow drift of a shared machine hits every
method alike; ratios are to VPT-Deep (and to full fine-tuning when it is measured). Random weights: speed
does not depend on them.

Infer: for trained V²APT / ViaPT runs, test accuracy and evaluation time with fixed sampling (z = μ, R = 1) and
multi-round inference (the mean logits of R sampled prompt sets), on the run's own test split and loader. R = 1
must reproduce the test accuracy the run reported; sampled rounds are seeded, so the table is reproducible.

Accuracy: every method (and the full V²APT's ablation) on CIFAR-10-1k, MNIST-1k and CIFAR-10 at 10 images per class,
3 seeds, each run a `python -m vapt_min.train` process of its own (`--workers` at a time, `--threads` each). Resumable:
a finished run (summary.json) is read, not re-run; an interrupted one continues with --resume; results.csv gets a row
as each run finishes, with the exact command that reproduces it (same machine, same thread count: the same numbers).
At the end: results.md (mean ± std, trainable parameters and %) and accuracy_vs_params.png in --out.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import copy
import csv
import dataclasses
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .train import (METHODS, Config, build_backbone, build_data, build_loaders, build_model, clustered, evaluate,
                    load_run, pick_device, total_loss, use_bf16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(model, opt, x, y, bf16: bool, train: bool) -> float:
    device = x.device
    _sync(device)
    t = time.perf_counter()
    if train:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, aux = model(x, y)
        loss, _ = total_loss(logits, y, aux, model.aux_weights())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    else:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            model(x)
    _sync(device)
    return time.perf_counter() - t


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def train_memory(model, opt, x, y, bf16: bool) -> dict:
    """Memory of one training step (MiB), the backbone's own weights excluded: they are the same for every method.

    `step`: on CUDA the peak allocated during the step above what was allocated before it (activations, gradients,
    temporaries; allocator-exact). On CPU, where no allocator counts, the bytes autograd saves for the backward
    (parameters' own storage excluded) plus the gradients: the activation memory, without short-lived temporaries.
    `state`: what a method keeps between steps besides the backbone: trainable parameters' AdamW moments, and for full
    fine-tuning nothing more (its weights are the backbone's). `total` = step + state."""
    dev = x.device
    state = _nbytes(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    model.train()
    opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
            logits, aux = model(x, y)
        loss, _ = total_loss(logits, y, aux, model.aux_weights())
    loss.backward()
    grads = _nbytes(p.grad for p in model.parameters() if p.grad is not None)
    opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        step = torch.cuda.max_memory_allocated(dev) - before
    else:
        step = sum(saved.values()) + grads
    opt.zero_grad(set_to_none=True)
    mib = 2.0 ** 20
    return {"step_mib": step / mib, "state_mib": state / mib, "memory_mib": (step + state) / mib,
            "memory_kind": "allocated" if dev.type == "cuda" else "saved"}


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB), for the header: one figure for all methods."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def speed(methods, model_name="vit_tiny_patch16_224", img_size=112, batch_size=32, rounds=5, steps=3, device="auto",
          precision="auto", num_prompts=10, attention="auto", compile: bool = False) -> list[dict]:
    base = Config(model=model_name, weights="random", img_size=img_size, num_prompts=num_prompts, device=device,
                  precision=precision, attention=attention)
    dev = pick_device(base)
    bf16 = use_bf16(base, dev)
    vit = build_backbone(base, dev)
    torch.manual_seed(0)
    x, y = torch.randn(batch_size, 3, img_size, img_size, device=dev), torch.randint(0, 10, (batch_size,), device=dev)
    models = {}
    for m in methods:
        cfg = dataclasses.replace(base, method=m).validate()
        model = build_model(cfg, copy.deepcopy(vit), 10).to(dev)
        if clustered(model.generator):
            model.generator.update_map(torch.randn(10, vit.dim))  # timing only: any class → prompt map will do
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
        models[m] = (torch.compile(model) if compile else model, opt)
    times = {m: {"train": [], "infer": []} for m in methods}
    for r in range(rounds + 1):  # round 0 warms up (allocator, kernels) and is dropped
        for m, (model, opt) in models.items():
            for mode in ("train", "infer"):
                model.train(mode == "train")
                t = sum(time_step(model, opt, x, y, bf16, mode == "train") for _ in range(steps)) / steps
                if r:
                    times[m][mode].append(t)
    rows = []
    for m, (model, opt) in models.items():
        trainable, _ = getattr(model, "_orig_mod", model).param_counts()
        rows.append({"method": m, "trainable_params": trainable, "train_step_s": statistics.median(times[m]["train"]),
                     "infer_s": statistics.median(times[m]["infer"]), **train_memory(model, opt, x, y, bf16)})
    for ref in ("vpt-deep", "full"):
        r0 = next((r for r in rows if r["method"] == ref), None)
        for r in rows:
            if r0:
                r[f"train_vs_{ref}"] = r["train_step_s"] / r0["train_step_s"]
                r[f"infer_vs_{ref}"] = r["infer_s"] / r0["infer_s"]
                r[f"memory_vs_{ref}"] = r["memory_mib"] / r0["memory_mib"] if r0["memory_mib"] else float("nan")
    kind = ("peak allocated in the step (CUDA) + AdamW state" if dev.type == "cuda" else
            "autograd's saved activations + gradients + AdamW state (CPU: no allocator counts; RSS cannot separate methods)")
    print(f"device {dev} | {'bf16 autocast' if bf16 else 'fp32'} | {vit.blocks[0].attn.impl} attention"
          f"{' | torch.compile' if compile else ''} | {model_name} {img_size}px | batch {batch_size} | median of {rounds} "
          f"rounds × {steps} steps | memory: {kind}, backbone weights excluded | process peak RSS {peak_rss_mib():.0f} MiB")
    cols = [c for ref in ("vpt-deep", "full") for c in (f"train_vs_{ref}", f"infer_vs_{ref}", f"memory_vs_{ref}") if c in rows[0]]
    print("| method | trainable params | train step (ms) | train img/s | inference (ms) | train memory (MiB) | "
          + " | ".join(cols) + " |")
    print("|---" * (6 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable_params']:,} | {1e3 * r['train_step_s']:.1f} | {batch_size / r['train_step_s']:.1f} | "
              f"{1e3 * r['infer_s']:.1f} | {r['memory_mib']:.1f} | " + " | ".join(f"{r[c]:.2f}x" for c in cols) + " |")
    return rows


def infer(run_dirs, samples=(1, 5), seed=0) -> list[dict]:
    """Test accuracy and time of each run at each R in `samples` (last checkpoint, the run's device and precision)."""
    rows = []
    for run_dir in run_dirs:
        model, cfg = load_run(run_dir, "last")
        if not hasattr(model.generator, "eval_samples"):
            raise ValueError(f"{run_dir}: method {cfg.method!r} does not sample its prompts; multi-round inference "
                             "needs a v2apt or viapt run")
        dev = pick_device(cfg)
        bf16 = use_bf16(cfg, dev)
        model.to(dev)
        _, splits = build_data(cfg, model.vit.pretrained_cfg)
        test_loader = build_loaders(cfg, splits)[2]
        for R in samples:
            model.generator.eval_samples = R
            torch.manual_seed(seed)
            _sync(dev)
            t = time.perf_counter()
            acc = evaluate(model, test_loader, dev, bf16)
            _sync(dev)
            rows.append({"run": str(run_dir), "R": R, "test_acc": acc, "seconds": time.perf_counter() - t,
                         "images": len(splits["test"])})
    print("| run | inference | test acc | time (s) | img/s | time / R = 1 |\n|---|---|---|---|---|---|")
    for r in rows:
        r1 = next(q for q in rows if q["run"] == r["run"])
        name = "z = μ" if r["R"] == 1 else f"R = {r['R']}"
        print(f"| {r['run']} | {name} | {100 * r['test_acc']:.1f} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.0f} "
              f"| {r['seconds'] / r1['seconds']:.2f}x |")
    return rows


# ---------------------------------------------------------------------------------------------------------
# Accuracy grid

TASKS = {  # name → the train options that select it
    "cifar10-1k": ["--dataset", "cifar10"],
    "mnist-1k": ["--dataset", "mnist"],
    # 20 epochs: at the preset's 8, 100 images make 32 steps, too few for prompts to converge (seed 0: VPT-Deep 39.7 %
    # test at 8 epochs, below the linear probe's 49.0 %); 20 is the default preset's, README's low-data protocol.
    "cifar10-10shot": ["--dataset", "cifar10", "--protocol", "shots", "--shots", "10", "--epochs", "20"],
}
ENTRIES = {m: ["--method", m] for m in METHODS}  # row label → train options: every method at its defaults
ABLATION = {  # the full V²APT with one part off (lesson 07); with all parts off it is VPT-Deep
    "full-v2apt −vae": ["--method", "full-v2apt", "--no-vae"],
    "full-v2apt −pca": ["--method", "full-v2apt", "--no-pca"],
    "full-v2apt −guide": ["--method", "full-v2apt", "--no-guide"],
    "full-v2apt −bias": ["--method", "full-v2apt", "--no-kv-bias"],
    "full-v2apt −pca −guide": ["--method", "full-v2apt", "--no-pca", "--no-guide"],  # the two that cost most, both off
}
CSV_FIELDS = ["label", "task", "seed", "test_acc", "best_val_acc", "trainable_params", "trainable_pct", "wall_time_s",
              "device", "precision", "command"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), "test_acc": float(r["test_acc"]), "trainable_params": int(r["trainable_params"]),
                 "trainable_pct": float(r["trainable_pct"])} for r in csv.DictReader(f)]


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
    """One row per label: test accuracy mean ± std per task (n seeds when fewer than the most), trainable params and %."""
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
            cells.append("—" if r is None else f"{r['mean']:.1f} ± {r['std']:.1f}" + (f" (n={r['n']})" if r["n"] < most else ""))
        lines.append(f"| {label} | {first['trainable_params']:,} | {first['trainable_pct']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(out: Path, tasks: list[str], header: str = "") -> str:
    """Write results.md and accuracy_vs_params.png from results.csv; returns the markdown."""
    from .plots import plot_grid_results
    rows = read_results(out / "results.csv")
    if not rows:
        raise ValueError(f"{out / 'results.csv'} holds no results yet: run python -m vapt_min.bench accuracy --out {out}")
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
    import matplotlib.pyplot as plt
    plt.close(fig)
    return md


def grid_jobs(entries: dict, tasks: dict, seeds, only: dict | None = None) -> list[tuple[str, str, int]]:
    """(label, task, seed) for every entry on every task and seed, or only on `only[label]`'s {"tasks": [...],
    "seeds": [...]}. Seed-major: after the first third every (method, task) has one result, whatever stops the grid."""
    only = only or {}
    return [(label, task, seed) for seed in seeds for task in tasks for label in entries
            if task in only.get(label, {}).get("tasks", tasks) and seed in only.get(label, {}).get("seeds", seeds)]


def accuracy(entries: dict, tasks: dict, seeds=(0, 1, 2), preset: str = "cpu", out="results/cpu", runs=None,
             workers: int = 2, threads: int = 1, extra=(), dry_run: bool = False, only: dict | None = None,
             command: str | None = None) -> list[dict]:
    """Run (or resume) the grid; append each finished run to out/results.csv; write results.md and the plot.
    entries: row label → train options; tasks: name → train options; only: label → {"tasks": ..., "seeds": ...} it runs on
    (default: all)."""
    out = Path(out)
    runs = Path(runs or f"runs/bench-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    have = {(r["label"], r["task"], r["seed"]) for r in read_results(csv_path)}
    lock = threading.Lock()
    jobs = grid_jobs(entries, tasks, seeds, only)
    started = time.time()
    done = [0]

    def run_dir_of(label, task, seed) -> Path:
        return runs / label.replace(" ", "_") / task / f"seed{seed}"

    def record(label, task, seed, run_dir, command):
        s = json.loads((run_dir / "summary.json").read_text())
        row = {"label": label, "task": task, "seed": seed, "test_acc": s["test_acc"], "best_val_acc": s["best_val_acc"],
               "trainable_params": s["trainable_params"], "trainable_pct": s["trainable_pct"],
               "wall_time_s": round(s["wall_time_s"], 1), "device": s["device"], "precision": s["precision"], "command": command}
        with lock:
            if (label, task, seed) not in have:
                new = not csv_path.is_file()
                with open(csv_path, "a", newline="") as f:
                    w = csv.DictWriter(f, CSV_FIELDS)
                    if new:
                        w.writeheader()
                    w.writerow(row)
                have.add((label, task, seed))
            done[0] += 1
            left = len(jobs) - done[0]
            eta = (time.time() - started) / (done[0] - skipped) * left if done[0] > skipped else 0
            print(f"[{done[0]}/{len(jobs)}] {label} | {task} | seed {seed}: test {100 * s['test_acc']:.1f} % "
                  f"({s['wall_time_s']:.0f} s){f' | about {eta / 60:.0f} min left' if left and eta else ''}", flush=True)
        return row

    def run(job):
        label, task, seed = job
        run_dir = run_dir_of(label, task, seed)
        args = ["--preset", preset, *tasks[task], *entries[label], "--seed", str(seed), *extra, "--out", str(run_dir)]
        command = f"OMP_NUM_THREADS={threads} python -m vapt_min.train " + shlex.join(args)
        if (run_dir / "summary.json").is_file():
            return record(label, task, seed, run_dir, command)
        if (run_dir / "train_state.pt").is_file():     # interrupted after an epoch: continue it
            args = ["--resume", str(run_dir)]
        elif run_dir.exists():                         # interrupted before its first epoch finished: nothing to keep
            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.parent / f"seed{seed}.log"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "vapt_min.train", *args, "--no-progress"], env=env, stdout=f,
                                stderr=subprocess.STDOUT).returncode
        if rc:
            tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
            print(f"FAILED {label} | {task} | seed {seed} (exit {rc}); log {log}:\n{tail}", flush=True)
            return None
        return record(label, task, seed, run_dir, command)

    skipped = sum((run_dir_of(*job) / "summary.json").is_file() for job in jobs)
    print(f"accuracy grid: {len(entries)} entries, {len(tasks)} tasks, seeds {', '.join(map(str, seeds))}: {len(jobs)} runs "
          f"({skipped} finished before) | preset {preset} | {workers} workers × {threads} threads | runs in {runs} | "
          f"results in {csv_path}", flush=True)
    if dry_run:
        for label, task, seed in jobs:
            print(f"  {label} | {task} | seed {seed}")
        return []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(run, jobs))
    header = (f"Test accuracy (%) over seeds {', '.join(map(str, seeds))}: `{command or f'python -m vapt_min.bench accuracy --preset {preset}'}`, "
              f"{workers} workers × {threads} threads; {machine()}; {time.strftime('%Y-%m-%d')}.\n\n")
    print(report(out, list(tasks), header))
    failed = [j for j, r in zip(jobs, rows) if r is None]
    if failed:
        raise RuntimeError(f"{len(failed)} runs failed (logs next to their run folders); run the same command again to retry them")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m vapt_min.bench", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("speed", help="training-step and inference time per method", allow_abbrev=False)
    s.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    s.add_argument("--model", default="vit_tiny_patch16_224")
    s.add_argument("--img-size", type=int, default=112)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--steps", type=int, default=3)
    s.add_argument("--device", default="auto")
    s.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    s.add_argument("--compile", action="store_true", help="torch.compile every model first (CUDA; slow to start on CPU)")
    s.add_argument("--attention", default="auto", choices=("auto", "sdpa", "explicit"),
                   help="auto: what train.py picks (sdpa on CUDA, explicit on CPU); explicit fp32 is the official codes' path")
    i = sub.add_parser("infer", help="fixed sampling vs multi-round inference of trained v2apt / viapt runs",
                       allow_abbrev=False)
    i.add_argument("runs", nargs="+", help="run folders (as written by python -m vapt_min.train --out)")
    i.add_argument("--samples", nargs="+", type=int, default=[1, 5], help="values of R; 1 = z = mu")
    i.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("accuracy", help="test accuracy of every method on 3 tasks × 3 seeds (resumable)", allow_abbrev=False)
    g.add_argument("--methods", nargs="+", default=list(ENTRIES), choices=list(ENTRIES) + list(ABLATION),
                   help="row labels: the methods, and the full V²APT ablation (" + ", ".join(ABLATION) + ")")
    g.add_argument("--ablation", action="store_true", help="add the full V²APT ablation rows (on cifar10-1k only)")
    g.add_argument("--ablation-seeds", nargs="+", type=int, default=[0, 1], help="the ablation's seeds")
    g.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    g.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    g.add_argument("--preset", default="cpu", help="train preset: cpu (8 epochs, 1,000 test images: about 1.5 h on 2 cores) or paper (224 px, 100 epochs: a GPU)")
    g.add_argument("--out", default=None, help="results folder (default: results/<preset>)")
    g.add_argument("--runs", default=None, help="run folders (default: runs/bench-<preset>)")
    g.add_argument("--workers", type=int, default=2, help="runs at a time")
    g.add_argument("--threads", type=int, default=1, help="torch threads per run (part of what makes a row reproducible)")
    g.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    g.add_argument("--report", action="store_true", help="only rewrite results.md and the plot from results.csv")
    a = p.parse_args(argv)
    if a.bench == "accuracy":
        from .train import PRESETS
        if a.preset not in PRESETS:
            p.error(f"unknown --preset {a.preset!r}: choose one of {', '.join(PRESETS)}")
        if a.workers < 1 or a.threads < 1:
            p.error("--workers and --threads must be >= 1")
        out = Path(a.out or f"results/{a.preset}")
        if a.report:
            print(report(out, a.tasks))
            return
        entries = {m: {**ENTRIES, **ABLATION}[m] for m in a.methods}
        if a.ablation:
            entries.update(ABLATION)
        # --ablation adds lesson 07's rows on CIFAR-10-1k and the ablation seeds; an entry named in --methods runs everywhere
        only = {label: {"tasks": ["cifar10-1k"], "seeds": a.ablation_seeds} for label in ABLATION if label not in a.methods}
        accuracy(entries, {t: TASKS[t] for t in a.tasks}, a.seeds, a.preset, out, a.runs, a.workers, a.threads,
                 dry_run=a.dry_run, only=only, command=shlex.join(["python", "-m", "vapt_min.bench", *(argv or sys.argv[1:])]))
        return
    if a.bench == "infer":
        if min(a.samples) < 1:
            p.error(f"--samples must all be >= 1 (1 = z = mu), got {a.samples}")
        infer(a.runs, a.samples, a.seed)
    else:
        speed(a.methods, a.model, a.img_size, a.batch_size, a.rounds, a.steps, a.device, a.precision, attention=a.attention,
              compile=a.compile)


if __name__ == "__main__":
    main()
