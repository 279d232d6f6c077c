"""ViaPT: instance-aware prompts, fused with dataset prompts and propagated across layers by PCA.

Visual Instance-aware Prompt Tuning (arXiv:2507.07796); we work from a summary (../shared/papers/viapt-summary.md)
and no public code exists, so every choice below is ours, documented here and in lesson 04, and tested.

    block 0      P_0 = P^data + Π_k(P^inst),   P^inst = μ + σ ⊙ ε,  (μ, log σ²) = Encoder(E_0)
    block i ≥ 1  P_i = z̄ + (Z_{i-1} − z̄) V_m V_mᵀ  +  W_i C_mᵀ
                       └ history: PCA's reconstruction of the previous prompt outputs from the top-m directions V_m
                                                     └ adaptation: d − m learnable coordinates on the others, C_m
    m = 0: P_i = W_i, fresh prompts before every block (VPT-Deep).  m = d: P_i = Z_{i-1}, carried (VPT-Shallow).
    (z̄: the running mean of the prompt outputs.)

Choices where the summary is silent:
- Principal directions: a running estimate per layer, like BatchNorm's statistics: the mean and covariance of the
  prompt tokens are averaged over training batches (momentum 0.1), and the eigenvectors of that covariance, sorted
  by variance, are the basis. So evaluation is deterministic and independent of the batch, batch size 1 works, and no
  gradient flows through the eigendecomposition (whose gradient is infinite when eigenvalues repeat). The basis is
  recomputed every `refresh` training steps (an eigendecomposition per layer costs about a training step on CPU) and
  whenever the model switches to evaluation. Under DistributedDataParallel each batch's statistics are averaged over
  the ranks before they enter the running estimate, so every rank holds the same basis (as SyncBatchNorm would).
- A refresh keeps what was learnt: W_i are coordinates in the basis C_m, and a new basis would otherwise turn the
  learnt part W_i C_mᵀ into an unrelated vector (the low-variance directions of C_m are nearly degenerate, so their
  eigenvectors rotate freely between refreshes; lesson 04 measures it). On a refresh W_i is re-expressed in the new
  basis, W_i ← W_i C_oldᵀ C_new: the closest the new complement can hold, exact when the complement did not move.
  (AdamW's moments for W_i are left in the old coordinates; the first moment forgets them within a few dozen steps
  at β₁ = 0.9, the second more slowly. We have not measured what that costs.)
- The history is PCA's reconstruction, mean included: z̄ + (Z − z̄) V_m V_mᵀ (`pca_reconstruct` with running
  statistics). We first projected without centring, Z V_m V_mᵀ, which drops the mean's part on C_m: the inserted
  tokens then lack most of what every prompt output shares (ViT tokens have a large common offset), and training at
  1 ≤ m < d stalled (lesson 04's budget, m = 32: 29 % test against 54–56 % with the mean; the corners reach about 58 %).
  The summary's literal reading, PCA's centred scores without the mean, (Z − z̄) V_m V_mᵀ (`history="centred"`), fails
  too: CIFAR-10-1k, 8 epochs, seed 0, m = 1 / 4 / 32: 12.6 / 11.7 / 27.2 % test against 80.5 % at m = 0 (RESULTS.md).
  Even one kept direction carries a norm of 3–11 per block: without z̄ every prompt becomes nearly that one vector.
- The learnt coordinates sit on the carried history, and get their own learning rate, lr × 30
  (`--viapt-learnt-lr-scale`, at 0 < m < d only; at m = 0 W_i are VPT-Deep's prompts and keep lr). In trained runs the
  running mean z̄ has a norm of 7–18 per block and one kept direction 3–11, against 0.6–0.8 for W_i C_mᵀ (VPT's prompt
  scale). After the block's LayerNorm a change to W_i moves the token by its share of that norm, and under Adam a
  parameter moves by about lr per step: W_i learnt 10–20 times more slowly than VPT-Deep's prompts, and every m ≥ 1
  landed at VPT-Shallow's level. Chosen on validation (CIFAR-10-1k, 8 epochs, seed 0; RESULTS.md): m = 32 at
  lr × 1 / 10 / 30: validation 76.0 / 83.5 / 86.5 %, test 71.0 / 75.5 / 81.9 % (m = 0: 84.5–86.0 and 80.5 %);
  m = 1: validation 67.5 / 84.0 / 88.0 %.
- m = 0 keeps nothing, not even the mean: no PCA at all, the standard basis for the learnable coordinates, so W_i are
  VPT-Deep's prompts exactly, the corner the definition asks for. (PCA with zero components would reconstruct z̄
  alone; so the step from m = 0 to m = 1 adds the mean and one direction.)
  m = d returns None, the loop's "carry": exactly VPT-Shallow, whose carried prompts get no new dropout.
- "Concatenated and compressed by PCA": the instance prompts are compressed to their top-k principal directions Π_k
  (running estimate, k = inst_pca_dim) and joined to the dataset prompts slot by slot (a sum: VPT's token count).
- Encoder, "a 2-layer convolutional encoder over the input tokens": parameter-free LayerNorm of the patch
  embeddings E_0 on their grid → depthwise 3×3 conv + GELU → a conv spanning the whole grid, shared by the channels,
  with 2P outputs: (μ, log σ²) for P tokens of width D. Its μ half starts at zero and σ at VPT's init scale, so at
  initialisation with z = μ the instance prompts are zero and ViaPT is exactly VPT-Deep (m = 0) or VPT-Shallow (m = d).
- Inference: z = μ (fixed sampling) by default; `eval_samples = R > 1` averages the logits of R samples.

Shapes: B batch, N patches, P prompts, D = d width, L layers, m kept dimensions.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prompts import PromptGenerator, check_prompt_count, patch_grid, prompt_init_bound


def principal_basis(cov):
    """(D, D) covariance → (D, D) orthonormal eigenvectors as columns, by decreasing variance, each signed so that its
    largest entry is positive (eigenvectors are defined up to sign: this makes the basis reproducible)."""
    vals, vecs = torch.linalg.eigh(cov.double())                       # ascending eigenvalues
    vecs = vecs.flip(-1)                                               # (D, D), descending
    sign = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))  # (1, D)
    return (vecs * sign).to(cov.dtype)


def pca_reconstruct(x, m: int):
    """PCA of the rows of x (n, D) fitted on x itself; reconstruction from the top m components:
    μ + (x − μ) V_m V_mᵀ."""
    mu = x.mean(0)
    centred = x - mu
    V = principal_basis(centred.T @ centred / max(1, x.shape[0] - 1))[:, :m]  # (D, m)
    return mu + centred @ V @ V.T


class RunningPCA(nn.Module):
    """Principal directions of a stream of D-dim tokens, estimated like BatchNorm's running statistics."""

    def __init__(self, dim: int, momentum: float = 0.1, refresh: int = 25):
        super().__init__()
        self.momentum, self.refresh = momentum, refresh
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("cov", torch.eye(dim))                    # before any data: the standard basis
        self.register_buffer("basis", torch.eye(dim))                  # (D, D), columns by decreasing variance
        self.register_buffer("stale", torch.zeros((), dtype=torch.long))  # updates since the basis was computed

    @torch.no_grad()
    def update(self, x):                                               # x: (..., D), detached
        """Fold one batch into the running statistics; returns the previous basis when this update refreshed it."""
        x = x.reshape(-1, x.shape[-1]).float()                         # (n, D)
        mu = x.mean(0)
        with torch.autocast(x.device.type, enabled=False):             # statistics in fp32 under bf16 autocast
            cov = (x - mu).T @ (x - mu) / max(1, x.shape[0] - 1)       # (D, D)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            stats = torch.cat([mu[None], cov])                         # (1 + D, D): one all-reduce
            torch.distributed.all_reduce(stats)
            stats /= torch.distributed.get_world_size()
            mu, cov = stats[0], stats[1:]                              # the same on every rank
        self.mean.lerp_(mu, self.momentum)
        self.cov.lerp_(cov, self.momentum)
        self.stale += 1
        if self.stale >= self.refresh:
            return self.recompute()
        return None

    @torch.no_grad()
    def recompute(self):
        """Recompute the basis if statistics arrived since the last time; returns the previous basis, or None."""
        if self.stale > 0:
            old = self.basis.clone()
            self.basis.copy_(principal_basis(self.cov))
            self.stale.zero_()
            return old
        return None

    def train(self, mode: bool = True):
        if not mode:
            self.recompute()                                           # evaluate with the latest statistics
        return super().train(mode)

    def project(self, x, m: int):                                      # x (..., D) → its part on V_m: (..., D)
        V = self.basis[:, :m].to(x.dtype)                              # (D, m)
        return (x @ V) @ V.T


