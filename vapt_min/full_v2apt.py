"""The full V²APT: the course's parts composed in one prompt generator, each part a switch.

    before block i:  P_i = [ P_i^inst | P_i^dom ]                              (B, P, D): VPT-Deep's token count
        P_i^inst = Decoder(z),  z ~ N(μ, σ²) = Encoder(E_0)                   vae:   V²APT's instance prompts
        P_i^dom  = W_i                                                         (pca off: VPT-Deep's domain prompts)
                 = z̄ + (Z_{i-1} − z̄) V_m V_mᵀ + W_i C_mᵀ   (i ≥ 1)             pca:   ViaPT's fusion across layers
                                                                       (Z_{i-1}: block i−1's domain outputs)
    loss = CE + β·KL  [vae]  + β_v·L_ML(X, P^dom) + λ·L_ML(P^dom, x_cls)  [guide: DA-VPT on the domain prompts]
    kv_bias: the k, v biases of every attention layer train too (DA-VPT+)

Every switch off gives back the method the part came from, exactly (same parameters, same logits; tests):
    all off → VPT-Deep     vae → V²APT     pca → ViaPT without its instance branch (the VAE is the instance branch here)
    guide → DA-VPT         guide + kv_bias → DA-VPT+

Our choices where no paper composes these parts (lesson 07 says so too):
- The VAE makes the instance prompts, ViaPT's PCA acts on the domain prompts only: the instance prompts are fresh
  from the decoder before every block (as in V²APT), the domain prompts carry the previous block's domain outputs
  through the kept principal directions (as in ViaPT). ViaPT's own instance encoder is not used: two instance
  branches would do one job twice.
- The metric guidance acts on the domain prompts: they are the prompts DA-VPT guides (static, shared by the dataset);
  the proxies are the first G domain prompts. With pca on, the domain prompts depend on the image through the history,
  so the proxies are their mean over the batch (with pca off the prompts are the same for every image and we take them
  as they are, which is what DA-VPT does). The attention anchors see every prompt entering the guided block.
- Without the VAE, its slots go to the domain prompts by default, so that all switches off is VPT-Deep exactly. That
  confounds an ablation: "−vae" would also double the PCA-carried, guided prompts. `no_vae_slots="static"` keeps the
  slots as static VPT-Deep prompts instead, so removing the VAE changes nothing else; the ablation rows use it.
- Prompt dropout acts on each part's learnable prompt tensors (the domain prompts; ViaPT's learnt part), never on
  the VAE's generated prompts nor on carried domain outputs (m = d), as in prompts.PromptGenerator.drop. Without the
  VAE at m = d the generator returns None (the loop's carry) and VPT-Shallow stays exact.

Shapes: B batch, N patches, P prompts (P_inst + P_dom), D width, L layers, G guided prompts.
"""
from __future__ import annotations

import torch

from .metric_guidance import MetricGuidedPrompts
from .pca_fusion import ViaPTPrompts
from .prompts import DeepPrompts, PromptGenerator
from .vae_prompt import VAEPrompts


