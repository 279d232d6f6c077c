"""Config → the pieces of a run: backbone, model, data, loaders, device, precision, optimizer; and `setup(cfg)`, which
puts them together in one order for train, --check and the benchmarks.

`build_model` is the one place that knows the methods: one constructor call per method, by keyword. Each constructor
checks its own options, so `validate(cfg)` builds the model on PyTorch's meta device (shapes only: no memory, no
weights, no data) and every rule of every method runs before anything loads.
Adding a method: its file (a `prompts.PromptGenerator`), its options in `config.Config`, one branch here.
"""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from . import data as vdata
from . import dist as vdist
from . import runs
from .adaptive_prompt import AdaptivePrompts
from .config import METHODS, Config
from .full_v2apt import FullV2APTPrompts
from .metric_guidance import MetricGuidedPrompts, enable_bias_tuning, guided_blocks
from .pca_fusion import ViaPTPrompts
from .prompts import DeepPrompts, PromptedViT, ShallowPrompts
from .vae_prompt import VAEPrompts
from .vit import ViT, from_pretrained, parse_name



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
                f"no weights for {cfg.model}: not under {local} and the timm hub failed ({type(e).__name__}). Run "
                "`python data/prepare.py --from ../shared/data` (offline copy) or `python data/prepare.py --download`, "
                "or pass --weights PATH") from e
    return from_pretrained(cfg.model, cfg.weights)


def build_backbone(cfg: Config, device: torch.device) -> ViT:
    """The pretrained ViT with the attention path for this device (numerically equal, faster where chosen)."""
    auto = "sdpa" if device.type == "cuda" else "explicit"  # measured: explicit + bf16 trains ~1.5-2x faster on CPU
    return load_weights(cfg).set_attention(auto if cfg.attention == "auto" else cfg.attention)


