"""DA-VPT: VPT-Deep prompts guided by metric learning towards the classes mapped to them; DA-VPT+ adds k, v bias tuning.

Ren, Chen, Wang, Hua, "DA-VPT: Semantic-Guided Visual Prompt Tuning for Vision Transformers", CVPR 2025,
arXiv:2505.23694.
Proxy-Anchor loss: Kim, Kim, Cho, Kwak, CVPR 2020, arXiv:2003.13911.
    Eq. (3)  p̂_k·x̂_i − δ ≥ p̂_k·x̂_j + δ          for y_k = y_i ≠ y_j: a prompt is nearer its classes' tokens
    Eq. (4)  L_ML(X, P) = 1/|P⁺| Σ_{p∈P⁺} LSE₀⁺_{x∈X_p⁺}(−α(p̂·x̂ − δ))
                        + 1/|P|  Σ_{p∈P}  LSE₀⁺_{x∈X_p⁻}(α(p̂·x̂ + δ))
             LSE₀⁺(z) = log(1 + Σ exp z); the paper writes 1/τ for α. The prompts are the proxies.
    Eq. (5)  L = CE + β·L_ML(X, P) + λ·L_ML(P, x_cls)      here: aux "mg_visual" (weight β), "mg_cls" (weight λ)
    §3.4     class → prompt map: cosine k-means of the per-class mean CLS into G clusters, warm-started every epoch
    §3.5     DA-VPT+: the k and v biases of every attention layer train too

Our reading where the paper is silent or ambiguous:
- The space where proxies meet anchors, `space="raw"` (default): the prompts and tokens themselves, as the official
  code (its proxies are the prompt parameters). `space="query"`: after the guided block's frozen LN and query
  projection, W_q·LN(t) + b_q (§3.2: "comparing the projected Query vector yields better performance"). Queries share
  the frozen offset b_q + W_q·β_LN, which gives unrelated tokens a cosine far above the negative margin's −δ, so that
  term can never be met (bench probe prints both spaces' cosines). The weights β = λ = 0.01, as most official configs
  (0.1 before 2026-12-01). Chosen on validation, CIFAR-10-1k, 20 epochs, seeds 0-2 (RESULTS.md, issue 16): raw with
  0.01 ended at 82.5 % mean validation accuracy against 81.3 % for query with 0.1 (VPT-Deep 82.3 %).
- Anchors of L_ML(X, P) (§3.3), `anchor="attn"` (default): the attention output at the N patch positions of the guided
  block, averaged per image. mean_i Σ_j a_ij v_j = Σ_j s_j v_j with s_j the mean attention patch j receives: a
  saliency-weighted pooling of the patches, got without materialising the attention map (the paper's reason, §3.3),
  so background patches weigh little. `anchor="mean"`: the plain mean of the patch tokens entering the block, every
  patch equal: the "false positive" tokens §3.3 wants filtered out count fully. One anchor per image either way.
- L_ML(P, x_cls): the CLS token against the same proxies, in the same space (its query W_q·LN(x_cls) + b_q there).
- Layers: `guided_layers` are block indices i (0-based); the prompts entering block i are guided there. Default: the
  last block (§5.3.2: the final layer is best in most cases). The first G prompts of a guided layer are the proxies.

How a run uses it (train.py knows none of this: it calls the generator's epoch_hook, prompts.PromptGenerator):
    before the first epoch, `epoch_hook` clusters the class means of the frozen backbone's final CLS (§3.4); after
    every epoch but the last it re-clusters those of the current prompted model in eval mode, warm-started from the
    previous centroids; `map_changes` and `map_time_s` go into that epoch's metrics row. The map lives in buffers
    (`map.assign`, `map.centroids`), so checkpoints and --resume carry it. Under torchrun rank 0 clusters and every rank
    receives its map. A run with bias tuning saves `blocks.i.attn.kv_bias`, so `load_run` enables it too.
Measured (ViT-Ti/16, CIFAR-10, G = 4; lesson 05): the frozen map groups {airplane, ship}, {automobile, truck},
{cat, dog}, {bird, deer, frog, horse}; the first re-clusterings move most classes, then the map settles.

Shapes: B batch, N patches, P prompts per layer, G guided prompts (proxies), C classes, D width, L layers, E embedding.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist
from .prompts import PromptedViT, PromptGenerator, check_prompt_count, prompt_init_bound


def check_normalise(normalise: str):
    if normalise not in ("original", "all"):
        raise ValueError(f"--mg-normalise: unknown normalise {normalise!r}: use 'original' (positives over proxies "
                         "with positives) or 'all'")


def guided_blocks(spec: str, depth: int) -> tuple[int, ...]:
    """--mg-layers: 'last' or '9,10,11' → block indices, checked against the depth."""
    if spec == "last":
        return (depth - 1,)
    try:
        blocks = tuple(sorted({int(t) for t in spec.split(",")}))
    except ValueError:
        raise ValueError(f"--mg-layers {spec!r}: use 'last' or comma-separated block indices such as 9,10,11") from None
    if not all(0 <= b < depth for b in blocks):
        raise ValueError(f"--mg-layers {spec!r}: block indices must be in [0, {depth - 1}] for a {depth}-block ViT")
    return blocks


def _check_loss_inputs(embeddings, labels, proxies, normalise):
    check_normalise(normalise)
    if embeddings.dim() != 2 or proxies.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"expected embeddings (N, E), labels (N,), proxies (C, E); got {tuple(embeddings.shape)}, "
                         f"{tuple(labels.shape)}, {tuple(proxies.shape)}")
    (n, e), (c, e2) = embeddings.shape, proxies.shape
    if n == 0 or c == 0:
        raise ValueError(f"empty input: {n} embeddings, {c} proxies; the loss needs at least one of each")
    if e != e2 or labels.shape[0] != n:
        raise ValueError(f"shape mismatch: embeddings {tuple(embeddings.shape)}, labels {tuple(labels.shape)}, "
                         f"proxies {tuple(proxies.shape)}; need embeddings (N, E), labels (N,), proxies (C, E)")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
    # One device sync per call: the price of failing loudly instead of training on garbage.
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels out of range: min {labels.min().item()}, max {labels.max().item()}, "
                         f"need 0 <= label < {c}")
    if not (torch.isfinite(embeddings).all() and torch.isfinite(proxies).all()):
        raise ValueError("non-finite values (nan or inf) in the embeddings or the proxies")


def _lse0(z):
    # LSE₀⁺ over dim 0: log(1 + Σ_i exp z_i), stable; masked entries are −inf and add nothing.
    return torch.logsumexp(torch.cat([z.new_zeros(1, z.shape[1]), z]), dim=0)  # (C,)


def proxy_anchor_loss(embeddings, labels, proxies, alpha: float = 32.0, delta: float = 0.1,
                      normalise: str = "original"):
    """Proxy-Anchor with cosine similarity: embeddings (N, E) with labels (N,) in [0, C) against proxies (C, E).

    normalise="original": positive term averaged over the proxies with a positive in the batch, negative term over
    all proxies (Kim et al., pytorch-metric-learning, Eq. 4). "all": both over all C proxies. Always computed in fp32.
    """
    _check_loss_inputs(embeddings, labels, proxies, normalise)
    C = proxies.shape[0]
    with torch.autocast(embeddings.device.type, enabled=False):
        cos = F.normalize(embeddings.float(), dim=1) @ F.normalize(proxies.float(), dim=1).T  # (N, C)
        pos = F.one_hot(labels.long(), C).bool()                                               # (N, C)
        neg_inf = torch.tensor(float("-inf"), device=cos.device)
        # Eq. (4): pull every proxy towards its positives, push it from its negatives, margin δ, scale α = 1/τ.
        pos_term = _lse0(torch.where(pos, -alpha * (cos - delta), neg_inf))                    # (C,)
        neg_term = _lse0(torch.where(pos, neg_inf, alpha * (cos + delta)))                     # (C,)
        n_pos = pos.any(0).sum() if normalise == "original" else C  # proxies without positives contribute log 1 = 0
        return pos_term.sum() / n_pos + neg_term.sum() / C


# ---------------------------------------------------------------------------------------------------------
# The class → prompt map (§3.4, Appendix A.3)


def cosine_kmeans(x, k: int, iters: int = 100, init=None, seed: int = 0):
    """Spherical k-means of x (n, E): returns assign (n,) in [0, k) and unit centroids (k, E). Deterministic.

    init=None: maximin seeding (a seeded first point, then each next centroid the point least similar to those chosen);
    init=(k, E) centroids: warm start. An empty cluster takes the point that fits its own cluster worst (lowest index
    on ties) from a cluster with more than one point, so no cluster is ever empty.
    """
    if x.dim() != 2 or not 1 <= k <= x.shape[0]:
        raise ValueError(f"need x (n, E) with n >= k >= 1, got x {tuple(x.shape)} and k = {k}")
    if not torch.isfinite(x).all():
        raise ValueError("non-finite values in the k-means input")
    x = F.normalize(x.float(), dim=1)                                   # (n, E): cosine = dot product
    n = x.shape[0]
    if init is None:
        first = torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)).item()
        idx = [first]
        for _ in range(k - 1):
            idx.append((x @ x[idx].T).max(1).values.argmin().item())   # farthest (in angle) from all chosen so far
        c = x[idx]                                                      # (k, E)
    else:
        if init.shape != (k, x.shape[1]) or not torch.isfinite(init).all():
            raise ValueError(f"init must be finite centroids ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        c = F.normalize(init.to(x).float(), dim=1)
    assign = None
    for _ in range(iters):
        sim = x @ c.T                                                   # (n, k)
        new = sim.argmax(1)                                             # first index on ties
        counts = torch.bincount(new, minlength=k)
        for j in (counts == 0).nonzero().flatten().tolist():
            fit = sim[torch.arange(n), new].masked_fill(counts[new] <= 1, float("inf"))
            p = fit.argmin()
            counts[new[p]] -= 1
            new[p], counts[j] = j, 1
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        c = F.normalize(torch.zeros_like(c).index_add_(0, assign, x), dim=1)  # the mean direction of each cluster
    return assign, c


def mean_per_class(features, labels, num_classes: int):
    """(n, E) features and (n,) labels → (C, E) class means; every class must have a sample."""
    counts = torch.bincount(labels, minlength=num_classes)
    if len(counts) > num_classes or (counts == 0).any():
        raise ValueError(f"class means need every class 0..{num_classes - 1} and no other: counts {counts.tolist()}")
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float32, device=features.device)
    return sums.index_add_(0, labels, features.float()) / counts[:, None]


@torch.no_grad()
def class_means(model, loader, device, num_classes: int | None = None):
    """Per-class mean of the final (normed) CLS over `loader` → (C, D), in eval mode.

    A `ViT`: the frozen backbone without prompts (the map before training). A `PromptedViT`: the current prompted
    model (re-clustering after each epoch). num_classes defaults to the head's size, or max label + 1 for a ViT.
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for x, y in loader:
        x = x.to(device)
        if isinstance(model, PromptedViT):                              # (features, aux); targets None: no labels
            feats.append(model.forward_features(x)[0][:, 0].float().cpu())
        else:
            feats.append(model.forward_features(x)[:, 0].float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    model.train(was_training)
    labels = torch.cat(labels)
    if num_classes is None:
        num_classes = model.head.out_features if isinstance(model, PromptedViT) else int(labels.max()) + 1
    return mean_per_class(torch.cat(feats), labels, num_classes)


class ClassPromptMap(nn.Module):
    """Class → guided prompt index. C > G: cosine k-means of the class means into G clusters. C <= G: class c →
    prompt c, and prompts C..G−1 stay unguided (Appendix A.3). `num_proxies` = min(C, G) proxies per guided layer.
    Buffers (so a checkpoint carries them): assign (C,), −1 until the first clustering; centroids (G, dim)."""

    def __init__(self, num_classes: int, num_guided: int, dim: int, seed: int = 0):
        super().__init__()
        if num_classes < 2 or num_guided < 1:
            raise ValueError(f"need >= 2 classes and >= 1 guided prompt, got {num_classes} and {num_guided}")
        self.num_classes, self.num_proxies, self.seed = num_classes, min(num_classes, num_guided), seed
        self.clusters = num_classes > num_guided                        # else one prompt per class, nothing to learn
        self.register_buffer("assign", torch.full((num_classes,), -1) if self.clusters else torch.arange(num_classes))
        self.register_buffer("centroids", torch.zeros(self.num_proxies, dim))

    @property
    def ready(self) -> bool:
        return bool(self.assign[0] >= 0)

    def update(self, class_means) -> int:
        """Re-cluster (warm-started from the previous centroids); returns how many classes changed prompt."""
        if class_means.dim() != 2 or class_means.shape[0] != self.num_classes:
            raise ValueError(f"class means must be ({self.num_classes}, E), got {tuple(class_means.shape)}")
        if not self.clusters:
            return 0                                                    # one prompt per class: nothing to cluster
        assign, centroids = cosine_kmeans(class_means.cpu(), self.num_proxies,
                                          init=self.centroids.cpu() if self.ready else None, seed=self.seed)
        changed = int((assign != self.assign.cpu()).sum()) if self.ready else self.num_classes
        self.assign.copy_(assign)
        self.centroids.copy_(centroids)
        return changed

    def forward(self, labels):
        if not self.ready:
            raise ValueError("the class → prompt map is empty: call gen.update_map(class_means(vit, loader, device)) "
                             "before training (train does, through the generator's epoch_hook)")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels out of range [0, {self.num_classes}): "
                             f"min {labels.min().item()}, max {labels.max().item()}")
        return self.assign.to(labels.device)[labels]                    # (B,) prompt ids in [0, num_proxies)


