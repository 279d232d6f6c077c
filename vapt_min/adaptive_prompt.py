"""VAPT: adaptive prompts generated from the previous layer's tokens.

Le et al., "Visual Adaptive Prompt Tuning", 2025 (arXiv:2501.18936). Overview: ../shared/papers/vapt-overview.txt.
Layer 0 gets static VPT prompts. Every later layer i turns the patch tokens leaving block i-1 into its P prompts:

    X   = LN_i(patches)                           per-layer LayerNorm                      (B, N, D)
    G   = grid(X)                                 the patches on their gh×gw grid          (B, D, gh, gw)
    G'  = Dropout2d(conv_k(G))                    one k×k kernel shared by all D channels  (B, D, gh', gw')
    T   = W_i · flatten(G') + b_i                 token-wise map from gh'·gw' cells to P   (B, P, D)
    P_i = T + MLP(T)                              shared residual bottleneck D → r → D     (B, P, D)

W_i and b_i start at zero, so every adaptive prompt is exactly zero at initialisation and VAPT starts as "VPT
prompts at layer 0, zeros after": the first gradient step makes the later prompts image-dependent.
The official code hard-codes a 14×14 grid (224 px); here the grid comes from the input size, so any size works.
Parameters: P·D (static) + 2·D·r (shared MLP) + (L-1)·(2·D + k² + gh'·gw'·P + P).

Shapes: B batch, N patches, P prompts, D width, L layers, k kernel, r bottleneck width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prompts import PromptGenerator, check_prompt_count, patch_grid, prompt_init_bound


class FeatureProjector(nn.Module):
    """The residual bottleneck MLP shared by every layer: t + W2·drop(ReLU(W1·t)), no biases.
    No biases keeps a zero input at zero: that is what makes the prompts exactly zero at initialisation."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, t):                                    # (B, P, D)
        return t + self.fc2(self.drop(F.relu(self.fc1(t))))  # (B, P, D)


class AdaptiveLayer(nn.Module):
    """One layer's generator: LayerNorm, a shared-channel k×k conv on the patch grid, the token-wise map to P."""

    def __init__(self, num_prompts: int, dim: int, grid: tuple[int, int], kernel: int, dropout: float = 0.1,
                 kernel_init: str = "uniform"):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        # nn.Conv2d's default for fan_in = k²: uniform ±1/k. The official code draws N(0, 1), a conv output ~3.5×
        # larger; with the token map at zero that size sets how fast the prompts grow under Adam (each step moves a
        # weight by about lr). Measured with our AdamW recipe (CIFAR-10-1k, seed 0): N(0, 1) trained to 46.9 % test,
        # uniform ±1/k to 77.6 %; lesson 06's 10-shot run fell below 30 % with N(0, 1). So we keep the smaller init.
        bound = 1.0 / kernel
        self.kernel = nn.Parameter(torch.empty(1, 1, kernel, kernel).uniform_(-bound, bound))  # (1, 1, k, k)
        if kernel_init == "normal":                           # the official code's torch.randn (kept as an option)
            nn.init.normal_(self.kernel)
        self.drop = nn.Dropout2d(dropout)
        cells = (grid[0] - kernel + 1) * (grid[1] - kernel + 1)  # no padding, stride 1
        self.token_map = nn.Linear(cells, num_prompts)           # over grid cells, shared by the D channels
        nn.init.zeros_(self.token_map.weight), nn.init.zeros_(self.token_map.bias)

    def forward(self, patches):                               # (B, N, D)
        B, N, D = patches.shape
        gh, gw = patch_grid(self.grid, N, "VAPT")
        # Our choice, for speed (same function as the formula above): the conv and the token map are both linear
        # over the grid and shared by the D channels, and Dropout2d multiplies each whole channel by one number,
        # which commutes with both. So W_i·flat(conv_k(G)) = (W_i ∘ conv_k)·G, and W_i ∘ conv_k is a (P, N)
        # matrix:
        # each row of W_i, laid on the reduced grid, pushed through the conv's adjoint (conv_transpose2d). Building
        # that matrix costs P tiny images; running conv2d on B·D single-channel maps instead made VAPT's training
        # step 1.37× VPT-Deep's on CPU, two thirds of it in the conv's backward. Tests check it against the direct
        # path.
        P = self.token_map.out_features
        cells = self.token_map.weight.view(P, 1, gh - self.kernel.shape[-2] + 1, gw - self.kernel.shape[-1] + 1)
        weight = F.conv_transpose2d(cells, self.kernel).view(P, N)  # (P, N): the token map after the conv
        t = weight @ self.norm(patches)                             # (B, P, D)
        if self.training and self.drop.p > 0:                       # Dropout2d's mask: one draw per (image, channel)
            t = t * self.drop(t.new_ones(B, D, 1, 1)).view(B, 1, D)
        return t + self.token_map.bias[:, None]                     # (B, P, D)

    def forward_direct(self, patches):  # (B, N, D): the formula step by step, for tests and lesson 06
        B, N, D = patches.shape
        gh, gw = self.grid
        x = self.norm(patches).transpose(1, 2).reshape(B * D, 1, gh, gw)  # (B·D, 1, gh, gw): one channel at a time
        x = F.conv2d(x, self.kernel)                  # (B·D, 1, gh', gw'): the same kernel for all D
        x = self.drop(x.reshape(B, D, *x.shape[-2:]))                       # (B, D, gh', gw'): drops whole channels
        return self.token_map(x.flatten(2)).transpose(1, 2)                 # (B, D, P) -> (B, P, D)