class FullV2APTPrompts(PromptGenerator):
    """The composed generator. vae: inst_prompts of the num_prompts are instance prompts. pca_dim = m > 0: ViaPT's
    fusion on the domain prompts (m = 0: off; history: ViaPT's rule, --viapt-history). guide: a dict of
    MetricGuidedPrompts options (blocks, num_classes, guided_layers, num_guided, lambda_visual, ...) or None. K/V bias
    tuning is `enable_bias_tuning` on the backbone."""

    def __init__(self, num_prompts: int, dim: int, depth: int, patch_size: int, *, grid, vae: bool = True,
                 inst_prompts: int = 5, vae_options: dict | None = None, pca_dim: int = 0, refresh: int = 25,
                 guide: dict | None = None, no_vae_slots: str = "domain", history: str = "mean"):
        super().__init__()
        if no_vae_slots not in ("domain", "static"):
            raise ValueError(f"--no-vae-slots: unknown {no_vae_slots!r}: use domain or static")
        if vae and no_vae_slots != "domain":
            raise ValueError(f"--no-vae-slots {no_vae_slots} says who takes the VAE's slots without it: use it with "
                             "--no-vae")
        static = not vae and no_vae_slots == "static"
        n_inst = inst_prompts if vae or static else 0
        n_dom = num_prompts - n_inst
        self.n_inst, self.m, self.dim = n_inst, pca_dim, dim
        # Created in the order of the parts, each by the module it comes from, which checks its own options.
        self.vae = VAEPrompts(num_prompts, inst_prompts, dim, depth, patch_size, **(vae_options or {}),
                              with_domain=False) if vae else None
        self.network = tuple(f"vae.{n}" for n in VAEPrompts.network) if vae else ()   # --network-lr-scale
        # --no-vae --no-vae-slots static: the instance slots stay, as VPT-Deep's prompts (the de-confounded ablation)
        self.static = DeepPrompts(inst_prompts, dim, depth, patch_size) if static else None
        if n_dom < 1:
            raise ValueError(f"no domain prompts left (--inst-prompts {inst_prompts} of --num-prompts {num_prompts}): "
                             "the PCA fusion and the guidance act on the domain prompts; lower --inst-prompts")
        self.domain = (ViaPTPrompts(n_dom, dim, depth, patch_size, grid=grid, pca_dim=pca_dim, instance=False,
                                    refresh=refresh, history=history) if pca_dim != 0
                       else DeepPrompts(n_dom, dim, depth, patch_size))
        self.learnt = tuple(f"domain.{n}" for n in self.domain.learnt)        # ViaPT's rule (--viapt-learnt-lr-scale)
        self.guidance = MetricGuidedPrompts(n_dom, dim, depth, patch_size, **guide, own_prompts=False) \
            if guide else None
        self.loss_weights = {**(self.vae.loss_weights if vae else {}), **(self.guidance.loss_weights if guide else {})}

    # What PromptedViT and the loop read from a generator (prompts.PromptGenerator), forwarded to the part that owns it.
    @property
    def samples(self) -> bool:
        return self.vae is not None

    @property
    def reads_image(self) -> bool:  # --no-vae with the PCA fusion off: every part is VPT-Deep's at evaluation
        return any(part.reads_image for part in (self.vae, self.static, self.domain) if part is not None)

    @property
    def eval_samples(self) -> int:
        return self.vae.eval_samples if self.vae is not None else 1

    @eval_samples.setter
    def eval_samples(self, R: int):
        if self.vae is None:
            raise ValueError("multi-round inference samples the VAE's latent: this full V²APT has --no-vae")
        self.vae.eval_samples = R

    @property
    def posterior(self):
        return self.vae.posterior if self.vae is not None else None

    def update_map(self, class_means) -> int:
        return self.guidance.update_map(class_means)

    def parts(self, i, tokens, prompts) -> dict:
        """For the diagnostics: the instance prompts' and the domain prompts' own parts, named by the part."""
        previous = None if prompts is None else prompts[:, self.n_inst:]
        out = {f"domain {k}": v for k, v in self.domain.parts(i, tokens, previous).items()}
        if self.vae is not None:
            out.update(self.vae.parts(i, tokens, prompts))
        if self.static is not None:
            out["static"] = self.static.prompts[i].expand(tokens.shape[0], -1, -1)
        return out

    def diagnostics(self, model, x) -> dict:
        return self.guidance.diagnostics(model, x, first=self.n_inst) if self.guidance is not None else {}

    def epoch_hook(self, model, loader) -> dict:
        return self.guidance.epoch_hook(model, loader) if self.guidance is not None else {}

    def forward(self, i, tokens, prompts, aux):
        previous = None if prompts is None else prompts[:, self.n_inst:]  # block i−1's domain outputs: (B, P_dom, D)
        # the VAE first: it samples z before the domain prompts draw their dropout masks, the order V²APT has
        inst = self.vae(i, tokens, prompts, aux) if self.vae is not None else \
            self.static(i, tokens, None, aux) if self.static is not None else None  # (B, P_inst, D)
        dom = self.domain(i, tokens, previous, aux)                     # (B, P_dom, D), or None: carry (m = d)
        if self.guidance is not None:
            self.guidance.targets = self.targets
            if self.guidance.guiding(i):
                current = previous if dom is None else dom
                everything = current if inst is None else torch.cat([inst, current], dim=1)
                G = self.guidance.map.num_proxies
                static = self.m == 0                                    # DeepPrompts: the same prompts for every image
                proxy_prompts = self.domain.prompts[i, :G] if static else current[:, :G].mean(0)  # (G, D)
                self.guidance.guide(i, tokens, aux, everything, proxy_prompts)
        if inst is None:
            return dom                                                  # None carries (ViaPT m = d, VPT-Shallow)
        return torch.cat([inst, previous if dom is None else dom], dim=1)  # P̂_i = [P_i^inst, P_i^dom]: (B, P, D)
