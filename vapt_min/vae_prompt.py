"""V²APT: instance prompts from a variational autoencoder, next to static domain prompts.

Xiao, Zhang et al., "Visual Variational Autoencoder Prompt Tuning", 2025 (shared/papers/v2apt-paper.md, §3.2).
    Z ~ N(μ, σ²) = Encoder(X)                 X: the frozen image embeddings entering the transformer
    P^inst = Decoder(Z)                       one set of instance prompts per layer
    P̂_i = [P_i^inst, P_i^dom]                 (Final Prompt Composition): same token count as VPT-Deep
    L = CE + β · KL(N(μ, σ²) ‖ N(0, I))        Eq. (1)

The paper gives no architecture for the encoder or the decoder and no β; there is no public code. Our choices
(each tested, each explained in lesson 03):
- Encoder: X = the patch tokens entering block `encode_at` (B, N, D). The paper says "input embeddings"
  (encode_at=0: after the frozen patch and position embedding); the default is the middle block (depth // 2, block 6
  of ViT-Ti's 12), because read from the input embeddings the latent codes colour casts the classifier does not use
  (issue 16, RESULTS.md: 2.5 % of predictions change when latents are swapped, against 9-87 % from block 6). Blocks
  before encode_at get the prompts of z = 0. The tokens are pooled by attention with one learned query q
  (a_n = softmax_n(X_n·q/√D)), so the encoder can weigh the informative patches; a mean would only see the average
  patch. A parameter-free LayerNorm keeps the pooled vector at unit scale; one linear layer gives μ and log σ².
- Decoder: FiLM. Each layer i has base prompts B_i (P_inst, D); z sets one scale and one shift shared by
  all layers: P_i^inst = B_i ⊙ (1 + s(z)) + t(z), [s, t] = W z + b. Full-rank prompts per layer at the cost
  of VPT-Deep's, plus 2·K·D for the modulation: about 1.3× VPT-Deep's parameters (budget 1.5×).
- KL: summed over the K latent dimensions, averaged over the batch (the usual VAE convention). By default with free
  bits (Kingma et al. 2016), a floor of 0.5 nats per dimension (free_bits=0: Eq. 1 as written), and the decoder's
  FiLM starts at zero (film_init="zero": every instance prompt starts as its base, as VAPT zero-initialises its token
  map; "small": N(0, 0.02²)). With the encoder and decoder at 10× the prompts' learning rate (Config's
  network_lr_scale default for V²APT) these three open the latent path that the letter leaves collapsed: the
  literal version is encode_at=0, film_init="small", free_bits=0, network_lr_scale=1.
- Inference: z = μ (deterministic, each image independent of the rest of the batch); optionally the logits
  of R sampled z averaged (`eval_samples`, handled by PromptedViT).

Shapes: B batch, N patches, L layers, P prompts per layer (P = P_inst + P_dom), D width, K latent size.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .prompts import PromptGenerator, prompt_init_bound


def kl_per_dim(mu, logvar):
    # Eq. (1): KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_k (μ_k² + σ_k² − log σ_k² − 1); here each k's batch mean, (K,).
    mu, logvar = mu.float(), logvar.float()  # in fp32 even under bf16 autocast: it is logged and compared
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).mean(0)


def kl_standard_normal(mu, logvar):
    # summed over the K latent dimensions, averaged over the batch (the usual VAE convention)
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1).mean()


def kl_below_floor(kl_k, floor: float):
    # Free bits (Kingma et al. 2016, "Improving variational inference with inverse autoregressive flow"):
    # Σ_k max(KL_k, λ) = KL + Σ_k relu(λ − KL_k). The second term refunds the KL below the floor λ, so a dimension
    # that carries less than λ nats feels no pull towards the prior.
    return F.relu(floor - kl_k).sum()


class VAEPrompts(PromptGenerator):
    """Prompt generator: [instance prompts from the VAE | static domain prompts] before every block."""
    samples = True                                  # z is drawn: eval_samples = R > 1 averages R draws
    network = ("query", "to_latent", "film")        # the encoder and the decoder (--network-lr-scale)

    def __init__(self, num_prompts: int, inst_prompts: int, dim: int, depth: int, patch_size: int, *,
                 latent_dim: int = 8, beta: float = 0.01, eval_samples: int = 1, with_domain: bool = True,
                 encode_at: int | None = None, film_init: str = "zero", logvar_init: float = 0.0,
                 free_bits: float = 0.5):
        super().__init__()
        encode_at = depth // 2 if encode_at is None else encode_at      # default: the middle block (6 of 12)
        if not 1 <= inst_prompts <= num_prompts:
            raise ValueError(f"prompt split does not add up: --inst-prompts {inst_prompts} of --num-prompts "
                             f"{num_prompts}; use 1 <= inst_prompts <= num_prompts (the rest are domain prompts)")
        if latent_dim < 1:
            raise ValueError(f"--latent-dim: latent_dim K must be >= 1, got {latent_dim}")
        if beta < 0:
            raise ValueError(f"--beta: beta (the KL weight) must be >= 0, got {beta}")
        if eval_samples < 1:
            raise ValueError(f"--eval-samples: eval_samples R must be >= 1 (1 = z = μ), got {eval_samples}")
        if not 0 <= encode_at < depth:
            raise ValueError(f"--encode-at: encode_at must be a block index in [0, {depth - 1}], got {encode_at}")
        if free_bits < 0:
            raise ValueError(f"--free-bits: the KL floor per latent dimension must be >= 0 nats, got {free_bits}")
        if film_init not in ("small", "zero"):
            raise ValueError(f"--film-init: unknown {film_init!r}: use small or zero")
        self.num_prompts, self.inst_prompts, self.latent_dim = num_prompts, inst_prompts, latent_dim
        self.encode_at = encode_at
        self.eval_samples = eval_samples
        self.loss_weights = {"kl": beta}            # read by PromptedViT.aux_weights: loss = CE + β·KL
        self.free_bits = free_bits
        if free_bits > 0:                           # loss = CE + β·(KL + Σ_k relu(λ − KL_k)) = CE + β·Σ_k max(KL_k, λ)
            self.loss_weights["kl_floor"] = beta
        bound = prompt_init_bound(patch_size, dim)
        # with_domain=False: the instance part alone (the full V²APT brings its own domain prompts); forward then
        # returns P_i^inst only. Created first, as before, so a seed gives the same initialisation as ever.
        self.domain = nn.Parameter(torch.empty(depth, num_prompts - inst_prompts, dim).uniform_(-bound, bound)) \
            if with_domain else None                                                                    # (L, P_dom, D)
        # Encoder
        self.query = nn.Parameter(torch.zeros(dim))                      # zero: the pooling starts as a mean
        self.to_latent = nn.Linear(dim, 2 * latent_dim)                   # → [μ, log σ²]
        # Decoder
        self.base = nn.Parameter(torch.empty(depth, inst_prompts, dim).uniform_(-bound, bound))  # (L, P_inst, D)
        self.film = nn.Linear(latent_dim, 2 * dim)                        # z → [s, t]
        for lin in (self.to_latent, self.film):
            # Small weights: μ ≈ 0 and σ ≈ 1 at the start (KL ≈ 0), and prompts start near their bases.
            nn.init.normal_(lin.weight, std=0.02), nn.init.zeros_(lin.bias)
        with torch.no_grad():
            if film_init == "zero":             # the instance prompts start as their bases, exactly
                self.film.weight.zero_()
            self.to_latent.bias[latent_dim:] = logvar_init                # log σ² at the start: σ = exp(init / 2)
        self._inst = None
        self.posterior = None                                             # (μ, log σ²) of the last encoded batch

    def encode(self, x):
        """x: patch embeddings (B, N, D) → μ, log σ² (B, K)."""
        attn = torch.softmax(x @ self.query / math.sqrt(x.shape[-1]), dim=-1)   # (B, N)
        pooled = torch.einsum("bn,bnd->bd", attn, x)                            # (B, D)
        pooled = F.layer_norm(pooled, pooled.shape[-1:])                        # unit scale, no parameters
        mu, logvar = self.to_latent(pooled).chunk(2, dim=-1)                    # (B, K) each
        return mu, logvar

    def decode(self, z):
        """z (B, K) → instance prompts for every layer (B, L, P_inst, D)."""
        s, t = self.film(z).chunk(2, dim=-1)                                    # (B, D) each
        return self.base * (1 + s[:, None, None]) + t[:, None, None]             # (B, L, P_inst, D)

    def forward(self, i, tokens, prompts, aux):
        B = tokens.shape[0]
        if i == 0 and self.encode_at > 0:   # blocks before the encoder's: the prompts of z = 0, the average image
            self._inst = self.decode(tokens.new_zeros(B, self.latent_dim))
        if i == self.encode_at:  # encode the image once, from the patch tokens entering this block
            mu, logvar = self.encode(tokens[:, 1:])
            aux["kl"] = kl_standard_normal(mu, logvar)
            if self.free_bits > 0:
                aux["kl_floor"] = kl_below_floor(kl_per_dim(mu, logvar), self.free_bits)
            self.posterior = (mu.detach(), logvar.detach())                      # for probe.latent_information
            self._inst = self.decode(self.sample(mu, logvar))                   # z = μ + σ·ε: (B, L, P_inst, D)
        inst = self._inst[:, i]                                                 # (B, P_inst, D)
        if self.domain is None:
            return inst
        # P̂_i: (B, P, D). The domain prompts are learnable tensors (prompt dropout); the instance ones generated
        return torch.cat([inst, self.drop(self.domain[i].expand(B, -1, -1))], dim=1)

    def parts(self, i, tokens, prompts) -> dict:
        """For the diagnostics: the instance prompts, their base B_i and the image-dependent rest, the domain
        prompts."""
        inst = self._inst[:, i]                                                 # (B, P_inst, D), from the last call
        out = {"instance": inst, "instance base": self.base[i].expand_as(inst),
               "instance image part": inst - self.base[i]}
        if self.domain is not None:
            out["domain"] = self.domain[i].expand(inst.shape[0], -1, -1)
        return out
