"""Visual Prompt Tuning on a frozen ViT: the one prompted forward loop, VPT-Shallow and VPT-Deep.

Jia et al., "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119.
    VPT-Shallow (Eq. 4-6): [x_1, Z_1, E_1] = L_1([x_0, P, E_0]);  [x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])
    VPT-Deep    (Eq. 7-8): [x_i, _, E_i]  = L_i([x_{i-1}, P_{i-1}, E_{i-1}])  — fresh prompts before every layer
    y = Head(LN(x_L))
Semantics of the reference code (KMnP/vpt): prompts sit after CLS and before the patches, carry no position
embedding, are initialised uniform in ±√(6 / (3·p² + D)), pass through one dropout, and the frozen backbone stays
in eval mode while the prompts train. Prompt dropout acts on learnable prompt tensors only, as in the official VPT and
VAPT codes: never on prompts a generator computes from the image or carries over from the previous block
(`PromptGenerator.drop`). `dropout_on="all"` is this package's earlier rule (every prompt entering a block), kept to
reproduce earlier runs. One rate (0.1) for every method, VPT-Shallow included, though the official VPT demo turns
it off for Shallow ("no dropout for shallow"; its config default is 0.0): our choice, so that lessons 01–02 compare
Shallow and Deep on one difference only, where they insert prompts. `--prompt-dropout 0` gives the demo's Shallow.

Every method in this package is a prompt generator: a `PromptGenerator` (below), whose docstring is the contract
the loop, the evaluation, the benchmarks and the lessons rely on.

Shapes: B batch, N patches, P prompts, D width, L layers, p patch size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .vit import ViT


def prompt_init_bound(patch_size: int, dim: int) -> float:
    # Xavier-uniform bound of the patch projection (fan_in = 3·p², fan_out = D), as in the VPT reference.
    return math.sqrt(6.0 / (3 * patch_size**2 + dim))


class PromptGenerator(nn.Module):
    """The generator contract, written down once.

    PromptedViT.forward_features calls gen(i, tokens, prompts, aux) before block i:
        i        the block index, 0 … L−1
        tokens   (B, 1+N, D) = [CLS | patches] entering block i (before block 0: the embeddings)
        prompts  (B, P, D): block i−1's prompt outputs, or None (before block 0)
        aux      a dict for auxiliary losses, unweighted (e.g. aux["kl"]); their weights are in `loss_weights`
    and it returns block i's prompts (B, P, D), or None to carry block i−1's prompt outputs on.

    Optional parts, with the defaults this class gives; who reads them:
        loss_weights  {}      {name: w}: loss = CE + Σ w·aux[name]; PromptedViT.aux_weights → the loop, benchmarks
        samples       False   True if the prompts are drawn at random (V²APT's VAE, ViaPT's instance branch)
        reads_image   True    False if at evaluation the prompts never depend on the image (VPT-Shallow/Deep,
                              DA-VPT, which reads tokens only for its training losses): every run's probe
                              (probe.cheap) then skips the swap test, which could find nothing; a test holds
                              each generator to its flag
        eval_samples  1       R: at evaluation, the mean logits of R draws (PromptedViT.forward); only for samples=True
                              (train.validate refuses --eval-samples otherwise; bench infer sets it)
        targets       None    the (B,) labels of the batch being trained on, set by PromptedViT.forward_features before
                              block 0 (None at evaluation); read by generators whose loss needs labels (DA-VPT)
        parts(i, tokens, prompts) → {}
                              called right after gen(i, ...) by the diagnostics (probe.inserted_scale): the named
                              components of what it just returned, each (B, P', D), e.g. V²APT's base and
                              image-dependent part, ViaPT's mean, kept history and learnt part
        network       ()      names (prefixes of named_parameters) of the generator's network, as opposed to its
                              prompt tensors: V²APT's encoder and decoder, VAPT's token maps; build_optimizer gives
                              them the learning rate × --network-lr-scale
        learnt        ()      names (prefixes) of prompt tensors that sit on a carried history (ViaPT's W_i, added to
                              the running mean z̄): build_optimizer gives them the learning rate
                              × --viapt-learnt-lr-scale
        diagnostics(model, x) → {}
                              method-specific numbers on images x that say whether it does its job (DA-VPT: how
                              alike unrelated tokens look where its losses compare them); printed by bench probe
        epoch_hook(model, loader) → {}
                              state that depends on the whole training set: the loop calls it before the first epoch
                              of a fresh run and after every epoch but the last, with the PromptedViT and an unshuffled
                              loader over the training split; it returns entries for that epoch's metrics row. Its state
                              lives in buffers, so checkpoints and --resume carry it (DA-VPT's class → prompt map)
    """
    samples = False
    reads_image = True
    eval_samples = 1
    network: tuple[str, ...] = ()
    learnt: tuple[str, ...] = ()
    targets = None
    _dropout = None                                 # PromptedViT's prompt dropout (a plain reference, not a submodule)

    def __init__(self):
        super().__init__()
        self.loss_weights: dict[str, float] = {}

    def epoch_hook(self, model, loader) -> dict:
        return {}

    def parts(self, i: int, tokens, prompts) -> dict:
        return {}

    def diagnostics(self, model, x) -> dict:
        return {}

    def drop(self, prompts):
        """Prompt dropout, for the learnable prompt tensors a generator returns (its generated or carried prompts
        never pass through here). The identity outside PromptedViT, and under dropout_on="all"."""
        return prompts if self._dropout is None else self._dropout(prompts)

    def sample(self, mu, logvar):
        """z = μ + σ·ε (the reparameterisation trick) in training and for R-sample inference; z = μ otherwise."""
        if self.training or self.eval_samples > 1:
            return mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return mu


def patch_grid(grid, num_patches: int | None = None, method: str = "") -> tuple[int, int]:
    """(gh, gw) from an int or a pair; with num_patches, checked against the tokens a generator actually receives."""
    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if num_patches is not None and num_patches != gh * gw:
        raise ValueError(f"{method} was built for a {gh}×{gw} patch grid ({gh * gw} patches) but got {num_patches} "
                         "patches: build it with the grid of the input size you run (img_size // patch_size)")
    return gh, gw


def check_prompt_count(num_prompts: int):
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 (--num-prompts), got {num_prompts}")


class ShallowPrompts(PromptGenerator):
    """VPT-Shallow: P prompts inserted once, before block 0; their outputs are carried through later blocks."""
    reads_image = False

    def __init__(self, num_prompts: int, dim: int, patch_size: int):
        super().__init__()
        check_prompt_count(num_prompts)
        bound = prompt_init_bound(patch_size, dim)
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))  # (1, P, D)

    def forward(self, i, tokens, prompts, aux):
        return self.drop(self.prompts.expand(tokens.shape[0], -1, -1)) if i == 0 else None  # (B, P, D) or carry


class DeepPrompts(PromptGenerator):
    """VPT-Deep: a fresh set of P prompts before every block, replacing the previous block's prompt outputs."""
    reads_image = False

    def __init__(self, num_prompts: int, dim: int, depth: int, patch_size: int):
        super().__init__()
        check_prompt_count(num_prompts)
        bound = prompt_init_bound(patch_size, dim)
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, dim).uniform_(-bound, bound))  # (L, P, D)

    def forward(self, i, tokens, prompts, aux):
        return self.drop(self.prompts[i].expand(tokens.shape[0], -1, -1))  # (B, P, D)


