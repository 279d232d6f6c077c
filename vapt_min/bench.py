"""Measuring: the training step's time and memory, inference time, and R-sample inference of trained runs; tables.
(Speed targets live here, never in timed tests. The experiment runner, the accuracy grid, is grid.py.)

    python -m vapt_min.bench speed                              # every method, ViT-Ti/16, 112 px, CPU or GPU
    python -m vapt_min.bench speed --methods vpt-deep v2apt --img-size 224 --batch-size 64
    python -m vapt_min.bench speed --methods vpt-deep full --precision fp32 --attention explicit  # as official code
    python -m vapt_min.bench infer runs/viapt/*-seed0 --samples 1 5   # fixed sampling vs multi-round inference
    python -m vapt_min.bench probe runs/v2apt-*                 # does the generator use the image? (probe.py)
    python -m vapt_min.bench probe --split val runs/v2apt-*     # the same on validation: where recipes are compared
    python -m vapt_min.bench curves runs/davpt-* --keys ce mg_visual mg_cls --png curves.png   # per-epoch curves
    python -m vapt_min.bench accuracy                           # the accuracy grid (grid.py)
    python -m vapt_min.bench rescore results.csv --out whole.csv   # those runs on the whole test set, from checkpoints

Speed: the training step (train.train_step: forward, loss, backward, optimizer) and inference time of each method on
the same backbone, batch, precision and attention path as `train.py` would pick. Methods are measured in interleaved
rounds and each figure is the median over rounds, so slow drift of a shared machine hits every method alike; ratios
are to VPT-Deep (and to full fine-tuning when it is measured). Random weights: speed does not depend on them.

Infer: for trained V²APT / ViaPT runs, test accuracy and evaluation time with fixed sampling (z = μ, R = 1) and
multi-round inference (the mean logits of R sampled prompt sets), on the run's own test split and loader. R = 1
must reproduce the test accuracy the run reported; sampled rounds are seeded, so the table is reproducible.

Rescore: the runs of a per-run CSV scored again on their task's whole test set (10,000 images for CIFAR-10 and
MNIST) from their checkpoints, each first checked, image for image, against what it recorded on its own test subset.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import grid, probe
from .build import build_backbone, build_data, build_loaders, build_model, pick_device, use_bf16, validate
from .config import METHODS, Config, opt, parser_for
from .rescore import RescoreConfig, rescore
from .runs import markdown_table
from .train import evaluate, forward_loss, load_run, sync, train_step


def time_step(model, opt, x, y, bf16: bool, train: bool) -> float:
    sync(x.device)
    t = time.perf_counter()
    if train:
        train_step(model, opt, x, y, model.aux_weights(), bf16)
    else:
        with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            model(x)
    sync(x.device)
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
    params = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
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
        _, loss, _ = forward_loss(model, x, y, model.aux_weights(), bf16)
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
    one_per_class = [(torch.randn(10, 3, img_size, img_size, device=dev), torch.arange(10, device=dev))]
    for m in methods:
        cfg = validate(dataclasses.replace(base, method=m))
        model = build_model(cfg, copy.deepcopy(vit), 10).to(dev)
        if model.generator is not None:  # the per-epoch hook (DA-VPT's class map) from one random image per class
            model.generator.epoch_hook(model, one_per_class)
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
    kind = ("peak allocated in the step (CUDA) + AdamW state" if dev.type == "cuda" else "autograd's saved activations "
            "+ gradients + AdamW state (CPU: no allocator counts; RSS cannot separate methods)")
    print(f"device {dev} | {'bf16 autocast' if bf16 else 'fp32'} | {vit.blocks[0].attn.impl} attention"
          f"{' | torch.compile' if compile else ''} | {model_name} {img_size}px | batch {batch_size} | median of "
          f"{rounds} rounds × {steps} steps | memory: {kind}, backbone weights excluded | process peak RSS "
          f"{peak_rss_mib():.0f} MiB")
    columns = {"method": lambda r: r["method"], "trainable params": lambda r: f"{r['trainable_params']:,}",
               "train step (ms)": lambda r: f"{1e3 * r['train_step_s']:.1f}",
               "train img/s": lambda r: f"{batch_size / r['train_step_s']:.1f}",
               "inference (ms)": lambda r: f"{1e3 * r['infer_s']:.1f}",
               "train memory (MiB)": lambda r: f"{r['memory_mib']:.1f}"}
    for c in (c for ref in ("vpt-deep", "full") for c in (f"train_vs_{ref}", f"infer_vs_{ref}", f"memory_vs_{ref}")):
        if c in rows[0]:
            columns[c] = lambda r, c=c: f"{r[c]:.2f}x"
    print(markdown_table(rows, columns))
    return rows


def infer(run_dirs, samples=(1, 5), seed=0) -> list[dict]:
    """Test accuracy and time of each run at each R in `samples` (last checkpoint, the run's device and precision)."""
    rows = []
    for run_dir in run_dirs:
        model, cfg = load_run(run_dir, "last")
        cfg = dataclasses.replace(cfg, eval_test=True)  # scored on its test split, even a selection run
        if model.generator is None or not model.generator.samples:
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
            sync(dev)
            t = time.perf_counter()
            acc = evaluate(model, test_loader, dev, bf16)
            sync(dev)
            rows.append({"run": str(run_dir), "R": R, "test_acc": acc, "seconds": time.perf_counter() - t,
                         "images": len(splits["test"])})
    first = {r["run"]: r for r in reversed(rows)}  # each run's first R
    print(markdown_table(rows, {
        "run": lambda r: r["run"], "inference": lambda r: "z = μ" if r["R"] == 1 else f"R = {r['R']}",
        "test acc": lambda r: f"{100 * r['test_acc']:.1f}", "time (s)": lambda r: f"{r['seconds']:.1f}",
        "img/s": lambda r: f"{r['images'] / r['seconds']:.0f}",
        "time / R = 1": lambda r: f"{r['seconds'] / first[r['run']]['seconds']:.2f}x"}))
    return rows


PROBE_CSV = ["run", "method", "images", "acc_own", "acc_swapped", "acc_null", "changed_swapped", "changed_null",
             "mi_bits", "kl_bits"]


def probe_runs(run_dirs, batch_size: int = 64, which: str = "last", csv_path=None, split: str = "test") -> list[dict]:
    """Every diagnostic of probe.py for trained runs, on each run's own test split (split="val": its validation split,
    the one to choose between recipes on; mixed-class batches): the swap test, the latent's information, the scale of
    what the generator inserts, the last epoch's loss balance.
    csv_path: also write the swap test and the latent of every run there, one row per run (PROBE_CSV)."""
    rows = []
    for run_dir in run_dirs:
        model, cfg = load_run(run_dir, which)
        if split == "test":
            cfg = dataclasses.replace(cfg, eval_test=True)  # scored on its test split, even a selection run
        if model.generator is None:
            raise ValueError(f"{run_dir}: method {cfg.method!r} has no prompt generator to probe")
        dev = pick_device(cfg)
        bf16 = use_bf16(cfg, dev)
        model.to(dev)
        _, splits = build_data(cfg, model.vit.pretrained_cfg)
        loader = probe.mixed_loader(splits[split], batch_size)
        x = next(iter(loader))[0][:16].to(dev)
        metrics = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        balance = probe.loss_balance(metrics, model.aux_weights())[-1]
        rows.append({"run": str(run_dir), "method": cfg.method, **probe.swap_test(model, loader, dev, bf16),
                     "latent": probe.latent_information(model, loader, dev),
                     "scale": probe.inserted_scale(model, x), "balance": balance,
                     "diagnostics": model.generator.diagnostics(model, x)})
    print(markdown_table(rows, {
        "run": lambda r: r["run"], "method": lambda r: r["method"],
        "test acc: own / swapped / null input": lambda r: " / ".join(
            f"{100 * r[k]:.1f}" for k in ("acc_own", "acc_swapped", "acc_null")),
        "predictions changed: swap / null": lambda r: f"{100 * r['changed_swapped']:.1f} % / "
                                                      f"{100 * r['changed_null']:.1f} %",
        "latent (bits per image)": lambda r: "—" if r["latent"] is None else
            f"I {r['latent']['mi_bits']:.2f} (KL {r['latent']['kl_bits']:.2f})"
            + (" collapsed" if r["latent"]["collapsed"] else ""),
        "last epoch: ce, aux (weighted)": lambda r: f"{r['balance']['ce']:.3f}" + "".join(
            f", {k} {v:.3g} ({r['balance'][k + '_weighted']:.3g})" for k, v in r["balance"].items()
            if k not in ("epoch", "ce") and not k.endswith("_weighted"))}))
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, PROBE_CSV)
            w.writeheader()
            for r in rows:
                latent = r["latent"] or {}
                w.writerow({**{k: r[k] for k in PROBE_CSV[:8]}, "mi_bits": latent.get("mi_bits", ""),
                            "kl_bits": latent.get("kl_bits", "")})
    blocks = lambda v: " ".join("·" if math.isnan(t) else f"{t:.2f}" for t in v)
    for r in rows:
        if r["diagnostics"]:
            print(f"\n{r['run']}: " + " | ".join(f"{k} {v:.3f}" for k, v in r["diagnostics"].items()))
        print(f"\n{r['run']}: mean norm of an inserted prompt token, per block (· = carried)")
        for name, v in r["scale"].items():
            print(f"  {name:28s} {blocks(v)}")
    return rows


