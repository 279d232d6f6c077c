"""Benchmarks that print a table (speed targets live here, never in timed tests).

    python -m vapt_min.bench speed                              # every method, ViT-Ti/16, 112 px, CPU or GPU
    python -m vapt_min.bench speed --methods vpt-deep v2apt --img-size 224 --batch-size 64
    python -m vapt_min.bench speed --methods vpt-deep full --precision fp32 --attention explicit   # as the official code
    python -m vapt_min.bench infer runs/viapt/*-seed0 --samples 1 5   # fixed sampling vs multi-round inference

Speed: the training step (forward, backward, optimizer) and inference time of each method on the same
backbone, same batch, same precision and attention path as `train.py` would pick. Methods are measured in
interleaved rounds and each figure is the median over rounds, so slow drift of a shared machine hits every
method alike; ratios are to VPT-Deep (and to full fine-tuning when it is measured). Random weights: speed
does not depend on them.

Infer: for trained V²APT / ViaPT runs, test accuracy and evaluation time with fixed sampling (z = μ, R = 1) and
multi-round inference (the mean logits of R sampled prompt sets), on the run's own test split and loader. R = 1
must reproduce the test accuracy the run reported; sampled rounds are seeded, so the table is reproducible.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from .train import (METHODS, Config, build_backbone, build_data, build_loaders, build_model, evaluate, load_run,
                    pick_device, total_loss, use_bf16)


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


def speed(methods, model_name="vit_tiny_patch16_224", img_size=112, batch_size=32, rounds=5, steps=3, device="auto",
          precision="auto", num_prompts=10, attention="auto") -> list[dict]:
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
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
        models[m] = (model, opt)
    times = {m: {"train": [], "infer": []} for m in methods}
    for r in range(rounds + 1):  # round 0 warms up (allocator, kernels) and is dropped
        for m, (model, opt) in models.items():
            for mode in ("train", "infer"):
                model.train(mode == "train")
                t = sum(time_step(model, opt, x, y, bf16, mode == "train") for _ in range(steps)) / steps
                if r:
                    times[m][mode].append(t)
    rows = []
    for m, (model, _) in models.items():
        trainable, _ = model.param_counts()
        rows.append({"method": m, "trainable_params": trainable,
                     "train_step_s": statistics.median(times[m]["train"]), "infer_s": statistics.median(times[m]["infer"])})
    for ref in ("vpt-deep", "full"):
        r0 = next((r for r in rows if r["method"] == ref), None)
        for r in rows:
            if r0:
                r[f"train_vs_{ref}"] = r["train_step_s"] / r0["train_step_s"]
                r[f"infer_vs_{ref}"] = r["infer_s"] / r0["infer_s"]
    print(f"device {dev} | {'bf16 autocast' if bf16 else 'fp32'} | {vit.blocks[0].attn.impl} attention | {model_name} "
          f"{img_size}px | batch {batch_size} | median of {rounds} rounds × {steps} steps")
    cols = [c for c in ("train_vs_vpt-deep", "infer_vs_vpt-deep", "train_vs_full", "infer_vs_full") if c in rows[0]]
    print("| method | trainable params | train step (ms) | train img/s | inference (ms) | " + " | ".join(cols) + " |")
    print("|---" * (5 + len(cols)) + "|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable_params']:,} | {1e3 * r['train_step_s']:.1f} | {batch_size / r['train_step_s']:.1f} | "
              f"{1e3 * r['infer_s']:.1f} | " + " | ".join(f"{r[c]:.2f}x" for c in cols) + " |")
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
    s.add_argument("--attention", default="auto", choices=("auto", "sdpa", "explicit"),
                   help="auto: what train.py picks (sdpa on CUDA, explicit on CPU); explicit fp32 is the official codes' path")
    i = sub.add_parser("infer", help="fixed sampling vs multi-round inference of trained v2apt / viapt runs",
                       allow_abbrev=False)
    i.add_argument("runs", nargs="+", help="run folders (as written by python -m vapt_min.train --out)")
    i.add_argument("--samples", nargs="+", type=int, default=[1, 5], help="values of R; 1 = z = mu")
    i.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.bench == "infer":
        if min(a.samples) < 1:
            p.error(f"--samples must all be >= 1 (1 = z = mu), got {a.samples}")
        infer(a.runs, a.samples, a.seed)
    else:
        speed(a.methods, a.model, a.img_size, a.batch_size, a.rounds, a.steps, a.device, a.precision, attention=a.attention)


if __name__ == "__main__":
    main()