def build_model(cfg: Config, vit: ViT, num_classes: int) -> PromptedViT:
    """Config → model: one constructor call per method, by keyword. The constructors check their own options."""
    L, D, p, grid = len(vit.blocks), vit.dim, vit.patch_size, cfg.img_size // vit.patch_size
    if cfg.method in ("linear", "full"):
        return PromptedViT(vit, num_classes, train_backbone=cfg.method == "full", head_init=cfg.head_init)
    guided = cfg.method in ("davpt", "davpt+") or (cfg.method == "full-v2apt" and cfg.guide)
    guide = dict(guided_layers=guided_blocks(cfg.mg_layers, L), num_guided=cfg.mg_prompts, lambda_visual=cfg.mg_visual,
                 lambda_cls=cfg.mg_cls, alpha=cfg.mg_alpha, delta=cfg.mg_delta, normalise=cfg.mg_normalise,
                 anchor=cfg.mg_anchor, seed=cfg.seed, space=cfg.mg_space) if guided else {}
    P = cfg.num_prompts
    vae = dict(latent_dim=cfg.latent_dim, beta=cfg.beta, eval_samples=cfg.eval_samples, encode_at=cfg.encode_at,
               film_init=cfg.film_init, logvar_init=cfg.logvar_init, free_bits=cfg.free_bits)
    if cfg.method == "vpt-shallow":
        gen = ShallowPrompts(P, D, p)
    elif cfg.method == "vpt-deep":
        gen = DeepPrompts(P, D, L, p)
    elif cfg.method == "v2apt":
        gen = VAEPrompts(P, cfg.inst_prompts, D, L, p, **vae)
    elif cfg.method == "viapt":
        gen = ViaPTPrompts(P, D, L, p, grid=grid, pca_dim=cfg.pca_dim, instance=cfg.viapt_instance,
                           inst_pca_dim=cfg.inst_pca_dim, eval_samples=cfg.eval_samples, refresh=cfg.pca_refresh,
                           history=cfg.viapt_history)
    elif cfg.method == "vapt":
        gen = AdaptivePrompts(P, D, L, p, grid=grid, kernel=cfg.vapt_kernel, hidden=cfg.vapt_hidden,
                              dropout=cfg.vapt_dropout, kernel_init=cfg.vapt_kernel_init)
    elif cfg.method in ("davpt", "davpt+"):
        gen = MetricGuidedPrompts(P, D, L, p, vit.blocks, num_classes, **guide)
    elif cfg.method == "full-v2apt":
        gen = FullV2APTPrompts(P, D, L, p, grid=grid, vae=cfg.vae, inst_prompts=cfg.inst_prompts, vae_options=vae,
                               no_vae_slots=cfg.no_vae_slots,
                               pca_dim=cfg.pca_dim if cfg.pca else 0, refresh=cfg.pca_refresh,
                               history=cfg.viapt_history,
                               guide=dict(blocks=vit.blocks, num_classes=num_classes, **guide) if cfg.guide else None)
    else:
        raise ValueError(f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    model = PromptedViT(vit, num_classes, gen, prompt_dropout=cfg.prompt_dropout, dropout_on=cfg.prompt_dropout_on,
                        head_init=cfg.head_init)
    if cfg.method == "davpt+" or (cfg.method == "full-v2apt" and cfg.kv_bias):
        enable_bias_tuning(vit, extended=cfg.bias_extended)  # after PromptedViT, which freezes the whole backbone
    return model


def validate(cfg: Config) -> Config:
    """Every rule before any data or weights load: the run's (Config.validate), then each method's own, stated once in
    its constructor, run by building the model on the meta device (shapes only, no memory, no weights)."""
    cfg.validate()
    try:
        with torch.device("meta"):
            model = build_model(cfg, ViT(num_classes=0, **parse_name(cfg.model)), num_classes=10)
    except ValueError as e:
        raise ValueError(f"invalid config: --method {cfg.method}: {e}") from None
    if cfg.network_lr_scale not in (None, 1) and not (model.generator is not None and model.generator.network):
        raise ValueError(f"invalid config: --network-lr-scale {cfg.network_lr_scale}: --method {cfg.method} has no "
                         "generator network (only prompt tensors): drop it")
    given = cfg.viapt_learnt_lr_scale != Config.viapt_learnt_lr_scale    # the default is ignored where unused
    if given and not (model.generator is not None and model.generator.learnt):
        raise ValueError(f"invalid config: --viapt-learnt-lr-scale {cfg.viapt_learnt_lr_scale}: --method {cfg.method}"
                         " has no learnt coordinates on a carried history (viapt or full-v2apt with --pca, at "
                         "0 < --pca-dim < width): drop it")
    if cfg.eval_samples != 1 and not (model.generator is not None and model.generator.samples):
        raise ValueError(f"invalid config: --eval-samples {cfg.eval_samples} averages sampled prompts, which --method "
                         f"{cfg.method}{' --no-vae' if cfg.method == 'full-v2apt' else ''} never draws: drop it")
    return cfg


def build_data(cfg: Config, pretrained_cfg: dict):
    """The source and its train/val/test splits, transformed; without a test split under --no-eval-test."""
    source = vdata.load_source(cfg.dataset, cfg.data_root, download=cfg.download)
    splits = vdata.make_splits(source, protocol=cfg.protocol, seed=cfg.seed, n_train=cfg.n_train, n_val=cfg.n_val,
                               shots=cfg.shots, percent=cfg.percent, test_cap=cfg.test_cap)
    if not cfg.eval_test:  # gone, not just unused: any later read of it is a KeyError, not a silent look at test
        del splits["test"]
    tf = vdata.build_transform(cfg.img_size, pretrained_cfg["mean"], pretrained_cfg["std"],
                               pretrained_cfg["interpolation"])
    return source, {k: v.with_transform(tf) for k, v in splits.items()}


def build_loaders(cfg: Config, splits: dict, rank: int = 0, world: int = 1):
    """This rank's slice of every global training batch, its share of val and test (None without a test split), and
    the batch-order RNG. The order depends on the seed alone, never on the method: a seed pairs every method's runs."""
    order_rng = torch.Generator().manual_seed(cfg.seed)
    sampler = vdist.GlobalBatchSampler(len(splits["train"]), cfg.batch_size, order_rng, rank, world)
    loader = DataLoader(splits["train"], batch_sampler=sampler, generator=order_rng, num_workers=cfg.num_workers)
    val_loader, test_loader = (DataLoader(vdist.shard(splits[k], rank, world), 2 * cfg.batch_size // world,
                                          num_workers=cfg.num_workers) if k in splits else None
                               for k in ("val", "test"))
    return loader, val_loader, test_loader, order_rng


def pick_device(cfg: Config) -> torch.device:
    """--device, 'auto' meaning cuda when there is one; under torchrun each process takes cuda:LOCAL_RANK."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu (or auto)")
    _, world, local_rank = vdist.env_ranks()
    if world > 1 and device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {cfg.device}: under torchrun each process takes cuda:LOCAL_RANK; "
                             "pass --device cuda (or auto)")
        device = torch.device("cuda", local_rank)
    return device


def use_bf16(cfg: Config, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    if device.type == "cuda":
        return True
    # Measured on the project's CPUs: bf16 autocast trains ~1.5-2x faster where the CPU has bf16 instructions.
    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def base_lr(cfg: Config) -> float:
    """--lr, or the optimizer's default: 1e-3 AdamW, 0.1 SGD, a tenth of that for full fine-tuning."""
    return cfg.lr or (1e-3 if cfg.optimizer == "adamw" else 0.1) * (0.1 if cfg.method == "full" else 1.0)


def has_vae(cfg: Config) -> bool:
    """V²APT's VAE is in the model: --method v2apt, or full-v2apt with --vae."""
    return cfg.method == "v2apt" or (cfg.method == "full-v2apt" and cfg.vae)


def network_lr_scale(cfg: Config) -> float:
    """--network-lr-scale, or its default: 10 for V²APT's VAE (issue 16: with the deeper encoder input and free bits,
    the encoder and decoder at the prompts' lr leave the latent collapsed; at 10× it carries 3.6-6.8 bits, RESULTS.md),
    1 for every other generator network (VAPT's token maps, ViaPT's encoder: measured at 1)."""
    if cfg.network_lr_scale is not None:
        return cfg.network_lr_scale
    return 10.0 if has_vae(cfg) else 1.0


def vae_recipe(cfg: Config) -> dict:
    """The V²APT options a run trained with, defaults resolved (encode_at None → the model's depth // 2, the network's
    lr scale), {} for a method without the VAE: what the grid compares before it reuses a finished run by its label."""
    if not has_vae(cfg):
        return {}
    middle = parse_name(cfg.model)["depth"] // 2
    return dict(encode_at=middle if cfg.encode_at is None else cfg.encode_at, film_init=cfg.film_init,
                free_bits=cfg.free_bits, logvar_init=cfg.logvar_init, network_lr_scale=network_lr_scale(cfg))


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    lr = base_lr(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    # a group per multiplier: the generator's network (--network-lr-scale), ViaPT's learnt coordinates
    # (--viapt-learnt-lr-scale) at lr × their scale, everything else at lr
    scale = {}
    for attr, s in (("network", network_lr_scale(cfg)), ("learnt", cfg.viapt_learnt_lr_scale)):
        if s != 1 and model.generator is not None:
            prefixes = getattr(model.generator, attr)
            scale.update({id(p): s for n, p in model.generator.named_parameters() if n.startswith(prefixes)})
    if scale:
        params = [{"params": [p for p in params if id(p) not in scale]}] + [
            {"params": [p for p in params if scale.get(id(p)) == s], "lr": lr * s}
            for s in dict.fromkeys(scale.values())]
    return (torch.optim.AdamW(params, lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
            else torch.optim.SGD(params, lr, momentum=0.9, weight_decay=cfg.weight_decay))


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return f


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: Config) -> SimpleNamespace:
    """Everything a run has before its first step, the same for train, --check and load_run's callers: the ranks, the
    run folder (and --resume's state), seeds, device and precision, backbone, data, model, loaders."""
    vdist.per_rank_batch(cfg.batch_size)  # before any loading: the global batch must split over the processes
    device = pick_device(cfg)
    rank, world = vdist.setup(device)  # (0, 1) without torchrun
    out, st = runs.run_folder(cfg)
    out = vdist.broadcast(out)  # rank 0's name: a default one carries the time
    seed_everything(cfg.seed)
    bf16 = use_bf16(cfg, device)
    vit = build_backbone(cfg, device)
    source, splits = build_data(cfg, vit.pretrained_cfg)
    model = build_model(cfg, vit, len(source.classes)).to(device)
    if st:  # every rank reads the checkpoint; a mismatch raises before anything is written
        runs.load_trainable(model, out / "last.safetensors", cfg)
    loader, val_loader, test_loader, order_rng = build_loaders(cfg, splits, rank, world)
    hook_loader = DataLoader(splits["train"], 2 * cfg.batch_size, num_workers=cfg.num_workers)  # unshuffled, all of it
    total = cfg.epochs * len(loader) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(loader))
    return SimpleNamespace(device=device, rank=rank, world=world, out=out, st=st, bf16=bf16, vit=vit, source=source,
                           splits=splits, model=model, loader=loader, val_loader=val_loader, test_loader=test_loader,
                           order_rng=order_rng, hook_loader=hook_loader, total=total)