def curves(run_dirs, keys, png=None, csv_path=None, labels=None) -> dict[str, list[dict]]:
    """Per-epoch curves (metrics.jsonl) of trained runs, one panel per key: e.g. DA-VPT's metric losses beside the
    cross-entropy. png: the figure; csv_path: one row per run and epoch, the keys as columns (a run lacking a key
    leaves it empty). labels: one per run (default: the run folders)."""
    from .plots import plot_curves, read_metrics
    labels = labels or [str(d) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(run_dirs)} runs")
    runs = {}
    for label, run_dir in zip(labels, run_dirs):
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            raise ValueError(f"{run_dir}: no metrics.jsonl (a run folder written by python -m vapt_min.train --out)")
        runs[label] = read_metrics(run_dir)
    missing = [k for k in keys if not any(k in r for rows in runs.values() for r in rows)]
    if missing:
        known = sorted({k for rows in runs.values() for r in rows for k in r})
        raise ValueError(f"--keys {' '.join(missing)}: no run logged it; metrics.jsonl has {', '.join(known)}")
    if csv_path is not None:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, ["run", "epoch", *keys])
            w.writeheader()
            for label, rows in runs.items():
                for r in rows:
                    w.writerow({"run": label, "epoch": r["epoch"], **{k: r.get(k, "") for k in keys}})
    if png is not None:
        import matplotlib.pyplot as plt
        fig = plot_curves({label: [r for r in rows if all(k in r for k in keys)] for label, rows in runs.items()},
                          keys)
        fig.savefig(png, dpi=110)
        plt.close(fig)
    for label, rows in runs.items():
        print(f"{label}: " + " | ".join(f"{k} {rows[0].get(k, float('nan')):.3g} → {rows[-1].get(k, float('nan')):.3g}"
                                        for k in keys))
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# The CLI: one dataclass per subcommand, its parser generated as train's is (config.parser_for)