# ---------------------------------------------------------------------------------------------------------
# The generator: VPT-Deep prompts, plus the two metric-guidance losses at the guided layers during training


class MetricGuidedPrompts(PromptGenerator):
    """DA-VPT prompt generator. Forward = VPT-Deep (same parameter, shape and initialisation as `DeepPrompts`).

    blocks: the frozen `vit.blocks`, read for W_q and the attention output; held outside the module tree (not a
    submodule), so `parameters()` and `state_dict()` hold only the prompts. With targets set and in training mode, each
    guided layer adds its L_ML(X, P) and L_ML(P, x_cls) (Eq. 4-5) to aux["mg_visual"] and aux["mg_cls"], averaged over
    the guided layers; weights `lambda_visual` (the paper's β) and `lambda_cls` (λ). A zero weight skips its term.
    """
    reads_image = False  # at evaluation its prompts are VPT-Deep's: the tokens feed only the training losses

    def __init__(self, num_prompts: int, dim: int, depth: int, patch_size: int, blocks, num_classes: int, *,
                 guided_layers=None, num_guided: int | None = None, lambda_visual: float = 0.01,
                 lambda_cls: float = 0.01, alpha: float = 32.0, delta: float = 0.1, normalise: str = "original",
                 anchor: str = "attn", seed: int = 0, own_prompts: bool = True, space: str = "raw"):
        super().__init__()
        guided_layers = tuple(sorted(set((depth - 1,) if guided_layers is None else guided_layers)))
        num_guided = num_prompts if num_guided is None else num_guided
        check_prompt_count(num_prompts)
        if not 1 <= num_guided <= num_prompts:
            raise ValueError(f"--mg-prompts {num_guided} must be in [1, {num_prompts}] (num_guided, of the prompts it "
                             "can guide: --num-prompts, or the domain prompts of the full V²APT)")
        if len(blocks) != depth or blocks[0].attn.qkv.in_features != dim:
            raise ValueError(f"blocks do not match depth {depth} and width {dim}: pass vit.blocks of the same ViT")
        if not guided_layers or not all(0 <= i < depth for i in guided_layers):
            raise ValueError(f"guided_layers: block indices in [0, {depth}), not {guided_layers} (none: DeepPrompts)")
        if min(lambda_visual, lambda_cls) < 0 or alpha <= 0 or delta < 0:
            raise ValueError(f"--mg-visual, --mg-cls and --mg-delta must be >= 0 and --mg-alpha > 0 (lambda_visual, "
                             f"lambda_cls, alpha, delta); got {lambda_visual}, {lambda_cls}, {alpha}, {delta}")
        check_normalise(normalise)
        if anchor not in ("attn", "mean"):
            raise ValueError(f"--mg-anchor: unknown anchor {anchor!r}: use attn or mean")
        if space not in ("query", "raw"):
            raise ValueError(f"--mg-space: unknown space {space!r}: use query (W_q·LN(t) + b_q, §3.2) or raw (the "
                             "tokens themselves, the official code)")
        self.space = space
        bound = prompt_init_bound(patch_size, dim)
        # own_prompts=False: the guidance alone, for prompts made elsewhere (the full V²APT): call guide(...) with them.
        self.prompts = nn.Parameter(torch.empty(depth, num_prompts, dim).uniform_(-bound, bound)) \
            if own_prompts else None                                    # (L, P, D), as DeepPrompts
        object.__setattr__(self, "blocks", blocks)                      # a plain reference: not registered, not saved
        self.guided_layers, self.anchor, self.normalise = guided_layers, anchor, normalise
        self.alpha, self.delta = alpha, delta
        self.map = ClassPromptMap(num_classes, num_guided, dim, seed)
        self.loss_weights = {"mg_visual": lambda_visual, "mg_cls": lambda_cls}

    def update_map(self, class_means) -> int:
        """Cluster (first call) or re-cluster (warm start) the classes onto the guided prompts (module docstring)."""
        return self.map.update(class_means)

    def epoch_hook(self, model, loader) -> dict:
        """§3.4: the class → prompt map from the class means over `loader`: of the frozen backbone the first time, of
        the prompted model after that. Rank 0 clusters, every rank receives its map: all ranks must guide with one map,
        and a k-means on each rank could drift apart. Returns the classes that changed prompt and the time it took."""
        if not self.map.clusters:
            return {}                                                   # class c → prompt c: nothing to learn
        t = time.time()
        changes = None
        if dist.is_main():
            device = next(model.parameters()).device
            features_of = model if self.map.ready else model.vit        # before training: the frozen ViT, no prompts
            changes = self.update_map(class_means(features_of, loader, device, model.head.out_features))
        assign, centroids, changes = dist.broadcast((self.map.assign, self.map.centroids, changes))
        self.map.assign.copy_(assign)
        self.map.centroids.copy_(centroids)
        return {"map_changes": changes, "map_time_s": time.time() - t}

    def forward(self, i, tokens, prompts, aux):
        prompts = self.drop(self.prompts[i].expand(tokens.shape[0], -1, -1))  # (B, P, D): VPT-Deep
        if self.guiding(i):  # the anchors see the prompts the block sees; the proxies are the prompt parameters
            self.guide(i, tokens, aux, prompts, self.prompts[i, :self.map.num_proxies])
        return prompts

    @torch.no_grad()
    def diagnostics(self, model, x, first: int = 0) -> dict:
        """At the (last) guided block, on images x: how alike unrelated tokens look in the space the losses compare in
        (the mean cosine between the CLS queries of different images, and between the CLS queries and the proxies),
        the same for the raw tokens (the official code's space), and the share of the patches' attention that goes
        to the prompts (near 1: the visual anchors are mostly the prompts' own values). first: where the guided
        prompts start among the prompts entering the block (the full V²APT's domain prompts follow its instance
        ones)."""
        i, seen = self.guided_layers[-1], []
        hook = self.blocks[i].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        maps = model.attention_maps(x)                                  # L × (B, h, T, T)
        hook.remove()
        blk, seq, G = self.blocks[i], seen[0], self.map.num_proxies     # seq: (B, 1+P+N, D)
        N = (x.shape[-2] // model.vit.patch_size) * (x.shape[-1] // model.vit.patch_size)
        P, D = seq.shape[1] - 1 - N, seq.shape[-1]
        cls, proxies = seq[:, 0], seq[:, 1 + first:1 + first + G].mean(0)  # (B, D), (G, D): as guide() sees them
        query = lambda t: F.normalize(F.linear(blk.norm1(t), blk.attn.qkv.weight[:D], blk.attn.qkv.bias[:D]), dim=-1)
        others = ~torch.eye(len(cls), dtype=torch.bool)
        out = {}
        for space, f in (("query", query), ("raw", lambda t: F.normalize(t, dim=-1))):
            c = f(cls)                                                  # (B, D)
            out[f"{space} cos, CLS vs CLS"] = (c @ c.T)[others].mean().item()
            out[f"{space} cos, CLS vs proxies"] = (c @ f(proxies).T).mean().item()
        out["patch attention to prompts"] = maps[i][:, :, 1 + P:, 1:1 + P].sum(-1).mean().item()
        return out

    def guiding(self, i: int) -> bool:
        """Whether block i adds the guidance losses now: training, labels set, a non-zero weight, a guided block."""
        return (self.training and self.targets is not None and i in self.guided_layers
                and any(w > 0 for w in self.loss_weights.values()))

    def guide(self, i, tokens, aux, prompts, proxy_prompts):
        """Add block i's two terms to aux. prompts (B, P, D): every prompt entering block i (for the attention anchors);
        proxy_prompts (G, D): the guided prompts, whose queries are the proxies."""
        blk, D = self.blocks[i], tokens.shape[-1]
        y = self.map(self.targets)                                      # (B,) guided prompt ids: the loss's classes
        W_q, b_q = blk.attn.qkv.weight[:D], blk.attn.qkv.bias[:D]       # the q part of the fused projection (frozen)
        # §3.2's query space, W_q·LN(t) + b_q, or the raw tokens (the official code: proxies are the prompt parameters)
        to_space = (lambda t: F.linear(blk.norm1(t), W_q, b_q)) if self.space == "query" else (lambda t: t)
        proxies = to_space(proxy_prompts)                               # (G, D)
        share = 1.0 / len(self.guided_layers)                           # aux holds the mean over guided layers
        if self.loss_weights["mg_visual"] > 0:
            if self.anchor == "attn":
                P = prompts.shape[1]
                # §3.3: block i's attention output at the patch positions, recomputed here (the loop runs the block
                # after us) on the prompts the block gets (under dropout_on="all" those pass dropout after us).
                seq = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], 1)
                anchors = blk.attn(blk.norm1(seq))[:, 1 + P:].mean(1)   # (B, 1+P+N, D) → (B, D)
            else:
                anchors = tokens[:, 1:].mean(1)                         # (B, D): mean patch token entering block i
            # Eq. (4): L_ML(X, P), visual anchors against the prompts as proxies
            loss = proxy_anchor_loss(anchors, y, proxies, self.alpha, self.delta, self.normalise)
            aux["mg_visual"] = aux.get("mg_visual", 0.0) + share * loss
        if self.loss_weights["mg_cls"] > 0:
            q_cls = to_space(tokens[:, 0])                              # (B, D): the CLS (query)
            # Eq. (5), second term: L_ML(P, x_cls)
            loss = proxy_anchor_loss(q_cls, y, proxies, self.alpha, self.delta, self.normalise)
            aux["mg_cls"] = aux.get("mg_cls", 0.0) + share * loss