class InstanceEncoder(nn.Module):
    """E_0 (B, N, D) on its gh×gw grid → (μ, log σ²), each (B, P, D): two convolutions over the tokens."""

    def __init__(self, num_prompts: int, dim: int, grid: tuple[int, int], init_std: float):
        super().__init__()
        self.grid, self.P = grid, num_prompts
        self.local = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)     # layer 1: depthwise 3×3, 10·D parameters
        self.to_slots = nn.Linear(grid[0] * grid[1], 2 * num_prompts)  # layer 2: a grid-sized kernel shared by channels
        nn.init.zeros_(self.to_slots.weight)
        nn.init.zeros_(self.to_slots.bias)
        with torch.no_grad():
            self.to_slots.bias[num_prompts:] = 2 * math.log(init_std)  # log σ² : σ = VPT's init scale; μ = 0

    def forward(self, patches):                                        # (B, N, D)
        B, N, D = patches.shape
        gh, gw = patch_grid(self.grid, N, "ViaPT")
        x = F.layer_norm(patches, (D,)).transpose(1, 2).reshape(B, D, gh, gw)  # (B, D, gh, gw)
        x = F.gelu(self.local(x)).flatten(2)                                   # (B, D, N)
        mu, logvar = self.to_slots(x).transpose(1, 2).split(self.P, dim=1)     # (B, 2P, D) → 2 × (B, P, D)
        return mu, logvar