@dataclass
class SpeedConfig:
    methods: list[str] = opt(list(METHODS), "methods to time", choices=METHODS)
    model: str = opt("vit_tiny_patch16_224", "timm ViT name (random weights: speed does not depend on them)")
    img_size: int = opt(112, "input size in pixels")
    batch_size: int = opt(32, "batch size")
    rounds: int = opt(5, "interleaved rounds; each figure is the median over them")
    steps: int = opt(3, "steps per method and round")
    device: str = opt("auto", "auto, cpu or cuda[:i]")
    precision: str = opt("auto", "auto (what train.py picks), bf16 or fp32", choices=("auto", "bf16", "fp32"))
    attention: str = opt("auto", "auto: what train.py picks (sdpa on CUDA, explicit on CPU); explicit fp32 is the "
                                 "official codes' path", choices=("auto", "sdpa", "explicit"))
    compile: bool = opt(False, "torch.compile every model first (CUDA; slow to start on CPU)")


@dataclass
class InferConfig:
    runs: list[str] = opt([], "run folders (as written by python -m vapt_min.train --out)", positional=True)
    samples: list[int] = opt([1, 5], "values of R; 1 = z = mu")
    seed: int = opt(0, "seed of the sampled rounds")


@dataclass
class ProbeConfig:
    runs: list[str] = opt([], "run folders of prompt methods (as written by python -m vapt_min.train --out)",
                          positional=True)
    batch_size: int = opt(64, "images per batch (the swap test swaps within a batch)")
    which: str = opt("last", "checkpoint: last or best", choices=("last", "best"))
    split: str = opt("test", "the split to probe: test, or val (the run's validation images: compare recipes there, "
                             "never on test)", choices=("test", "val"))
    csv: str | None = opt(None, "also write one row per run (the swap test on the probed split, the latent's bits) "
                                "to this CSV file")


