"""Train a prompt-tuned (or linearly probed, or fully fine-tuned) ViT: one config, one CLI, one loop.

    python -m vapt_min.train                         # VPT-Deep on CIFAR-10-1k with the real ViT-Ti/16 (CPU, minutes)
    python -m vapt_min.train --method vpt-shallow --seed 1
    python -m vapt_min.train --preset paper          # the papers' protocol (224 px, 100 epochs): for a GPU
    python -m vapt_min.train --check                 # validate, load data and weights, time 2 steps, print the plan
    torchrun --nproc_per_node 4 -m vapt_min.train    # DistributedDataParallel; --batch-size is the global batch
    python -m vapt_min.train --help                  # every option, generated from `Config`

The loop knows nothing about any method beyond "the model returns logits and a dict of auxiliary losses":
loss = cross-entropy + Σ_k w_k·aux_k (the model says the weights; every raw term is logged). Recipe: AdamW (lr 1e-3, wd 1e-4, the V²APT paper's) or SGD (VPT's), linear
warm-up then cosine decay, per step.

A run folder holds `config.json`, `metrics.jsonl` (one line per epoch), `summary.json`, the trainable tensors
only (`last.safetensors`, `best.safetensors`) and `train_state.pt` (optimizer, scheduler, epoch) for `--resume`.
A non-finite loss stops the run before its optimizer step (FloatingPointError, exit code 2): the files of the
last finished epoch stay as they were, ready for `--resume`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import data as vdata
from . import dist as vdist
from .prompts import DeepPrompts, PromptedViT, ShallowPrompts
from .adaptive_prompt import AdaptivePrompts
from .pca_fusion import ViaPTPrompts
from .metric_guidance import ClassPromptMap, MetricGuidedPrompts, class_means, enable_bias_tuning
from .vae_prompt import VAEPrompts
from .full_v2apt import FullV2APTPrompts
from .vit import ViT, from_pretrained, parse_name

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "v2apt", "viapt", "vapt", "davpt", "davpt+", "full-v2apt")
PROTOCOLS = vdata.PROTOCOLS


@dataclass
class Config:
    method: str = field(default="vpt-deep", metadata={"help": f"one of {', '.join(METHODS)}"})
    dataset: str = field(default="cifar10", metadata={"help": "cifar10, mnist, folder:<path> or vtab:<name>"})
    data_root: str | None = field(default=None, metadata={"help": f"data folder (default: ${vdata.DATA_ENV} or <repo>/data)"})
    download: bool = field(default=False, metadata={"help": "download the dataset with torchvision when it is not on disk"})
    protocol: str = field(default="vtab1k", metadata={"help": f"split protocol: {', '.join(PROTOCOLS)}"})
    n_train: int = field(default=800, metadata={"help": "training images (vtab1k protocol)"})
    n_val: int = field(default=200, metadata={"help": "validation images drawn from the training set"})
    shots: int | None = field(default=None, metadata={"help": "images per class (protocol shots)"})
    percent: float | None = field(default=None, metadata={"help": "percentage of the training set (protocol percent)"})
    test_cap: int | None = field(default=2000, metadata={"help": "evaluate on this many test images (fixed subset); none = all"})
    model: str = field(default="vit_tiny_patch16_224.augreg_in21k_ft_in1k", metadata={"help": "timm ViT name"})
    weights: str = field(default="auto", metadata={"help": "'auto' (<data_root>/weights/<model>/ if present, else the timm hub), "
                                                          "'hub', 'random', or a .safetensors/.pth file or folder"})
    img_size: int = field(default=112, metadata={"help": "input size in pixels (a multiple of the patch size)"})
    num_prompts: int = field(default=10, metadata={"help": "prompt tokens per layer (P)"})
    inst_prompts: int = field(default=5, metadata={"help": "v2apt: instance prompts per layer (the other num_prompts - inst_prompts are domain prompts)"})
    latent_dim: int = field(default=8, metadata={"help": "v2apt: VAE latent size K"})
    beta: float = field(default=0.01, metadata={"help": "v2apt: weight of the KL term, loss = CE + beta * KL"})
    eval_samples: int = field(default=1, metadata={"help": "v2apt, viapt: 1 = inference with z = mu; R > 1 = mean logits of R sampled z"})
    pca_dim: int = field(default=32, metadata={"help": "viapt: m, the principal directions of the previous prompt outputs kept before every block after the first (0 = VPT-Deep, D = VPT-Shallow)"})
    viapt_instance: bool = field(default=True, metadata={"help": "viapt: the instance branch (encoder, sampled prompts fused into block 0's)"})
    inst_pca_dim: int = field(default=16, metadata={"help": "viapt: principal directions k of the instance prompts kept in the fusion"})
    pca_refresh: int = field(default=25, metadata={"help": "viapt: recompute the running principal directions every this many steps"})
    vapt_kernel: int = field(default=2, metadata={"help": "vapt: size k of the k×k kernel shared by all channels (no padding)"})
    vapt_hidden: int = field(default=8, metadata={"help": "vapt: bottleneck width r of the shared feature projector D → r → D"})
    vapt_dropout: float = field(default=0.1, metadata={"help": "vapt: Dropout2d after the kernel and dropout in the projector"})
    mg_layers: str = field(default="last", metadata={"help": "davpt: guided blocks, 'last' or comma-separated 0-based indices, e.g. 9,10,11"})
    mg_prompts: int | None = field(default=None, metadata={"help": "davpt: guided prompts per guided block (G, the proxies; none = all num_prompts)"})
    mg_visual: float = field(default=0.1, metadata={"help": "davpt: weight (the paper's beta) of L_ML(X, P), visual anchors vs prompts"})
    mg_cls: float = field(default=0.1, metadata={"help": "davpt: weight (the paper's lambda) of L_ML(P, x_cls), CLS query vs prompts"})
    mg_alpha: float = field(default=32.0, metadata={"help": "davpt: Proxy-Anchor scale alpha"})
    mg_delta: float = field(default=0.1, metadata={"help": "davpt: Proxy-Anchor margin delta"})
    mg_normalise: str = field(default="original", metadata={"help": "davpt: 'original' (positive term over proxies with positives) or 'all'"})
    mg_anchor: str = field(default="attn", metadata={"help": "davpt: visual anchors, 'attn' (saliency-weighted attention output, §3.3) or 'mean' patch token"})
    bias_extended: bool = field(default=False, metadata={"help": "davpt+: also tune attn.proj, mlp.fc2, norm1 and norm2 biases"})
    vae: bool = field(default=True, metadata={"help": "full-v2apt: VAE instance prompts next to the domain prompts (V²APT; "
                                                      "uses --inst-prompts, --latent-dim, --beta)"})
    pca: bool = field(default=True, metadata={"help": "full-v2apt: ViaPT's PCA fusion of the domain prompts across layers (uses --pca-dim, --pca-refresh)"})
    guide: bool = field(default=True, metadata={"help": "full-v2apt: DA-VPT's metric guidance of the domain prompts (uses the --mg-* options)"})
    kv_bias: bool = field(default=True, metadata={"help": "full-v2apt: DA-VPT+'s k, v bias tuning (with --bias-extended, more biases)"})
    aux_warmup_epochs: float = field(default=0.0, metadata={"help": "ramp every auxiliary loss weight (e.g. v2apt's KL) linearly from 0 over this many epochs"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "dropout on the prompt tokens"})
    epochs: int = field(default=20, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "batch size (the global batch under torchrun: split over the processes)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (V²APT's recipe) or sgd (VPT's, momentum 0.9)"})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default: 1e-3 adamw / 0.1 sgd; a tenth for --method full)"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    warmup_epochs: float = field(default=2.0, metadata={"help": "linear warm-up length, then cosine decay to 0"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps (smoke runs)"})
    seed: int = field(default=0, metadata={"help": "seed for splits, initialisation and batch order"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda[:i]"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA and on CPUs with bf16 support), bf16 or fp32"})
    attention: str = field(default="auto", metadata={"help": "auto (sdpa on CUDA, explicit on CPU: faster there), sdpa or explicit"})
    num_workers: int = field(default=0, metadata={"help": "data loader workers (0 = load in the main process)"})
    out: str | None = field(default=None, metadata={"help": "run folder (default: runs/<method>-<dataset>-seed<seed>-<time>)"})
    resume: str | None = field(default=None, metadata={"help": "run folder to continue from its last checkpoint"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    check: bool = field(default=False, metadata={"help": "validate, load the data and weights, build the model, time 2 training "
                                                         "steps and print what would run; writes nothing"})

    def validate(self):
        def bad(msg):
            raise ValueError(f"invalid config: {msg}")
        if self.method not in METHODS:
            bad(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.protocol not in PROTOCOLS:
            bad(f"unknown protocol {self.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
        if self.protocol == "shots" and not self.shots:
            bad("protocol 'shots' needs --shots K (images per class)")
        if self.protocol == "percent" and not self.percent:
            bad("protocol 'percent' needs --percent P (0 < P <= 100)")
        if self.shots is not None and (self.protocol != "shots" or self.shots < 1):
            bad(f"--shots {self.shots} needs --protocol shots and shots >= 1 (the protocol is {self.protocol!r})")
        if self.percent is not None and (self.protocol != "percent" or not 0 < self.percent <= 100):
            bad(f"--percent {self.percent} needs --protocol percent and 0 < percent <= 100 (the protocol is {self.protocol!r})")
        if self.optimizer not in ("adamw", "sgd"):
            bad(f"unknown optimizer {self.optimizer!r}: use adamw or sgd")
        if self.precision not in ("auto", "bf16", "fp32"):
            bad(f"unknown precision {self.precision!r}: use auto, bf16 or fp32")
        if self.attention not in ("auto", "sdpa", "explicit"):
            bad(f"unknown attention {self.attention!r}: use auto, sdpa or explicit")
        patch = parse_name(self.model)["patch_size"]
        if self.img_size % patch:
            bad(f"img_size {self.img_size} is not divisible by the patch size {patch}: use a multiple of {patch}, "
                f"e.g. {patch * max(1, round(self.img_size / patch))}")
        for name in ("epochs", "batch_size", "num_prompts", "n_train"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_val < 0 or self.num_workers < 0 or (self.test_cap is not None and self.test_cap < 1):
            bad(f"need n_val >= 0, num_workers >= 0 and test_cap >= 1 (or none), got {self.n_val}, {self.num_workers}, {self.test_cap}")
        full = self.method == "full-v2apt"
        if full and (self.pca or self.guide) and self.vae and self.inst_prompts >= self.num_prompts:
            bad(f"--inst-prompts {self.inst_prompts} of --num-prompts {self.num_prompts} leaves no domain prompts for the PCA "
                "fusion and the guidance: lower --inst-prompts, or add --no-pca --no-guide")
        if self.method == "v2apt" or (full and self.vae):
            if not 1 <= self.inst_prompts <= self.num_prompts:
                bad(f"prompt split does not add up: --inst-prompts {self.inst_prompts} of --num-prompts {self.num_prompts}; "
                    "use 1 <= inst_prompts <= num_prompts (the rest are domain prompts)")
            if self.latent_dim < 1:
                bad(f"--latent-dim must be >= 1, got {self.latent_dim}")
            if self.beta < 0:
                bad(f"--beta must be >= 0, got {self.beta}")
            if self.eval_samples < 1:
                bad(f"--eval-samples must be >= 1, got {self.eval_samples}")
        if self.method == "vapt":
            grid = self.img_size // patch
            if not 1 <= self.vapt_kernel <= grid:
                bad(f"--vapt-kernel {self.vapt_kernel} does not fit the {grid}×{grid} patch grid of {self.img_size} px "
                    f"inputs: use 1 <= vapt_kernel <= {grid}, or a larger --img-size")
            if self.vapt_hidden < 1:
                bad(f"--vapt-hidden must be >= 1, got {self.vapt_hidden}")
            if not 0 <= self.vapt_dropout < 1:
                bad(f"--vapt-dropout must be in [0, 1), got {self.vapt_dropout}")
        if self.method in ("davpt", "davpt+") or (full and self.guide):
            depth = parse_name(self.model)["depth"]
            try:
                guided_blocks(self.mg_layers, depth)
            except ValueError as e:
                bad(str(e))
            n_dom = self.num_prompts - (self.inst_prompts if full and self.vae else 0)  # the prompts that can be guided
            if self.mg_prompts is not None and not 1 <= self.mg_prompts <= n_dom:
                bad(f"--mg-prompts {self.mg_prompts} must be in [1, {n_dom}] (the " + ("domain prompts: --num-prompts minus "
                    "--inst-prompts)" if full and self.vae else "--num-prompts)"))
            if min(self.mg_visual, self.mg_cls, self.mg_delta) < 0 or self.mg_alpha <= 0:
                bad("--mg-visual, --mg-cls and --mg-delta must be >= 0 and --mg-alpha > 0")
            if self.mg_normalise not in ("original", "all"):
                bad(f"unknown --mg-normalise {self.mg_normalise!r}: use original or all")
            if self.mg_anchor not in ("attn", "mean"):
                bad(f"unknown --mg-anchor {self.mg_anchor!r}: use attn or mean")
        if self.bias_extended and not (self.method == "davpt+" or (full and self.kv_bias)):
            bad(f"--bias-extended extends DA-VPT+'s bias tuning: use it with --method davpt+ (or full-v2apt with --kv-bias), "
                f"not {self.method}")
        if self.aux_warmup_epochs < 0:
            bad(f"--aux-warmup-epochs must be >= 0, got {self.aux_warmup_epochs}")
        if not 0 <= self.prompt_dropout < 1:
            bad(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.lr is not None and not self.lr > 0:
            bad(f"--lr must be > 0, got {self.lr} (leave it out for the optimizer's default)")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            bad(f"--weight-decay and --warmup-epochs must be >= 0, got {self.weight_decay} and {self.warmup_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1, got {self.max_steps}")
        if self.eval_samples != 1 and self.method not in ("v2apt", "viapt") and not (full and self.vae):  # sampled prompts
            bad(f"--eval-samples {self.eval_samples} averages sampled prompts, which only v2apt, viapt and full-v2apt with its "
                f"VAE draw: drop it for --method {self.method}" + (" --no-vae" if full else ""))
        dim = parse_name(self.model)["dim"]
        if full and self.pca and not 1 <= self.pca_dim <= dim:
            bad(f"--pca-dim {self.pca_dim} must be in [1, {dim}] for full-v2apt's PCA fusion (or turn it off: --no-pca)")
        if full and self.pca and self.pca_refresh < 1:
            bad(f"--pca-refresh must be >= 1 step, got {self.pca_refresh}")
        if self.method == "viapt":
            if not 0 <= self.pca_dim <= dim:
                bad(f"--pca-dim {self.pca_dim} must be in [0, {dim}] for {self.model} (0 = VPT-Deep, {dim} = VPT-Shallow)")
            if not 1 <= self.inst_pca_dim <= dim:
                bad(f"--inst-pca-dim must be in [1, {dim}], got {self.inst_pca_dim}")
            if self.eval_samples < 1:
                bad(f"--eval-samples must be >= 1 (1 = z = mu), got {self.eval_samples}")
            if self.pca_refresh < 1:
                bad(f"--pca-refresh must be >= 1 step, got {self.pca_refresh}")
        if self.resume and self.out and Path(self.out).resolve() != Path(self.resume).resolve():
            bad(f"--resume {self.resume} continues that run in its own folder, but --out points to {self.out}: drop --out "
                "(or copy the run folder there and resume the copy)")
        return self


# Presets set defaults; options given on the command line override them.
PRESETS = {
    "default": {},  # CPU: CIFAR-10-1k, 112 px, 20 epochs — the README's main job
    # The accuracy grid on CPU (python -m vapt_min.bench accuracy): 8 epochs and a 1,000-image test subset, so 10 methods
    # × 3 tasks × 3 seeds finish in about 1.5 h on 2 cores. Fewer epochs than the default: figures are lower.
    "cpu": dict(epochs=8, warmup_epochs=1.0, test_cap=1000),
    "paper": dict(img_size=224, epochs=100, batch_size=64, warmup_epochs=10, test_cap=None, num_workers=8),
}


# ---------------------------------------------------------------------------------------------------------
# Building the pieces


def load_weights(cfg: Config) -> ViT:
    if cfg.weights == "random":
        return ViT(num_classes=0, **parse_name(cfg.model))
    if cfg.weights == "hub":
        return from_pretrained(cfg.model, None)
    if cfg.weights == "auto":
        local = vdata.data_root(cfg.data_root) / "weights" / cfg.model
        if (local / "model.safetensors").is_file():
            return from_pretrained(cfg.model, local)
        try:
            return from_pretrained(cfg.model, None)
        except Exception as e:  # offline and nothing on disk: say how to get the weights
            raise FileNotFoundError(
                f"no weights for {cfg.model}: not under {local} and the timm hub failed ({type(e).__name__}). "
                "Run `python data/prepare.py --from ../shared/data` (offline copy) or `python data/prepare.py --download`, "
                "or pass --weights PATH") from e
    return from_pretrained(cfg.model, cfg.weights)


def build_backbone(cfg: Config, device: torch.device) -> ViT:
    """The pretrained ViT with the attention path for this device (numerically equal, faster where chosen)."""
    auto = "sdpa" if device.type == "cuda" else "explicit"  # measured: explicit + bf16 trains ~1.5-2x faster on CPU
    return load_weights(cfg).set_attention(auto if cfg.attention == "auto" else cfg.attention)


def guided_blocks(spec: str, depth: int) -> tuple[int, ...]:
    """'last' or '9,10,11' → block indices, checked against the depth."""
    if spec == "last":
        return (depth - 1,)
    try:
        blocks = tuple(sorted({int(t) for t in spec.split(",")}))
    except ValueError:
        raise ValueError(f"--mg-layers {spec!r}: use 'last' or comma-separated block indices such as 9,10,11") from None
    if not all(0 <= b < depth for b in blocks):
        raise ValueError(f"--mg-layers {spec!r}: block indices must be in [0, {depth - 1}] for a {depth}-block ViT")
    return blocks


def build_model(cfg: Config, vit: ViT, num_classes: int) -> PromptedViT:
    L, D, p = len(vit.blocks), vit.dim, vit.patch_size
    if cfg.method == "linear":
        return PromptedViT(vit, num_classes)
    if cfg.method == "full":
        return PromptedViT(vit, num_classes, train_backbone=True)
    if cfg.method == "vpt-shallow":
        gen = ShallowPrompts(cfg.num_prompts, D, p)
    elif cfg.method == "vpt-deep":
        gen = DeepPrompts(cfg.num_prompts, D, L, p)
    elif cfg.method == "v2apt":
        gen = VAEPrompts(cfg.num_prompts, cfg.inst_prompts, D, L, p, cfg.latent_dim, cfg.beta, cfg.eval_samples)
    elif cfg.method == "viapt":
        gen = ViaPTPrompts(cfg.num_prompts, D, L, p, grid=cfg.img_size // p, pca_dim=cfg.pca_dim, instance=cfg.viapt_instance,
                           inst_pca_dim=cfg.inst_pca_dim, eval_samples=cfg.eval_samples, refresh=cfg.pca_refresh)
    elif cfg.method == "vapt":
        gen = AdaptivePrompts(cfg.num_prompts, D, L, p, grid=cfg.img_size // p, kernel=cfg.vapt_kernel,
                              hidden=cfg.vapt_hidden, dropout=cfg.vapt_dropout)
    elif cfg.method in ("davpt", "davpt+"):
        gen = MetricGuidedPrompts(cfg.num_prompts, D, L, p, vit.blocks, num_classes, guided_blocks(cfg.mg_layers, L),
                                  cfg.mg_prompts, cfg.mg_visual, cfg.mg_cls, cfg.mg_alpha, cfg.mg_delta, cfg.mg_normalise,
                                  cfg.mg_anchor, seed=cfg.seed)
    elif cfg.method == "full-v2apt":
        guide = dict(blocks=vit.blocks, num_classes=num_classes, guided_layers=guided_blocks(cfg.mg_layers, L),
                     num_guided=cfg.mg_prompts, lambda_visual=cfg.mg_visual, lambda_cls=cfg.mg_cls, alpha=cfg.mg_alpha,
                     delta=cfg.mg_delta, normalise=cfg.mg_normalise, anchor=cfg.mg_anchor, seed=cfg.seed)
        gen = FullV2APTPrompts(cfg.num_prompts, D, L, p, cfg.img_size // p, vae=cfg.vae, inst_prompts=cfg.inst_prompts,
                               latent_dim=cfg.latent_dim, beta=cfg.beta, eval_samples=cfg.eval_samples,
                               pca_dim=cfg.pca_dim if cfg.pca else 0, refresh=cfg.pca_refresh, guide=guide if cfg.guide else None)
    else:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    model = PromptedViT(vit, num_classes, gen, prompt_dropout=cfg.prompt_dropout)
    if cfg.method == "davpt+" or (cfg.method == "full-v2apt" and cfg.kv_bias):
        enable_bias_tuning(vit, extended=cfg.bias_extended)  # after PromptedViT, which freezes the whole backbone
    return model


def build_data(cfg: Config, pretrained_cfg: dict):
    source = vdata.load_source(cfg.dataset, cfg.data_root, download=cfg.download)
    splits = vdata.make_splits(source, protocol=cfg.protocol, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val,
                               shots=cfg.shots, percent=cfg.percent, test_cap=cfg.test_cap)
    tf = vdata.build_transform(cfg.img_size, pretrained_cfg["mean"], pretrained_cfg["std"], pretrained_cfg["interpolation"])
    return source, {k: v.with_transform(tf) for k, v in splits.items()}


def pick_device(cfg: Config) -> torch.device:
    """--device, 'auto' meaning cuda when there is one; under torchrun each process takes cuda:LOCAL_RANK."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu (or auto)")
    _, world, local_rank = vdist.env_ranks()
    if world > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {cfg.device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda (or auto)")
        device = torch.device("cuda", local_rank)
    return device


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return True
    # Measured on the project's CPUs: bf16 autocast trains ~1.5-2x faster where the CPU has bf16 instructions.
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def total_loss(logits, y, aux: dict, weights: dict, ramp: float = 1.0):
    """loss = CE + ramp · Σ_k w_k · aux_k, in fp32 whatever the autocast dtype. Returns (loss, CE)."""
    ce = F.cross_entropy(logits.float(), y)
    return ce + ramp * sum(weights[k] * v.float() for k, v in aux.items()), ce


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


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


def trainable_state(model: nn.Module) -> dict:
    """What a checkpoint holds: the trainable tensors, plus the generator's buffers (ViaPT's running PCA statistics)."""
    state = {k: p.detach().contiguous().cpu() for k, p in model.named_parameters() if p.requires_grad}
    state.update({k: b.detach().contiguous().cpu() for k, b in model.named_buffers() if k.startswith("generator.")})
    return state


def atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a half-written checkpoint behind


def load_run(run_dir, which: str = "last", device="cpu") -> tuple[PromptedViT, Config]:
    """Rebuild the model of a run folder: backbone from its weights, trainable tensors from the checkpoint."""
    run_dir = Path(run_dir)
    cfg = Config(**read_json(run_dir / "config.json"))
    classes = read_json(run_dir / "classes.json")
    device = torch.device(device)
    model = build_model(cfg, build_backbone(cfg, device), len(classes))
    load_trainable(model, run_dir / f"{which}.safetensors", cfg)
    return model.to(device).eval(), cfg


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


def load_trainable(model: nn.Module, path: Path, cfg: Config):
    """Put a checkpoint's tensors (`trainable_state`) into `model` once their names and shapes are checked to be the model's."""
    state = read_checkpoint(path, lambda: load_file(str(path)))
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
    if got != expected:
        shapes = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(got.keys() & expected.keys()) if got[k] != expected[k]]
        raise ValueError(f"checkpoint {path} does not match method {cfg.method!r} on {cfg.model}: missing "
                         f"{sorted(expected.keys() - got.keys())[:3]}, unexpected {sorted(got.keys() - expected.keys())[:3]}, "
                         f"other shapes {shapes[:3]}; the options that shape the model must be the run's")
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------------------
# The loop

