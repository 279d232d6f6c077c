"""One run's configuration: the `Config` dataclass, its presets, its run-level checks, and the CLI generated from it.

Every option is a field; `python -m vapt_min.train --help` lists them all (types from the annotations, unknown options
are errors). The fields are grouped by what reads them. A method's own rules (prompt split, latent size, kernel fits
the grid, ...) are stated once, in its generator's constructor: `train.validate` runs them before any data or weights
load by building the model on PyTorch's meta device. `Config.validate` holds only the rules about the run itself and
the ones between options (an option the chosen method would ignore, --resume against --out).
`parser_for` turns any such dataclass into an argparse parser; `python -m vapt_min.bench` uses it too.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from .data import DATA_ENV, PROTOCOLS, check_protocol
from .prompts import HEAD_INITS
from .vit import check_input_size, parse_name

METHODS = ("linear", "full", "vpt-shallow", "vpt-deep", "v2apt", "viapt", "vapt", "davpt", "davpt+", "full-v2apt")


def opt(default, help: str, **more):
    """A field with its help text (and argparse extras such as choices) for the generated CLI."""
    kind = "default_factory" if isinstance(default, list) else "default"
    return field(**{kind: (lambda: list(default)) if kind == "default_factory" else default},
                 metadata={"help": help, **more})


@dataclass
class Config:
    # the run: method, data, backbone
    method: str = opt("vpt-deep", f"one of {', '.join(METHODS)}")
    dataset: str = opt("cifar10", "cifar10, mnist, struct-count, struct-position, struct-orientation, "
                                       "folder:<path> or vtab:<name>")
    data_root: str | None = opt(None, f"data folder (default: ${DATA_ENV} or <repo>/data)")
    download: bool = opt(False, "download the dataset with torchvision when it is not on disk")
    protocol: str = opt("vtab1k", f"split protocol: {', '.join(PROTOCOLS)}")
    n_train: int = opt(800, "training images (vtab1k protocol)")
    n_val: int = opt(200, "validation images drawn from the training set")
    shots: int | None = opt(None, "images per class (protocol shots)")
    percent: float | None = opt(None, "percentage of the training set (protocol percent)")
    test_cap: int | None = opt(2000, "evaluate on this many test images (fixed subset); none = all")
    eval_test: bool = opt(True, "score the test split after the last epoch; --no-eval-test builds no test split and "
                                "reads no test image (the grid's learning-rate selection)")
    best_val_test: bool = opt(True, "also score the best-validation epoch's checkpoint on the test split (summary "
                                    "best_val_test_acc, the grid's second column): a second pass over the test images "
                                    "when that epoch is not the last")
    model: str = opt("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "timm ViT name")
    weights: str = opt("auto", "'auto' (<data_root>/weights/<model>/ if present, else the timm hub), 'hub', 'random', "
                               "or a .safetensors/.pth file or folder")
    img_size: int = opt(112, "input size in pixels (a multiple of the patch size)")
    num_prompts: int = opt(10, "prompt tokens per layer (P)")
    network_lr_scale: float | None = opt(None, "learning-rate multiplier for a generator's network, not its prompt "
                                               "tensors: V²APT's encoder and decoder, VAPT's token maps, ViaPT's "
                                               "instance encoder; default: 10 for V²APT's VAE (v2apt, full-v2apt "
                                               "with --vae), 1 otherwise")
    # V²APT (and the full V²APT's VAE)
    inst_prompts: int = opt(5, "v2apt: instance prompts per layer (the other num_prompts - inst_prompts are domain "
                               "prompts)")
    latent_dim: int = opt(8, "v2apt: VAE latent size K")
    beta: float = opt(0.01, "v2apt: weight of the KL term, loss = CE + beta * KL")
    eval_samples: int = opt(1, "v2apt, viapt: 1 = inference with z = mu; R > 1 = mean logits of R sampled z")
    encode_at: int | None = opt(None, "v2apt: the block whose entering patch tokens the VAE encodes; none: the middle "
                                      "block, depth // 2 (6 of ViT-Ti's 12); 0: the input embeddings, the paper's "
                                      "letter; blocks before it get the prompts of z = 0")
    film_init: str = opt("zero", "v2apt: FiLM decoder weights at the start, zero (instance prompts start as their "
                                 "bases) or small (N(0, 0.02²), the package before 2026-12-01)")
    logvar_init: float = opt(0.0, "v2apt: log σ² of the posterior at the start (0: σ = 1)")
    free_bits: float = opt(0.5, "v2apt: free bits, a KL floor in nats per latent dimension: the loss's KL term is "
                                "sum_k max(KL_k, free_bits), so a dimension under the floor is not pulled to the "
                                "prior; 0: the plain KL of Eq. 1")
    # ViaPT (pca_dim and pca_refresh also for the full V²APT's PCA fusion)
    pca_dim: int = opt(32, "viapt: m, the principal directions of the previous prompt outputs kept before every block "
                           "after the first (0 = VPT-Deep, D = VPT-Shallow)")
    viapt_instance: bool = opt(True, "viapt: the instance branch (encoder, sampled prompts fused into block 0's)")
    inst_pca_dim: int = opt(16, "viapt: principal directions k of the instance prompts kept in the fusion")
    pca_refresh: int = opt(25, "viapt: recompute the running principal directions every this many steps")
    viapt_learnt_lr_scale: float = opt(30.0, "viapt (and the full V²APT's PCA fusion), 0 < m < d: learning-rate "
                                             "multiplier for the learnt coordinates W_i of the blocks after the "
                                             "first, which sit on the carried history (10-17x their norm); 1: the "
                                             "package before 2026-12-01")
    viapt_history: str = opt("mean", "viapt: the history of blocks after the first, mean (z̄ + (Z − z̄) V_m V_mᵀ) or "
                                     "centred ((Z − z̄) V_m V_mᵀ: PCA's centred scores, the summary's literal reading)")
    # VAPT
    vapt_kernel: int = opt(2, "vapt: size k of the k×k kernel shared by all channels (no padding)")
    vapt_hidden: int = opt(8, "vapt: bottleneck width r of the shared feature projector D → r → D")
    vapt_dropout: float = opt(0.1, "vapt: Dropout2d after the kernel and dropout in the projector")
    vapt_kernel_init: str = opt("uniform", "vapt: the shared kernel at the start, uniform (±1/k) or normal (N(0, 1), "
                                           "the official code)")
    # DA-VPT (and the full V²APT's guidance)
    mg_layers: str = opt("last", "davpt: guided blocks, 'last' or comma-separated 0-based indices, e.g. 9,10,11")
    mg_prompts: int | None = opt(None, "davpt: guided prompts per guided block (G, the proxies; none = all "
                                       "num_prompts)")
    mg_visual: float = opt(0.01, "davpt: weight (the paper's beta) of L_ML(X, P), visual anchors vs prompts (0.01: the "
                                 "official configs' usual value; 0.1 was this package's before 2026-12-01)")
    mg_cls: float = opt(0.01, "davpt: weight (the paper's lambda) of L_ML(P, x_cls), CLS vs prompts")
    mg_alpha: float = opt(32.0, "davpt: Proxy-Anchor scale alpha")
    mg_delta: float = opt(0.1, "davpt: Proxy-Anchor margin delta")
    mg_normalise: str = opt("original", "davpt: 'original' (positive term over proxies with positives) or 'all'")
    mg_anchor: str = opt("attn", "davpt: visual anchors, 'attn' (saliency-weighted attention output, §3.3) or 'mean' "
                                 "patch token")
    mg_space: str = opt("raw", "davpt: where proxies meet anchors, raw (the prompts and tokens themselves, the "
                               "official code) or query (W_q·LN(t) + b_q of the guided block, §3.2's reading)")
    bias_extended: bool = opt(False, "davpt+: also tune attn.proj, mlp.fc2, norm1 and norm2 biases")
    # the full V²APT's switches
    vae: bool = opt(True, "full-v2apt: VAE instance prompts next to the domain prompts (V²APT; uses --inst-prompts, "
                          "--latent-dim, --beta)")
    no_vae_slots: str = opt("domain", "full-v2apt --no-vae: who takes the instance prompts' slots, domain (the domain "
                                      "prompts: all switches off is VPT-Deep exactly) or static (static learnable "
                                      "prompts, neither PCA-carried nor guided: every other part keeps its prompt "
                                      "count, the ablation's choice)")
    pca: bool = opt(True, "full-v2apt: ViaPT's PCA fusion of the domain prompts across layers (uses --pca-dim, "
                          "--pca-refresh)")
    guide: bool = opt(True, "full-v2apt: DA-VPT's metric guidance of the domain prompts (uses the --mg-* options)")
    kv_bias: bool = opt(True, "full-v2apt: DA-VPT+'s k, v bias tuning (with --bias-extended, more biases)")
    # optimisation
    aux_warmup_epochs: float = opt(0.0, "ramp every auxiliary loss weight (e.g. v2apt's KL) linearly from 0 over this "
                                        "many epochs")
    prompt_dropout: float = opt(0.1, "dropout on the prompt tokens")
    prompt_dropout_on: str = opt("learnable", "learnable: on learnable prompt tensors only, as the official VPT and "
                                              "VAPT codes (never on generated or carried prompts); all: every prompt "
                                              "entering a block (this package before 2026-11-25)")
    head_init: str = opt("zero", "the new head's start: zero (every logit 0, the loss ln(classes); the prompts get no "
                                 "gradient from the cross-entropy until the head has grown), timm (timm's default "
                                 "ViT init: truncated normal, std 0.02, bias 0) or vpt (the official VPT code's "
                                 "He-normal weights over fan_out, std √(2/classes): large first logits)")
    epochs: int = opt(20, "training epochs")
    batch_size: int = opt(32, "batch size (the global batch under torchrun: split over the processes)")
    optimizer: str = opt("adamw", "adamw (V²APT's recipe) or sgd (VPT's, momentum 0.9)")
    lr: float | None = opt(None, "learning rate (default: 1e-3 adamw / 0.1 sgd; a tenth for --method full)")
    weight_decay: float = opt(1e-4, "weight decay")
    warmup_epochs: float = opt(2.0, "linear warm-up length, then cosine decay to 0")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (smoke runs)")
    seed: int = opt(0, "seed for splits, initialisation and batch order")
    # system
    device: str = opt("auto", "auto (cuda if available), cpu or cuda[:i]")
    precision: str = opt("auto", "auto (bf16 autocast on CUDA and on CPUs with bf16 support), bf16 or fp32")
    attention: str = opt("auto", "auto (sdpa on CUDA, explicit on CPU: faster there), sdpa or explicit")
    num_workers: int = opt(0, "data loader workers (0 = load in the main process)")
    out: str | None = opt(None, "run folder (default: runs/<method>-<dataset>-seed<seed>-<time>)")
    resume: str | None = opt(None, "run folder to continue from its last checkpoint")
    progress: bool = opt(True, "show progress bars")
    check: bool = opt(False, "validate, load the data and weights, build the model, time 2 training steps and print "
                             "what would run; writes nothing")

    def validate(self) -> Config:
        """The run-level rules and the rules between options; each method's own rules live in its constructor."""
        try:
            self._check()
        except ValueError as e:
            raise ValueError(f"invalid config: {e}") from None
        return self

    def _check(self):
        def choose(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: use {', '.join(allowed[:-1])} or "
                                 f"{allowed[-1]}")
        choose("method", METHODS)
        choose("optimizer", ("adamw", "sgd"))
        choose("precision", ("auto", "bf16", "fp32"))
        choose("attention", ("auto", "sdpa", "explicit"))
        choose("prompt_dropout_on", ("learnable", "all"))
        choose("head_init", HEAD_INITS)
        check_protocol(self.protocol, self.n_train, self.n_val, self.shots, self.percent, self.test_cap)
        check_input_size(self.img_size, parse_name(self.model)["patch_size"])
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"need num_workers >= 0, got {self.num_workers}")
        if not 0 <= self.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr} (leave it out for the optimizer's default)")
        if not self.viapt_learnt_lr_scale > 0:
            raise ValueError(f"--viapt-learnt-lr-scale must be > 0, got {self.viapt_learnt_lr_scale} (1: the same lr "
                             "as the other prompts)")
        if self.network_lr_scale is not None and not self.network_lr_scale > 0:
            raise ValueError(f"--network-lr-scale must be > 0, got {self.network_lr_scale} (1: the same lr as the "
                             "prompts)")
        if min(self.weight_decay, self.warmup_epochs, self.aux_warmup_epochs) < 0:
            raise ValueError(f"--weight-decay, --warmup-epochs and --aux-warmup-epochs must be >= 0, got "
                             f"{self.weight_decay}, {self.warmup_epochs} and {self.aux_warmup_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        full = self.method == "full-v2apt"
        if full and self.pca and self.pca_dim == 0:
            raise ValueError("--pca-dim 0 keeps no direction, which is no PCA fusion: use --pca-dim m >= 1, or "
                             "--no-pca")
        if self.bias_extended and not (self.method == "davpt+" or (full and self.kv_bias)):
            raise ValueError(f"--bias-extended extends DA-VPT+'s bias tuning: use it with --method davpt+ (or "
                             f"full-v2apt with --kv-bias), not {self.method}")
        if self.resume and self.out and Path(self.out).resolve() != Path(self.resume).resolve():
            raise ValueError(f"--resume {self.resume} continues that run in its own folder, but --out points to "
                             f"{self.out}: drop --out (or copy the run folder there and resume the copy)")


# Presets set defaults; options given on the command line override them.
PRESETS = {
    "default": {},  # CPU: CIFAR-10-1k, 112 px, 20 epochs: the README's main job
    # The accuracy grid on CPU (python -m vapt_min.bench accuracy): 8 epochs and a 1,000-image test subset, so 10
    # methods × 3 tasks × 3 seeds finish in about 1.5 h on 2 cores. Fewer epochs than the default: figures are lower.
    "cpu": dict(epochs=8, warmup_epochs=1.0, test_cap=1000),
    "paper": dict(img_size=224, epochs=100, batch_size=64, warmup_epochs=10, test_cap=None, num_workers=8),
}


# ---------------------------------------------------------------------------------------------------------------------
# The CLI, generated from a dataclass: one option per field, types from the annotations, unknown options are errors.

def parse_value(kind: str):
    """'int', 'float | None', ... → a function from the command-line string to the value."""
    base = kind.replace(" | None", "")
    conv = {"int": int, "float": float, "str": str}[base]
    if " | None" not in kind:
        return conv
    return lambda s: None if s.lower() == "none" else conv(s)


def parser_for(cls, parser: argparse.ArgumentParser | None = None, **kw) -> argparse.ArgumentParser:
    """Add one option per field of the dataclass `cls` (defaults suppressed: only what is given comes back).
    bool → --x / --no-x; `list[int]` → several values; metadata: help, choices, type (a converter), positional."""
    p = parser or argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False,
                                          **kw)
    for f in fields(cls):
        meta, default = f.metadata, (f.default_factory() if f.default is MISSING else f.default)
        kind, many = f.type, f.type.startswith("list[")
        more = dict(help=f"{meta['help']} (default: {default})", default=argparse.SUPPRESS)
        if kind == "bool":
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, **more)
            continue
        conv = meta.get("type") or parse_value(kind[5:-1] if many else kind)
        more.update(type=conv, choices=meta.get("choices"), nargs="+" if many else None)
        if many:
            more["action"] = "extend"                   # given twice, the values add up: --entry A --entry B
        if meta.get("positional"):
            p.add_argument(f.name, type=conv, nargs="+" if many else None, help=meta["help"])
        else:
            metavar = (kind[5:-1] if many else kind).split(" ")[0].upper()   # INT, FLOAT, STR
            p.add_argument("--" + f.name.replace("_", "-"), metavar=metavar, **more)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vapt_min.train", description="Train a prompt-tuned (or linearly "
                                "probed, or fully fine-tuned) ViT: one config, one CLI, one loop.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                   help="start from a preset: " + "; ".join(f"{k}: {v or 'the defaults'}" for k, v in PRESETS.items()))
    return parser_for(Config, p)
