"""Train a prompt-tuned (or linearly probed, or fully fine-tuned) ViT: assembly, one loop, --check, load_run, the CLI.

    python -m vapt_min.train                         # VPT-Deep on CIFAR-10-1k with the real ViT-Ti/16 (CPU, minutes)
    python -m vapt_min.train --method vpt-shallow --seed 1
    python -m vapt_min.train --preset paper          # the papers' protocol (224 px, 100 epochs): for a GPU
    python -m vapt_min.train --check                 # validate, load data and weights, time 2 steps, print the plan
    torchrun --nproc_per_node 4 -m vapt_min.train    # DistributedDataParallel; --batch-size is the global batch
    python -m vapt_min.train --help                  # every option, generated from `Config` (config.py)

The loop knows nothing about any method beyond the generator contract (prompts.PromptGenerator): the model returns
logits and a dict of auxiliary losses, loss = CE + Σ_k w_k·aux_k (the model says the weights; every raw term is logged),
and a generator may have a per-epoch hook. Recipe: AdamW (lr 1e-3, wd 1e-4, the V²APT paper's) or SGD (VPT's),
linear warm-up then cosine decay, per step. The run folder is runs.py's. A non-finite loss stops the run before its
optimizer step (FloatingPointError, exit code 2): the files of the last finished epoch stay, ready for --resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import fields  # noqa: F401  (the lessons and tests read Config's fields from here)
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import dist as vdist
from . import probe, runs
from .build import (base_lr, build_backbone, build_data, build_loaders, build_model, build_optimizer,  # noqa: F401
                    lr_lambda, pick_device, setup, use_bf16, validate)
from .config import METHODS, PRESETS, Config, build_parser  # noqa: F401  (re-exported for the lessons)
from .prompts import PromptedViT
from .runs import atomic_write, load_trainable, trainable_state  # noqa: F401  (re-exported)

# An auxiliary loss whose epoch mean is below AUX_ZERO is dead; one below AUX_NEAR_ZERO all run long has collapsed.
AUX_ZERO, AUX_NEAR_ZERO = 1e-8, 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# The step, shared by train, --check and the benchmarks


def total_loss(logits, y, aux: dict, weights: dict, ramp: float = 1.0):
    """loss = CE + ramp · Σ_k w_k · aux_k, in fp32 whatever the autocast dtype. Returns (loss, CE)."""
    ce = F.cross_entropy(logits.float(), y)
    return ce + ramp * sum(weights[k] * v.float() for k, v in aux.items()), ce


def forward_loss(net, x, y, weights: dict, bf16: bool, ramp: float = 1.0):
    """The training forward: logits, the total loss, and every raw term as a float (one device sync)."""
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        logits, aux = net(x, y)
    loss, ce = total_loss(logits, y, aux, weights, ramp)
    values = torch.stack([loss.detach(), ce.detach(), *(v.detach().float() for v in aux.values())]).tolist()
    return logits, loss, dict(zip(["loss", "ce", *aux], values))


class NonFiniteLoss(FloatingPointError):
    def __init__(self, terms: dict):
        super().__init__(f"non-finite loss: {terms}")
        self.terms = terms


def train_step(net, opt, x, y, weights: dict, bf16: bool, ramp: float = 1.0, share: float = 1.0):
    """Forward, loss, backward, optimizer step; returns (logits, terms). A non-finite loss on any rank raises
    NonFiniteLoss on every rank before the backward, so no rank waits in a collective and no weight moves."""
    logits, loss, terms = forward_loss(net, x, y, weights, bf16, ramp)
    if vdist.any_rank(not all(map(math.isfinite, terms.values()))):
        raise NonFiniteLoss(terms)
    opt.zero_grad(set_to_none=True)
    (loss * share).backward()
    opt.step()
    return logits, terms


@torch.no_grad()
def evaluate(model: PromptedViT, loader, device, bf16: bool) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, _ = model(x)
        correct += (logits.argmax(-1) == y).sum().item()
        total += len(y)
    counts = vdist.all_reduce_sum({"correct": correct, "total": total})  # under torchrun: over every rank's shard
    return counts["correct"] / max(1, counts["total"])


def epoch_hook(r: SimpleNamespace) -> dict:
    """The generator's per-epoch hook (prompts.PromptGenerator.epoch_hook), in the run's precision."""
    if r.model.generator is None:
        return {}
    with torch.autocast(r.device.type, torch.bfloat16, enabled=r.bf16):
        return r.model.generator.epoch_hook(r.model, r.hook_loader)


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def train(cfg: Config) -> dict:
    validate(cfg)
    if cfg.check:
        return check(cfg)
    r = setup(cfg)
    model, out, is_main = r.model, r.out, r.rank == 0  # only rank 0 prints and writes
    log = print if is_main else (lambda *a, **k: None)
    log(model.param_summary())
    sizes = " | ".join(f"{k} {len(v)}" for k, v in r.splits.items())
    processes = f" × {r.world} processes" if r.world > 1 else ""
    log(f"data: {cfg.dataset} {sizes} | {cfg.img_size}px | device {r.device}{processes} | "
        f"{'bf16 autocast' if r.bf16 else 'fp32'}")
    # DDP all-reduces (averages) the gradients in backward; `model` itself evaluates, saves and holds the generator.
    net = DistributedDataParallel(model, device_ids=[r.device.index] if r.device.type == "cuda" else None) \
        if r.world > 1 else model
    opt = build_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(cfg.warmup_epochs * len(r.loader)), r.total))
    start, step, best = 0, 0, {"val_acc": -1.0, "epoch": -1}
    if r.st:
        opt.load_state_dict(r.st["optimizer"])
        sched.load_state_dict(r.st["scheduler"])
        start, step, best = r.st["epoch"] + 1, r.st["step"], r.st["best"]
        torch.set_rng_state(r.st["rng"])
        r.order_rng.set_state(r.st["loader_rng"])
        log(f"resumed {out} after epoch {start}")
    if is_main:
        runs.start_run(out, dataclasses.asdict(cfg), r.source.classes, start if cfg.resume else None)
    if not cfg.resume:
        epoch_hook(r)  # the generator's per-epoch hook, before the first epoch
    weights = model.aux_weights()
    t0, seen, train_time, val_acc, test_acc = time.time(), 0, 0.0, float("nan"), None  # test: None under --no-eval-test
    aux_max = {}  # the largest epoch mean of each raw auxiliary loss: ~0 for a whole run is reported
    for epoch in range(start, cfg.epochs):
        if r.world > 1:  # each rank its own dropout/sampling stream, from (seed, epoch, rank): resume stays exact
            torch.manual_seed(cfg.seed + 1_000_003 * (epoch + 1) + 7919 * r.rank)
        net.train()
        sums, n, t_ep = {"loss": 0.0, "correct": 0.0}, 0, time.time()
        bar = tqdm(r.loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not (cfg.progress and is_main))
        for i, (x, y) in enumerate(bar):
            x, y = x.to(r.device), y.to(r.device)
            ramp = min(1.0, (step + 1) / (cfg.aux_warmup_epochs * len(r.loader))) if cfg.aux_warmup_epochs else 1.0
            # DDP averages the rank gradients; weighting each rank by its share of the global batch makes that the
            # gradient of the global batch mean (exactly 1 except in a last batch that splits unevenly over the ranks)
            share = len(y) * r.world / r.loader.batch_sampler.global_size(i)
            try:
                logits, terms = train_step(net, opt, x, y, weights, r.bf16, ramp, share)
            except NonFiniteLoss as e:
                raise runs.nonfinite_loss(out, epoch, step, i, e.terms) from None
            sched.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            sums["correct"] += (logits.argmax(-1) == y).sum().item()
            n += len(y)
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
            if step == r.total:
                break
        train_time += time.time() - t_ep
        sums = vdist.all_reduce_sum({**sums, "n": n})  # the whole global batch's sums, on every rank
        n = sums.pop("n")
        seen += n
        last = epoch == cfg.epochs - 1 or step == r.total
        extra = {} if last else epoch_hook(r)  # and after every epoch but the last
        val_acc = evaluate(model, r.val_loader, r.device, r.bf16)
        if last and cfg.eval_test:
            test_acc = evaluate(model, r.test_loader, r.device, r.bf16)
        row = {"epoch": epoch + 1, "step": step, "lr": sched.get_last_lr()[0], "train_acc": sums.pop("correct") / n,
               **{k: v / n for k, v in sums.items()}, **extra, "val_acc": val_acc, "epoch_time_s": time.time() - t_ep}
        if last and cfg.eval_test:
            row["test_acc"] = test_acc
        dead = [k for k, w in weights.items() if w > 0 and abs(row.get(k, 0.0)) < AUX_ZERO
                and not k.endswith("_floor")]      # a refund (free bits) is zero by design above its floor
        if dead:  # a term that is zero all epoch is not training anything: a bug, or no positives in any batch
            row["warnings"] = [f"auxiliary loss {k!r} was zero all epoch although its weight is {weights[k]}"
                               for k in dead]
        for k in weights:
            aux_max[k] = max(aux_max.get(k, 0.0), abs(row.get(k, 0.0)))
        improved = val_acc > best["val_acc"]
        if improved:
            best = {"val_acc": val_acc, "epoch": epoch}
        if is_main:
            runs.save_epoch(out, row, model, improved, {
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "step": step,
                "best": best, "rng": torch.get_rng_state(), "loader_rng": r.order_rng.get_state()})
        for w in row.get("warnings", []):
            log(f"warning: epoch {epoch + 1}: {w}")
        log(f"epoch {epoch + 1:3d} | loss {row['loss']:.4f} | train {row['train_acc']:.3f} | val {val_acc:.3f}"
            + (f" | test {test_acc:.3f}" if last and cfg.eval_test else "") + f" | {row['epoch_time_s']:.1f}s",
            flush=True)
        if step == r.total:
            break
    best_test = best_epoch_test_acc(cfg, r, best, epoch, test_acc)
    return finish(cfg, r, weights, aux_max, best, val_acc, test_acc, time.time() - t0, seen / max(train_time, 1e-9),
                  best_test)


def best_epoch_test_acc(cfg: Config, r, best: dict, last_epoch: int, test_acc):
    """Test accuracy of the best-validation epoch (best.safetensors): the grid's second column beside the last epoch's.
    The model is put back to its last epoch afterwards. None under --no-eval-test or --no-best-val-test."""
    if not (cfg.eval_test and cfg.best_val_test):
        return None
    if best["epoch"] == last_epoch:
        return test_acc
    vdist.barrier()  # rank 0 wrote best.safetensors; every rank reads it
    last = runs.trainable_state(r.model)   # a copy: loading best.safetensors below leaves it alone
    runs.load_trainable(r.model, r.out / "best.safetensors", cfg)
    acc = evaluate(r.model, r.test_loader, r.device, r.bf16)
    r.model.load_state_dict(last, strict=False)
    return acc


def finish(cfg: Config, r, weights, aux_max, best, val_acc, test_acc, wall, img_per_s, best_test=None) -> dict:
    """The run's summary.json and table; a warning for an auxiliary loss that stayed near zero all run."""
    log = print if r.rank == 0 else (lambda *a, **k: None)
    # (a free-bits refund, V²APT's kl_floor, is zero by design once every latent dimension is above its floor)
    near_zero = sorted(k for k, v in aux_max.items() if weights.get(k, 0) > 0 and v < AUX_NEAR_ZERO
                       and not k.endswith("_floor"))
    for k in near_zero:  # for V²APT's KL this is a collapsed posterior: z carries no information about the image
        log(f"warning: auxiliary loss {k!r} stayed below {AUX_NEAR_ZERO:g} in every epoch although its weight is "
            f"{weights[k]}")
    # does the generator use the image? (probe.py; the validation split, never the test split)
    diagnostics = probe.cheap(r.model, r.splits["val"], r.device, r.bf16) if r.rank == 0 else {}
    latent = diagnostics.get("latent")
    if latent and latent["collapsed"]:
        log(f"warning: the latent carries {latent['mi_bits']:.2f} bits per image (mutual information on the validation "
            f"split; KL {latent['kl_nats']:.3f} nats), under one bit: a collapsed posterior, the instance prompts "
            "hardly depend on the image")
    trainable, total_params = r.model.param_counts()
    summary = {"method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, "num_classes": len(r.source.classes),
               "lr": base_lr(cfg), "best_val_acc": best["val_acc"], "best_epoch": best["epoch"] + 1,
               "last_val_acc": val_acc, "test_acc": test_acc, "best_val_test_acc": best_test,
               "trainable_params": trainable, "total_params": total_params,
               "trainable_pct": 100 * trainable / total_params, "wall_time_s": wall, "train_img_per_s": img_per_s,
               "device": str(r.device), "precision": "bf16" if r.bf16 else "fp32", "world_size": r.world,
               "aux_near_zero": near_zero, "probe": diagnostics, "run_dir": str(r.out)}
    if r.rank == 0:
        runs.atomic_write(r.out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    log(runs.results_table([summary]))
    vdist.cleanup()
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# --check, load_run, the CLI


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def check(cfg: Config) -> dict:
    """--check (train calls it after validate): the run's own setup (the splits, the weights, the model, the per-epoch
    hook), two timed training steps on a real batch, and the plan printed. Writes nothing; returns the plan."""
    r = setup(cfg)
    model, done = r.model, r.st["step"] if r.st else 0
    hook_s = time.perf_counter()
    epoch_hook(r)  # as before the first epoch
    hook_s = time.perf_counter() - hook_s
    opt, weights, batches, step_s = build_optimizer(cfg, model), model.aux_weights(), iter(r.loader), []
    model.train()
    for _ in range(2):  # the first step carries the one-off costs (allocation, kernels); the second is the estimate
        t = time.perf_counter()
        x, y = next(batches, None) or next(iter(r.loader))
        train_step(model, opt, x.to(r.device), y.to(r.device), weights, r.bf16)
        sync(r.device)
        step_s.append(time.perf_counter() - t)
    model.eval()
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast(r.device.type, torch.bfloat16, enabled=r.bf16):
        model(x.to(r.device))
    sync(r.device)
    eval_img_s = len(x) / (time.perf_counter() - t)
    epochs = math.ceil(r.total / len(r.loader)) - done // len(r.loader)
    n_test = len(r.splits["test"]) if cfg.eval_test else 0
    eval_s = (epochs * len(r.splits["val"]) + n_test) / r.world / eval_img_s
    plan = {"method": cfg.method, "dataset": cfg.dataset, "train": len(r.splits["train"]), "val": len(r.splits["val"]),
            "test": n_test, "classes": len(r.source.classes), "img_size": cfg.img_size,
            "trainable_params": model.param_counts()[0], "total_params": model.param_counts()[1],
            "device": str(r.device), "precision": "bf16" if r.bf16 else "fp32", "world_size": r.world,
            "steps_per_epoch": len(r.loader), "total_steps": r.total, "step_s": step_s,
            "estimated_s": (r.total - done) * step_s[1] + eval_s + epochs * hook_s, "run_dir": str(r.out)}
    if r.rank == 0:
        print(f"check: the configuration is valid; the data, the weights and two training steps ran; nothing was "
              f"written\n  method     {cfg.method} | {model.param_summary()}\n"
              f"  data       {cfg.dataset} ({cfg.protocol}) | train {plan['train']} | val {plan['val']} | test "
              f"{plan['test']} | {plan['classes']} classes | {cfg.img_size}px\n"
              f"  device     {r.device} | {plan['precision']} | {r.world} process{'es' if r.world > 1 else ''}, "
              f"{vdist.per_rank_batch(cfg.batch_size, r.world)} images each per step\n"
              f"  schedule   {len(r.loader)} steps per epoch | {r.total} steps in all ({cfg.epochs} epochs"
              + (f", capped by --max-steps {cfg.max_steps}" if cfg.max_steps else "") + f") | global batch "
              f"{cfg.batch_size}\n  run folder {r.out}" + (f" (resumes after step {done})" if cfg.resume else " (new)")
              + f"\n  time       about {duration(plan['estimated_s'])}: an estimate, extrapolated from 2 timed "
              f"training steps on a real batch ({step_s[0]:.2f} s with warm-up, then {step_s[1]:.2f} s) and one "
              f"evaluation batch ({eval_img_s:.0f} img/s)")
    vdist.cleanup()
    return plan


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_run(run_dir, which: str = "last", device="cpu") -> tuple[PromptedViT, Config]:
    """Rebuild the model of a run folder: backbone from its weights, trainable tensors and buffers from a checkpoint."""
    run_dir = Path(run_dir)
    cfg = Config(**runs.read_json(run_dir / "config.json"))
    classes = runs.read_json(run_dir / "classes.json")
    device = torch.device(device)
    model = build_model(cfg, build_backbone(cfg, device), len(classes))
    load_trainable(model, run_dir / f"{which}.safetensors", cfg)
    return model.to(device).eval(), cfg


def config_from_args(argv=None) -> Config:
    """The command line → a checked Config: a preset (or --resume's saved config), then the options given now."""
    given = vars(build_parser().parse_args(argv))  # only the options actually given (defaults are suppressed)
    base = PRESETS[given.pop("preset", "default")]
    if given.get("resume"):  # continue the saved run: its config, with only the options given now changed
        base = {**runs.read_json(Path(given["resume"]) / "config.json"), "out": given["resume"]}  # it may have moved
    return validate(Config(**{**base, **given}))


def main(argv=None):
    """The CLI: bad options or input (ValueError, an unreadable file: OSError), a non-finite loss: exit code 2."""
    try:
        train(config_from_args(argv))
    except (ValueError, OSError, FloatingPointError) as e:
        rank, world, _ = vdist.env_ranks()
        print(f"error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