@dataclass
class CurvesConfig:
    runs: list[str] = opt([], "run folders (as written by python -m vapt_min.train --out)", positional=True)
    keys: list[str] = opt(["ce", "val_acc"], "metrics.jsonl columns, one panel each (e.g. ce mg_visual mg_cls kl)")
    labels: list[str] = opt([], "a legend label per run (default: the run folders)")
    png: str | None = opt(None, "write the figure here")
    csv: str | None = opt(None, "write the curves here, one row per run and epoch")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m vapt_min.bench", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="bench", required=True)
    parser_for(SpeedConfig, sub.add_parser("speed", help="training-step and inference time per method",
                                           allow_abbrev=False))
    parser_for(InferConfig, sub.add_parser("infer", help="fixed sampling vs multi-round inference of trained v2apt / "
                                           "viapt runs", allow_abbrev=False))
    parser_for(ProbeConfig, sub.add_parser("probe", help="does each trained generator use the image? the swap test, "
                                           "the latent's bits, the scale of the prompts, the loss balance",
                                           allow_abbrev=False))
    parser_for(CurvesConfig, sub.add_parser("curves", help="per-epoch curves of trained runs (a figure, a CSV)",
                                            allow_abbrev=False))
    parser_for(RescoreConfig, sub.add_parser("rescore", help="the runs of a per-run CSV scored again on the whole test "
                                             "set, from their checkpoints", allow_abbrev=False))
    grid.add_parser(sub)
    given = vars(p.parse_args(argv))
    kind = given.pop("bench")
    if kind == "accuracy":
        a = grid.GridConfig(**given)
        if a.workers < 1 or a.threads < 1:
            p.error("--workers and --threads must be >= 1")
        try:
            grid.main(a, argv)
        except ValueError as e:
            p.error(str(e))
    elif kind == "probe":
        a = ProbeConfig(**given)
        probe_runs(a.runs, a.batch_size, a.which, a.csv, a.split)
    elif kind == "curves":
        a = CurvesConfig(**given)
        try:
            curves(a.runs, a.keys, a.png, a.csv, a.labels or None)
        except ValueError as e:
            p.error(str(e))
    elif kind == "rescore":
        a = RescoreConfig(**given)
        try:
            rescore(a.results, a.out, "python -m vapt_min.bench " + " ".join(map(shlex.quote, argv)))
        except ValueError as e:
            p.error(str(e))
    elif kind == "infer":
        a = InferConfig(**given)
        if min(a.samples) < 1:
            p.error(f"--samples must all be >= 1 (1 = z = mu), got {a.samples}")
        infer(a.runs, a.samples, a.seed)
    else:
        a = SpeedConfig(**given)
        speed(a.methods, a.model, a.img_size, a.batch_size, a.rounds, a.steps, a.device, a.precision,
              attention=a.attention, compile=a.compile)

if __name__ == "__main__":
    main()