class ViaPTPrompts(PromptGenerator):
    """ViaPT as a prompt generator. pca_dim = m in [0, dim]; instance=False drops the instance branch."""
    network = ("encoder",)                          # the instance encoder (--network-lr-scale)

    @property
    def learnt(self) -> tuple[str, ...]:
        """W_i, the learnt coordinates (--viapt-learnt-lr-scale), where they sit on a carried history: 0 < m < d.
        (At m = 0 they are VPT-Deep's prompts and keep VPT-Deep's learning rate; at m = d there are none.)"""
        return ("new.",) if 0 < self.m < self.dim else ()
    samples = True                                                     # the instance prompts are drawn

    def __init__(self, num_prompts: int, dim: int, depth: int, patch_size: int, *, grid: tuple[int, int] | int,
                 pca_dim: int, instance: bool = True, inst_pca_dim: int = 16, eval_samples: int = 1, refresh: int = 25,
                 history: str = "mean"):
        super().__init__()
        grid = patch_grid(grid)
        check_prompt_count(num_prompts)
        if not 0 <= pca_dim <= dim:
            raise ValueError(f"--pca-dim: pca_dim m must be in [0, {dim}] (0 = VPT-Deep, {dim} = VPT-Shallow), "
                             f"got {pca_dim}")
        if instance and not 1 <= inst_pca_dim <= dim:
            raise ValueError(f"--inst-pca-dim: inst_pca_dim must be in [1, {dim}], got {inst_pca_dim}")
        if eval_samples < 1:
            raise ValueError(f"--eval-samples: eval_samples R must be >= 1 (1 = z = μ), got {eval_samples}")
        if refresh < 1:
            raise ValueError(f"--pca-refresh: refresh must be >= 1 training steps, got {refresh}")
        if history not in ("mean", "centred"):
            raise ValueError(f"--viapt-history: unknown {history!r}: use mean (z̄ + the kept part) or centred (the "
                             "kept part alone: PCA's centred scores, the summary's literal reading)")
        self.history_rule = history
        self.m, self.dim, self.inst_pca_dim, self.eval_samples = pca_dim, dim, inst_pca_dim, eval_samples
        bound = prompt_init_bound(patch_size, dim)
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))  # P^data: (1, P, D)
        # W_i: the d − m learnable coordinates of every block after the first, (P, d − m) each
        self.new = nn.ParameterList(nn.Parameter(torch.empty(num_prompts, dim - pca_dim).uniform_(-bound, bound))
                                    for _ in range(depth - 1)) if pca_dim < dim else nn.ParameterList()
        self.pcas = nn.ModuleList(RunningPCA(dim, refresh=refresh) for _ in range(depth - 1)) \
            if 0 < pca_dim < dim else None
        self.encoder = InstanceEncoder(num_prompts, dim, grid, bound) if instance else None
        self.inst_pca = RunningPCA(dim, refresh=refresh) if instance else None

    @torch.no_grad()
    def carry(self, i: int, old_basis):
        """After block i's basis was refreshed: W_i ← W_i C_oldᵀ C_new, the learnt part in the new basis."""
        if old_basis is not None:
            C_old, C_new = old_basis[:, self.m:], self.pcas[i].basis[:, self.m:]   # (D, d − m) each
            self.new[i].copy_(self.new[i] @ (C_old.T @ C_new))

    def train(self, mode: bool = True):
        if not mode and self.pcas is not None:
            for i, pca in enumerate(self.pcas):
                self.carry(i, pca.recompute())                        # the refresh before evaluation, carried
        return super().train(mode)

    def forward(self, i, tokens, prompts, aux):
        B = tokens.shape[0]
        if i == 0:
            p0 = self.drop(self.prompts.expand(B, -1, -1))            # P^data: (B, P, D), learnable: dropout
            if self.encoder is None:
                return p0
            inst = self.sample(*self.encoder(tokens[:, 1:]))          # P^inst: (B, P, D)
            if self.training:
                self.inst_pca.update(inst.detach())
            self._inst = self.inst_pca.project(inst, self.inst_pca_dim)  # Π_k(P^inst), kept for `parts`
            return p0 + self._inst                                    # P^data + Π_k(P^inst)
        if self.m == self.dim:
            return None                                               # V_d V_dᵀ = I: carry Z on (VPT-Shallow)
        if self.m == 0:
            return self.drop(self.new[i - 1].expand(B, -1, -1))       # all new: VPT-Deep
        pca = self.pcas[i - 1]
        if self.training:
            self.carry(i - 1, pca.update(prompts.detach()))
        mean, kept, learnt = self.history(i, prompts)
        return mean + kept + self.drop(learnt.expand_as(kept))        # z̄ + (Z − z̄) V_m V_mᵀ + W_i C_mᵀ: (B, P, D)

    def history(self, i: int, prompts):
        """Block i ≥ 1 at 0 < m < d: the running mean z̄, the kept part (Z − z̄) V_m V_mᵀ, the learnt part W_i C_mᵀ."""
        pca = self.pcas[i - 1]
        C = pca.basis[:, self.m:].to(prompts.dtype)                   # C_m: (D, d − m)
        mean = pca.mean.to(prompts.dtype)                             # z̄: (D,)
        kept = pca.project(prompts - mean, self.m)
        mean = mean.expand_as(prompts) if self.history_rule == "mean" else torch.zeros_like(kept)  # centred: no z̄
        return mean, kept, self.new[i - 1] @ C.T

    def parts(self, i, tokens, prompts) -> dict:
        """For the diagnostics: block 0's dataset prompts; after it, ViaPT's mean, kept history and learnt part."""
        if i == 0:
            data = {"dataset": self.prompts.expand(tokens.shape[0], -1, -1)}
            return data if self.encoder is None else {**data, "instance": self._inst}
        if self.m == 0:
            return {"learnt": self.new[i - 1].expand(tokens.shape[0], -1, -1)}
        if self.m == self.dim:
            return {}
        mean, kept, learnt = self.history(i, prompts)
        return {"mean": mean, "kept history": kept, "learnt": learnt.expand_as(kept)}


def viapt_param_count(num_prompts: int, dim: int, depth: int, grid: tuple[int, int], pca_dim: int,
                      instance: bool = True) -> int:
    """P·D (dataset prompts) + (L − 1)·P·(d − m) (new coordinates) + the encoder: 10·D + (2P·N + 2P)."""
    n = num_prompts * dim + (depth - 1) * num_prompts * (dim - pca_dim)
    if instance:
        n += 10 * dim + 2 * num_prompts * grid[0] * grid[1] + 2 * num_prompts
    return n