AUX_ZERO, AUX_NEAR_ZERO = 1e-8, 1e-2  # an epoch mean below AUX_ZERO: a dead term; below AUX_NEAR_ZERO all run: collapsed


def run_folder(cfg: Config) -> tuple[Path, dict | None]:
    """--resume's folder and its train state, or --out (or a new runs/<method>-<dataset>-seed<seed>-<time>) and None.
    Never a folder that holds another run, nor a finished run to resume (that would only overwrite its summary)."""
    out = Path(cfg.resume or cfg.out or f"runs/{cfg.method}-{cfg.dataset.replace(':', '_').replace('/', '_')}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume:
        if (out / "metrics.jsonl").exists():
            raise FileExistsError(f"{out} already holds a run: pass --resume {out} to continue it, or --out another folder")
        return out, None
    if not (out / "train_state.pt").is_file():
        raise FileNotFoundError(f"--resume {out}: no train_state.pt there; pass the folder of an earlier run")
    st = read_checkpoint(out / "train_state.pt",
                         lambda: torch.load(out / "train_state.pt", weights_only=False, map_location="cpu"))
    if st["epoch"] + 1 >= cfg.epochs or (cfg.max_steps is not None and st["step"] >= cfg.max_steps):
        raise ValueError(f"--resume {out}: that run already finished (epoch {st['epoch'] + 1} of {cfg.epochs}, step {st['step']}); "
                         "pass a larger --epochs or --max-steps to train on")
    return out, st


def build_loaders(cfg: Config, splits: dict, rank: int = 0, world: int = 1):
    """This rank's slice of every global training batch, its share of val and test, and the generator of the batch order."""
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = vdist.GlobalBatchSampler(len(splits["train"]), cfg.batch_size, gen, rank, world)
    loader = DataLoader(splits["train"], batch_sampler=sampler, generator=gen, num_workers=cfg.num_workers)
    val_loader, test_loader = (DataLoader(vdist.shard(splits[k], rank, world), 2 * cfg.batch_size // world,
                                          num_workers=cfg.num_workers) for k in ("val", "test"))
    return loader, val_loader, test_loader, gen


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr or (1e-3 if cfg.optimizer == "adamw" else 0.1) * (0.1 if cfg.method == "full" else 1.0)
    return (torch.optim.AdamW(params, lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
            else torch.optim.SGD(params, lr, momentum=0.9, weight_decay=cfg.weight_decay))


def clustered(gen) -> bool:
    """A metric-guided generator (DA-VPT, the full V²APT with guidance) with more classes than guided prompts: its
    class → prompt map is clustered before training and after every epoch (§3.4). With fewer, class c → prompt c."""
    m = getattr(gen, "map", None)
    return isinstance(m, ClassPromptMap) and m.num_classes > m.num_proxies


def update_class_map(model: PromptedViT, features_of: nn.Module, loader, device, bf16: bool) -> int:
    """DA-VPT's class → prompt map (§3.4) from the class means of `features_of` over the train split (the frozen
    backbone before training, the prompted model after each epoch). Rank 0 clusters, every rank receives its map:
    all ranks must guide with the same map, and a k-means on each rank could drift apart. Returns the changes."""
    changes = None
    if vdist.is_main():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            changes = model.generator.update_map(class_means(features_of, loader, device, model.head.out_features))
    m = model.generator.map
    m.assign, m.centroids, changes = vdist.broadcast((m.assign, m.centroids, changes))
    return changes


def nonfinite_loss(out: Path, epoch: int, step: int, batch: int, terms: dict) -> FloatingPointError:
    where = f"non-finite loss in epoch {epoch + 1}, step {step + 1} (batch {batch + 1} of the epoch): " + \
            ", ".join(f"{k} {v:.4g}" for k, v in terms.items()) + "; stopped before the optimizer step. "
    if epoch == 0:
        return FloatingPointError(where + f"No epoch finished, nothing to resume: run again with --out {out} and a lower --lr "
                                          "(or --precision fp32)")
    return FloatingPointError(where + f"{out} still holds the checkpoint of epoch {epoch}: continue with --resume {out} "
                                      "and a lower --lr (or --precision fp32)")


def train(cfg: Config) -> dict:
    cfg.validate()
    if cfg.check:
        return check(cfg)
    vdist.per_rank_batch(cfg.batch_size)  # before any loading: the global batch must split over the torchrun processes
    device = pick_device(cfg)
    rank, world = vdist.setup(device)  # (0, 1) without torchrun
    main = rank == 0  # only rank 0 prints and writes
    log = print if main else (lambda *a, **k: None)
    out, st = run_folder(cfg)
    out = vdist.broadcast(out)  # rank 0's name: a default one carries the time
    seed_everything(cfg.seed)
    bf16 = use_bf16(cfg, device)

    vit = build_backbone(cfg, device)
    source, splits = build_data(cfg, vit.pretrained_cfg)
    model = build_model(cfg, vit, len(source.classes)).to(device)
    log(model.param_summary())
    log(f"data: {cfg.dataset} train {len(splits['train'])} | val {len(splits['val'])} | test {len(splits['test'])} | "
        f"{cfg.img_size}px | device {device}{f' × {world} processes' if world > 1 else ''} | {'bf16 autocast' if bf16 else 'fp32'}")
    loader, val_loader, test_loader, gen = build_loaders(cfg, splits, rank, world)
    # DDP all-reduces (averages) the gradients in backward; `model` itself evaluates, saves and holds the generator.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model

    opt = build_optimizer(cfg, model)
    total = cfg.epochs * len(loader) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(round(cfg.warmup_epochs * len(loader)), total))

    start, step, best = 0, 0, {"val_acc": -1.0, "epoch": -1}
    if cfg.resume:  # every rank reads the checkpoint; a mismatch raises before anything is written
        load_trainable(model, out / "last.safetensors", cfg)
        opt.load_state_dict(st["optimizer"]), sched.load_state_dict(st["scheduler"])
        start, step, best = st["epoch"] + 1, st["step"], st["best"]
        torch.set_rng_state(st["rng"]), gen.set_state(st["loader_rng"])
        log(f"resumed {out} after epoch {start}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for name, obj in (("config.json", dataclasses.asdict(cfg)), ("classes.json", source.classes)):
            atomic_write(out / name, lambda p: p.write_text(json.dumps(obj, indent=1)))  # other ranks may be reading config.json
        if cfg.resume:
            lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
            (out / "metrics.jsonl").write_text("".join(l + "\n" for l in lines if json.loads(l)["epoch"] <= start))

    # DA-VPT with more classes than guided prompts clusters them (with fewer, class c → prompt c: nothing to do)
    guided = clustered(model.generator)
    if guided:  # DA-VPT's class → prompt map (§3.4): from the frozen backbone, or restored on --resume
        map_loader = DataLoader(splits["train"], 2 * cfg.batch_size, num_workers=cfg.num_workers)  # unshuffled, all of it
        if cfg.resume:
            model.generator.map.assign, model.generator.map.centroids = st["mg_map"]
        else:
            update_class_map(model, vit, map_loader, device, bf16)

    weights = model.aux_weights()
    t0, seen, train_time, val_acc, test_acc = time.time(), 0, 0.0, float("nan"), float("nan")
    aux_max = {}  # the largest epoch mean of each raw auxiliary loss: ~0 for a whole run is reported
    for epoch in range(start, cfg.epochs):
        if world > 1:  # each rank its own dropout/sampling stream, a function of (seed, epoch, rank): resume stays exact
            torch.manual_seed(cfg.seed + 1_000_003 * (epoch + 1) + 7919 * rank)
        net.train()
        sums, n = {"loss": 0.0, "correct": 0.0}, 0
        t_ep = time.time()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=not (cfg.progress and main))
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits, aux = net(x, y)
            ramp = min(1.0, (step + 1) / (cfg.aux_warmup_epochs * len(loader))) if cfg.aux_warmup_epochs else 1.0
            loss, ce = total_loss(logits, y, aux, weights, ramp)
            values = torch.stack([loss.detach(), ce.detach(), *(v.detach().float() for v in aux.values())]).tolist()  # one sync
            terms = dict(zip(["loss", "ce", *aux], values))
            if vdist.any_rank(not all(map(math.isfinite, terms.values()))):  # every rank stops, none waits in backward
                raise nonfinite_loss(out, epoch, step, i, terms)
            opt.zero_grad(set_to_none=True)
            # DDP averages the rank gradients; weighting each rank by its share of the global batch makes that the gradient
            # of the global batch mean. The weight is exactly 1 except in a last batch that splits unevenly over the ranks.
            (loss * (len(y) * world / loader.batch_sampler.global_size(i))).backward()
            opt.step()
            sched.step()
            step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            sums["correct"] += (logits.argmax(-1) == y).sum().item()
            n += len(y)
            bar.set_postfix(loss=f"{terms['loss']:.3f}")
            if step == total:
                break
        train_time += time.time() - t_ep
        sums = vdist.all_reduce_sum({**sums, "n": n})  # the whole global batch's sums, on every rank
        n = sums.pop("n")
        seen += n
        last = epoch == cfg.epochs - 1 or step == total
        extra = {}
        if guided and not last:  # re-cluster from the current model, warm-started; timed apart from the step
            t_map = time.time()
            extra["map_changes"] = update_class_map(model, model, map_loader, device, bf16)
            extra["map_time_s"] = time.time() - t_map
        val_acc = evaluate(model, val_loader, device, bf16)
        if last:
            test_acc = evaluate(model, test_loader, device, bf16)
        row = {"epoch": epoch + 1, "step": step, "lr": sched.get_last_lr()[0], "train_acc": sums.pop("correct") / n,
               **{k: v / n for k, v in sums.items()}, **extra, "val_acc": val_acc, "epoch_time_s": time.time() - t_ep}
        if last:
            row["test_acc"] = test_acc
        dead = [k for k, w in weights.items() if w > 0 and abs(row.get(k, 0.0)) < AUX_ZERO]
        if dead:  # a term that is zero all epoch is not training anything: a bug, or no positives in any batch
            row["warnings"] = [f"auxiliary loss {k!r} was zero all epoch although its weight is {weights[k]}" for k in dead]
        for k in weights:
            aux_max[k] = max(aux_max.get(k, 0.0), abs(row.get(k, 0.0)))
        improved = val_acc > best["val_acc"]
        if improved:
            best = {"val_acc": val_acc, "epoch": epoch}
        if main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            state = trainable_state(model)
            if improved:
                atomic_write(out / "best.safetensors", lambda p: save_file(state, str(p)))
            atomic_write(out / "last.safetensors", lambda p: save_file(state, str(p)))
            atomic_write(out / "train_state.pt", lambda p: torch.save(
                {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch, "step": step, "best": best,
                 "rng": torch.get_rng_state(), "loader_rng": gen.get_state(),
                 "mg_map": (model.generator.map.assign, model.generator.map.centroids) if guided else None}, p))
        for w in row.get("warnings", []):
            log(f"warning: epoch {epoch + 1}: {w}")
        log(f"epoch {epoch + 1:3d} | loss {row['loss']:.4f} | train {row['train_acc']:.3f} | val {val_acc:.3f}"
            + (f" | test {test_acc:.3f}" if last else "") + f" | {row['epoch_time_s']:.1f}s", flush=True)
        if step == total:
            break

    near_zero = sorted(k for k, v in aux_max.items() if weights.get(k, 0) > 0 and v < AUX_NEAR_ZERO)
    for k in near_zero:  # for V²APT's KL this is a collapsed posterior: z carries no information about the image
        log(f"warning: auxiliary loss {k!r} stayed below {AUX_NEAR_ZERO:g} in every epoch although its weight is {weights[k]}")
    trainable, total_params = model.param_counts()
    summary = {"method": cfg.method, "dataset": cfg.dataset, "seed": cfg.seed, "num_classes": len(source.classes),
               "best_val_acc": best["val_acc"], "best_epoch": best["epoch"] + 1, "last_val_acc": val_acc, "test_acc": test_acc,
               "trainable_params": trainable, "total_params": total_params, "trainable_pct": 100 * trainable / total_params,
               "wall_time_s": time.time() - t0, "train_img_per_s": seen / max(train_time, 1e-9), "device": str(device),
               "precision": "bf16" if bf16 else "fp32", "world_size": world, "aux_near_zero": near_zero, "run_dir": str(out)}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log(results_table([summary]))
    vdist.cleanup()
    return summary


def duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def check(cfg: Config) -> dict:
    """--check: what a run does before its first step (validate, load the splits and the weights, build the model), two
    timed training steps on a real batch, and the plan printed. Writes nothing; returns the plan."""
    cfg.validate()
    rank, world, _ = vdist.env_ranks()
    per_rank = vdist.per_rank_batch(cfg.batch_size, world)
    out, st = run_folder(cfg)
    device = pick_device(cfg)
    bf16 = use_bf16(cfg, device)
    seed_everything(cfg.seed)
    vit = build_backbone(cfg, device)
    source, splits = build_data(cfg, vit.pretrained_cfg)
    model = build_model(cfg, vit, len(source.classes)).to(device)
    if st:  # --resume: the checkpoint must fit the model these options build
        load_trainable(model, out / "last.safetensors", cfg)
    loader = build_loaders(cfg, splits, rank, world)[0]
    total = cfg.epochs * len(loader) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(loader))
    done = st["step"] if st else 0
    guided = clustered(model.generator)
    if guided:  # timing only: any class map will do
        model.generator.update_map(torch.randn(len(source.classes), vit.dim))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    opt, weights, batches, step_s = build_optimizer(cfg, model), model.aux_weights(), iter(loader), []
    model.train()
    for _ in range(2):  # the first step carries the one-off costs (allocation, kernel selection); the second is the estimate
        t = time.perf_counter()
        x, y = next(batches, None) or next(iter(loader))
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            logits, aux = model(x, y)
        loss, _ = total_loss(logits, y, aux, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step_s.append(time.perf_counter() - t)
    model.eval()
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        model(x)
    sync()
    eval_img_s = len(x) / (time.perf_counter() - t)
    epochs = math.ceil(total / len(loader)) - done // len(loader)
    eval_images = (epochs * len(splits["val"]) + len(splits["test"])) / world + (epochs * len(splits["train"]) if guided else 0)
    train_s, eval_s = (total - done) * step_s[1], eval_images / eval_img_s
    plan = {"method": cfg.method, "dataset": cfg.dataset, "train": len(splits["train"]), "val": len(splits["val"]),
            "test": len(splits["test"]), "classes": len(source.classes), "img_size": cfg.img_size,
            "trainable_params": model.param_counts()[0], "total_params": model.param_counts()[1], "device": str(device),
            "precision": "bf16" if bf16 else "fp32", "world_size": world, "steps_per_epoch": len(loader), "total_steps": total,
            "step_s": step_s, "estimated_s": train_s + eval_s, "run_dir": str(out)}
    if rank == 0:
        print(f"check: the configuration is valid; the data, the weights and two training steps ran; nothing was written\n"
              f"  method     {cfg.method} | {model.param_summary()}\n"
              f"  data       {cfg.dataset} ({cfg.protocol}) | train {plan['train']} | val {plan['val']} | test {plan['test']} | "
              f"{plan['classes']} classes | {cfg.img_size}px\n"
              f"  device     {device} | {plan['precision']} | {world} process{'es' if world > 1 else ''}, {per_rank} images each per step\n"
              f"  schedule   {len(loader)} steps per epoch | {total} steps in all ({cfg.epochs} epochs"
              + (f", capped by --max-steps {cfg.max_steps}" if cfg.max_steps else "") + f") | global batch {cfg.batch_size}\n"
              f"  run folder {out}" + (f" (resumes after step {done})" if cfg.resume else " (new)") + "\n"
              f"  time       about {duration(plan['estimated_s'])}: an estimate, extrapolated from 2 timed training steps on a real "
              f"batch ({step_s[0]:.2f} s with warm-up, then {step_s[1]:.2f} s) and one evaluation batch ({eval_img_s:.0f} img/s)")
    return plan


def results_table(rows: list[dict]) -> str:
    head = "| method | dataset | seed | best val | last val | test | trainable params | trainable % | train img/s | wall s |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['dataset']} | {r['seed']} | {r['best_val_acc']:.3f} | {r['last_val_acc']:.3f} | "
                     f"{r['test_acc']:.3f} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | {r['train_img_per_s']:.1f} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The CLI, generated from Config: one option per field, types from the annotations, unknown options are errors.


def parse_value(kind: str):
    base = kind.replace(" | None", "")
    conv = {"int": int, "float": float, "str": str}[base]
    if " | None" not in kind:
        return conv
    return lambda s: None if s.lower() == "none" else conv(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vapt_min.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                   help="start from a preset: " + "; ".join(f"{k}: {v or 'the defaults'}" for k, v in PRESETS.items()))
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {f.default})")
        else:
            p.add_argument(flag, type=parse_value(f.type), default=argparse.SUPPRESS, metavar=f.type.split(" ")[0].upper(),
                           help=f"{f.metadata['help']} (default: {f.default})")
    return p


def config_from_args(argv=None) -> Config:
    given = vars(build_parser().parse_args(argv))  # only the options actually given (defaults are suppressed)
    base = PRESETS[given.pop("preset", "default")]
    if given.get("resume"):  # continue the saved run: its config, with only the options given now changed
        base = {**read_json(Path(given["resume"]) / "config.json"), "out": given["resume"]}  # the run lives where it is now
    return Config(**{**base, **given}).validate()


def main(argv=None):
    """The CLI: bad options or input (ValueError, an unreadable file: OSError) and a non-finite loss exit with code 2."""
    try:
        cfg = config_from_args(argv)
        train(cfg)
    except (ValueError, OSError, FloatingPointError) as e:
        rank, world, _ = vdist.env_ranks()
        print(f"error{f' (rank {rank})' if world > 1 else ''}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