class AdaptivePrompts(PromptGenerator):
    """VAPT as a prompt generator: static prompts before block 0, adaptive prompts before every later block."""
    network = ("layers", "projector")               # the token maps and the feature projector (--network-lr-scale)

    def __init__(self, num_prompts: int, dim: int, depth: int, patch_size: int, *, grid: tuple[int, int] | int,
                 kernel: int = 2, hidden: int = 8, dropout: float = 0.1, kernel_init: str = "uniform"):
        super().__init__()
        gh, gw = patch_grid(grid)
        check_prompt_count(num_prompts)
        if kernel < 1 or kernel > min(gh, gw):
            raise ValueError(f"--vapt-kernel: kernel {kernel} does not fit the {gh}×{gw} patch grid of "
                             f"{gh * patch_size} px inputs: use 1 <= kernel <= {min(gh, gw)}, or a larger --img-size")
        if hidden < 1:
            raise ValueError(f"--vapt-hidden: hidden (the bottleneck width r) must be >= 1, got {hidden}")
        if not 0 <= dropout < 1:
            raise ValueError(f"--vapt-dropout: dropout must be in [0, 1), got {dropout}")
        if kernel_init not in ("uniform", "normal"):
            raise ValueError(f"--vapt-kernel-init: unknown {kernel_init!r}: use uniform (±1/k) or normal (the official "
                             "N(0, 1))")
        self.grid, self.kernel_size = (gh, gw), kernel
        bound = prompt_init_bound(patch_size, dim)
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))  # (1, P, D) for layer 0
        self.layers = nn.ModuleList(AdaptiveLayer(num_prompts, dim, (gh, gw), kernel, dropout, kernel_init)
                                    for _ in range(depth - 1))
        self.projector = FeatureProjector(dim, hidden, dropout)

    def forward(self, i, tokens, prompts, aux):
        if i == 0:
            return self.drop(self.prompts.expand(tokens.shape[0], -1, -1))  # (B, P, D): learnable, dropout
        # tokens entering block i are block i-1's CLS and patch outputs; its prompt outputs are dropped. Generated
        # prompts get no prompt dropout (the official code): the kernel's Dropout2d and the projector's are theirs
        return self.projector(self.layers[i - 1](tokens[:, 1:]))  # (B, P, D)


def vapt_param_count(num_prompts: int, dim: int, depth: int, grid: tuple[int, int], kernel: int = 2,
                     hidden: int = 8) -> int:
    """The closed form of AdaptivePrompts' parameter count (tests pin the module against it)."""
    cells = (grid[0] - kernel + 1) * (grid[1] - kernel + 1)
    per_layer = 2 * dim + kernel**2 + cells * num_prompts + num_prompts
    return num_prompts * dim + 2 * dim * hidden + (depth - 1) * per_layer