# ---------------------------------------------------------------------------------------------------------
# DA-VPT+ (§3.5, Appendix C)


def enable_bias_tuning(vit, extended: bool = False) -> int:
    """Make the k, v biases of every attention layer trainable (2·D per block); returns the newly trainable count.

    Call it AFTER `PromptedViT(vit, ...)`, whose constructor freezes the whole backbone, and before building the
    optimizer. The q bias stays exactly fixed: a separate `attn.kv_bias` Parameter (2D,) replaces the k, v part of
    the frozen fused `qkv.bias`, so AdamW's decay never touches q. extended=True also trains attn.proj.bias,
    mlp.fc2.bias, norm1.bias and norm2.bias (4·D per block); not the final norm's bias, which the head's bias absorbs.
    Note: b_k adds q·b_k to every score of a query, which the softmax cancels: it never changes the logits.
    """
    if any(p.requires_grad for p in vit.blocks.parameters() if p.dim() > 1):
        raise ValueError("bias tuning is for a frozen backbone: call it after "
                         "PromptedViT(vit, ..., train_backbone=False)")
    n = 0
    for blk in vit.blocks:
        attn = blk.attn
        if attn.kv_bias is None:
            attn.kv_bias = nn.Parameter(attn.qkv.bias.detach()[attn.qkv.in_features:].clone())  # (2D,): [b_k | b_v]
            n += attn.kv_bias.numel()
        extra = (attn.proj.bias, blk.mlp.fc2.bias, blk.norm1.bias, blk.norm2.bias) if extended else ()
        for b in (attn.kv_bias, *extra):
            if not b.requires_grad:
                b.requires_grad_(True)
                n += b.numel()
    return n