HEAD_INITS = ("zero", "timm", "vpt")   # --head-init: how PromptedViT starts its new head


class PromptedViT(nn.Module):
    """A ViT with a new linear head and an optional prompt generator.

    generator=None and train_backbone=False: linear probe. generator=None and train_backbone=True: full
    fine-tuning. With a generator, the backbone is frozen and only the generator and the head train.
    forward(x) returns (logits, aux): aux maps names to auxiliary loss tensors (unweighted); `aux_weights()`
    gives their weights, so the loop can log the raw terms and add the weighted ones.
    """

    def __init__(self, vit: ViT, num_classes: int, generator: nn.Module | None = None,
                 prompt_dropout: float = 0.0, train_backbone: bool = False, dropout_on: str = "learnable",
                 head_init: str = "zero"):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if generator is not None and train_backbone:
            raise ValueError("prompts with a trainable backbone is not a method here: use a generator (prompt tuning) "
                             "or train_backbone=True without one (full fine-tuning)")
        self.vit = vit
        self.vit.head = nn.Identity()  # the pretrained head is replaced by ours
        self.train_backbone = train_backbone
        for p in self.vit.parameters():
            p.requires_grad_(train_backbone)
        if dropout_on not in ("learnable", "all"):
            raise ValueError(f"--prompt-dropout-on: unknown {dropout_on!r}: use learnable (the official codes) or all")
        self.generator, self.dropout_on = generator, dropout_on
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        for part in (generator.modules() if generator is not None and dropout_on == "learnable" else ()):
            if isinstance(part, PromptGenerator):   # every part of a composed generator drops its own prompts
                object.__setattr__(part, "_dropout", self.prompt_dropout)
        self.head = nn.Linear(vit.dim, num_classes)
        if head_init == "zero":   # start at loss = ln(classes): timm does so only in its JAX-style init
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        elif head_init == "vpt":  # the official VPT's MLP head: He-normal over fan_out, the bias left at nn.Linear's
            nn.init.kaiming_normal_(self.head.weight, a=0, mode="fan_out")
        elif head_init == "timm":  # timm's default ViT init of a Linear: truncated normal, std 0.02, bias 0
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        else:
            raise ValueError(f"--head-init: unknown {head_init!r}: use one of {', '.join(HEAD_INITS)} (zero: this "
                             "package's default; timm: timm's default ViT init, std 0.02; vpt: the official VPT "
                             "code's)")

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_backbone:
            self.vit.eval()  # frozen: its dropout/normalisation behave as at inference, as in the VPT reference
        return self

    def forward_features(self, x, attn_out: list | None = None, targets=None):
        """The prompted loop of DESIGN.md. Returns the final-norm sequence (B, 1+P+N, D) and the aux dict.
        targets: the batch's labels (B,) in training, for generators whose loss needs them; None otherwise."""
        tokens = self.vit.embed(x)                          # (B, 1+N, D)
        prompts, aux = None, {}
        if self.generator is not None:
            self.generator.targets = targets                # never a stale batch's labels
        for i, block in enumerate(self.vit.blocks):
            new = self.generator(i, tokens, prompts, aux) if self.generator is not None else None
            if new is not None:                             # VPT Eq. (7): fresh prompts replace the previous outputs
                prompts = self.prompt_dropout(new) if self.dropout_on == "all" else new  # (B, P, D); no pos. embedding
            P = 0 if prompts is None else prompts.shape[1]
            seq = tokens if P == 0 else torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)  # (B, 1+P+N, D)
            seq = block(seq, attn_out)
            tokens = torch.cat([seq[:, :1], seq[:, 1 + P:]], dim=1)  # (B, 1+N, D)
            prompts = seq[:, 1:1 + P] if P else None                 # (B, P, D): this block's prompt outputs
        return self.vit.norm(seq), aux

    def forward(self, x, targets=None):
        R = self.generator.eval_samples if self.generator is not None else 1
        if self.training or R == 1:
            feats, aux = self.forward_features(x, targets=targets)
            return self.head(feats[:, 0]), aux              # (B, classes), {name: loss}
        # Multi-round inference for generators that sample: the mean of the logits of R sampled prompt sets.
        runs = [self.forward_features(x) for _ in range(R)]
        return torch.stack([self.head(f[:, 0]) for f, _ in runs]).mean(0), runs[-1][1]

    def aux_weights(self) -> dict[str, float]:
        """The weight of each auxiliary loss that forward returns: loss = CE + Σ_k w_k · aux_k."""
        return dict(self.generator.loss_weights) if self.generator is not None else {}

    @torch.no_grad()
    def attention_maps(self, x) -> list[torch.Tensor]:
        """Attention of every block through the explicit path: L tensors (B, h, T, T), T = 1+P+N."""
        maps = []
        self.forward_features(x, attn_out=maps)
        return maps

    def param_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def param_summary(self) -> str:
        trainable, total = self.param_counts()
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
