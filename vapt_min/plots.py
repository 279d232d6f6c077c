"""Plot helpers for the lessons: images and their patches, attention maps, training curves, results.

Each function draws on a fresh figure and returns it; the lesson cell calls `plt.show()`.
Shapes: B batch, N patches (a g×g grid), P prompts, h heads, T tokens.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator, NullFormatter
import torch
from einops import rearrange


def to_image(x: torch.Tensor, mean=(0.5,) * 3, std=(0.5,) * 3):
    """Undo the normalisation of one image (3, H, W) → a (H, W, 3) numpy array in [0, 1] for imshow."""
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (x.detach().cpu().float() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def show_patches(x: torch.Tensor, patch_size: int, **norm):
    """One image and the sequence of patches a ViT reads, in raster order."""
    img = to_image(x, **norm)                                                        # (H, W, 3)
    patches = rearrange(img, "(gh p) (gw q) c -> (gh gw) p q c", p=patch_size, q=patch_size)  # (N, p, p, 3)
    g = img.shape[0] // patch_size
    fig = plt.figure(figsize=(9, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(img)
    for k in range(1, g):
        ax.axhline(k * patch_size - 0.5, color="w", lw=0.8)
        ax.axvline(k * patch_size - 0.5, color="w", lw=0.8)
    ax.set_title(f"{img.shape[0]}×{img.shape[1]} image, {g}×{g} grid of {patch_size}px patches")
    ax.axis("off")
    grid = fig.add_gridspec(g, g, left=0.55, right=0.98, wspace=0.05, hspace=0.05)
    for n in range(g * g):
        a = fig.add_subplot(grid[n // g, n % g])
        a.imshow(patches[n])
        a.axis("off")
    return fig


def cls_attention(maps: list[torch.Tensor], num_prompts: int = 0) -> torch.Tensor:
    """Attention from CLS to the patches in every layer, averaged over heads: (L, B, g, g)."""
    out = []
    for a in maps:                                   # a: (B, h, T, T), T = 1 + P + N
        to_patches = a[:, :, 0, 1 + num_prompts:].mean(1)   # (B, N)
        g = int(to_patches.shape[-1] ** 0.5)
        out.append(rearrange(to_patches, "b (gh gw) -> b gh gw", gh=g))
    return torch.stack(out)


def show_attention(images: torch.Tensor, maps: list[torch.Tensor], layers, num_prompts: int = 0, **norm):
    """Rows: images; columns: the image, then CLS→patch attention at the chosen layers."""
    att = cls_attention(maps, num_prompts)           # (L, B, g, g)
    B = images.shape[0]
    vmax = max(att[layer].max().item() for layer in layers)  # one scale for every map, so they compare
    fig, axes = plt.subplots(B, 1 + len(layers), figsize=(2.2 * (1 + len(layers)) + 1, 2.2 * B), squeeze=False,
                             layout="constrained")
    for b in range(B):
        axes[b, 0].imshow(to_image(images[b], **norm))
        for j, layer in enumerate(layers):
            im = axes[b, j + 1].imshow(att[layer, b].numpy(), cmap="inferno", vmin=0, vmax=vmax)
            if b == 0:
                axes[b, j + 1].set_title(f"layer {layer}")
        for a in axes[b]:
            a.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="CLS → patch attention (mean over heads)")
    return fig


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


AXIS_LABELS = {  # metrics.jsonl keys → what a reader should see on the axis
    "loss": "training loss (cross-entropy + weighted auxiliary terms)", "ce": "training cross-entropy",
    "train_acc": "training accuracy", "val_acc": "validation accuracy", "test_acc": "test accuracy",
    "kl": "KL to N(0, I) (nats per image)", "lr": "learning rate", "epoch_time_s": "seconds per epoch",
}


def axis_label(key: str) -> str:
    return AXIS_LABELS.get(key, key)


def plot_curves(runs: dict[str, list[dict]], keys=("loss", "val_acc")):
    """Per-epoch curves of several runs side by side: runs maps a label to its metrics rows."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in runs.items():
            ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(axis_label(key))
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    return fig


def plot_acc_vs_params(rows: list[dict], acc_key: str = "test_acc"):
    """Accuracy against trainable parameters (log scale), one labelled point per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["trainable_params"], 100 * r[acc_key], s=40)
        ax.annotate(r["method"], (r["trainable_params"], 100 * r[acc_key]), textcoords="offset points", xytext=(5, 4))
    ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # room for the labels of the outermost points
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor log ticks unlabelled: their labels collide
    ax.set_xlabel("trainable parameters (log scale, head included)")
    ax.set_ylabel(f"{axis_label(acc_key)} (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_grid_results(rows: list[dict], tasks: list[str]):
    """The accuracy grid: one panel per task, mean test accuracy ± std over seeds against trainable parameters (log);
    one colour and marker per method, the same in every panel, named in one legend. rows: `bench.summarise` output."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    style = {l: (plt.cm.tab10(k % 10), "osD^v<>pXh"[k % 10]) for k, l in enumerate(labels)}
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks) + 1.8, 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            colour, marker = style[r["label"]]
            ax.errorbar(r["trainable_params"], r["mean"], yerr=r["std"], fmt=marker, color=colour, ms=6, capsize=3,
                        label=r["label"])
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.1)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(task)
        ax.set_xlabel("trainable parameters (head included)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy (%), mean ± std over seeds")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    return fig


PROMPT_MAP_SPACES = ("raw", "ln", "key-query")


@torch.no_grad()
def prompt_map(model, x: torch.Tensor, which: slice = slice(None), space: str = "ln") -> torch.Tensor:
    """V²APT's Fig. 3 "prompt map" (our definition; the paper gives no formula): before every block, the cosine
    similarity between each patch token and the prompt tokens entering that block, averaged over the prompts (all
    P, or the slots in `which`), on the patch grid: (L, B, gh, gw). `model`: a PromptedViT with prompts, in eval mode.

    space: what is compared. "ln" (default): the tokens after the block's norm1, what its attention reads; a block
    ignores a shift of a token's mean and its scale (lesson 02), and raw cosine does not. "key-query": each prompt's
    key against each patch's query (all heads concatenated), the pair whose product is the attention logit patch →
    prompt. "raw": the tokens as they enter the block (the map's first version)."""
    if space not in PROMPT_MAP_SPACES:
        raise ValueError(f"unknown space {space!r}; choose one of {', '.join(PROMPT_MAP_SPACES)}")
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in model.vit.blocks]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    gh, gw = x.shape[-2] // model.vit.patch_size, x.shape[-1] // model.vit.patch_size
    out = []
    for block, seq in zip(model.vit.blocks, seen):                        # (B, 1+P+N, D) entering block i
        P = seq.shape[1] - 1 - gh * gw
        prompts, patches = seq[:, 1:1 + P][:, which], seq[:, 1 + P:]      # (B, P', D), (B, N, D)
        if space != "raw":
            prompts, patches = block.norm1(prompts), block.norm1(patches)
        if space == "key-query":
            attn, D = block.attn, seq.shape[-1]
            w, b = attn.qkv.weight, attn.qkv.bias if attn.kv_bias is None else torch.cat(
                [attn.qkv.bias[:D], attn.kv_bias])
            prompts = torch.nn.functional.linear(prompts, w[D:2 * D], b[D:2 * D])  # keys (B, P', D)
            patches = torch.nn.functional.linear(patches, w[:D], b[:D])            # queries (B, N, D)
        sim = torch.nn.functional.cosine_similarity(prompts[:, :, None], patches[:, None], dim=-1)  # (B, P', N)
        out.append(rearrange(sim.mean(1), "b (gh gw) -> b gh gw", gh=gh))
    return torch.stack(out)


def show_prompt_maps(images: torch.Tensor, maps: dict[str, torch.Tensor], labels=None, **norm):
    """Rows: images (named by `labels`, e.g. their classes); columns: the image, then one map per entry of `maps`
    (title → (B, gh, gw)), one colour scale."""
    vmin, vmax = min(m.min().item() for m in maps.values()), max(m.max().item() for m in maps.values())
    B = images.shape[0]
    fig, axes = plt.subplots(B, 1 + len(maps), figsize=(2.3 * (1 + len(maps)) + 1, 2.2 * B), squeeze=False,
                             layout="constrained")
    for b in range(B):
        axes[b, 0].imshow(to_image(images[b], **norm))
        for j, (title, m) in enumerate(maps.items()):
            im = axes[b, j + 1].imshow(m[b].cpu().numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
            if b == 0:
                axes[b, j + 1].set_title(title)
        for a in axes[b]:
            a.set_xticks([]), a.set_yticks([])
            a.spines[:].set_visible(False)
        if labels is not None:
            axes[b, 0].set_ylabel(labels[b])
    fig.colorbar(im, ax=axes, shrink=0.6, label="cosine similarity")
    return fig


def grad_cam(model, x: torch.Tensor, target: torch.Tensor | None = None, block: int = -1) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) for a PromptedViT, read at the patch tokens entering `block` (the last by
    default: the patch tokens leaving the last block reach the logits only through CLS's attention inside it, so
    their gradient would be zero). Channel weights = the gradient of the target logit averaged over the patches;
    map = ReLU(Σ_c weight_c · activation_c) per patch, scaled to [0, 1] per image: (B, gh, gw).
    `target`: class ids (B,), default the predicted class. The model should be in eval mode."""
    seen = {}

    def grab(module, args):                          # make the block's input a leaf we can read the gradient of
        seen["seq"] = args[0].detach().requires_grad_(True)
        return (seen["seq"], *args[1:])

    hook = model.vit.blocks[block].register_forward_pre_hook(grab)
    try:
        with torch.enable_grad():
            logits, _ = model(x)
            target = logits.argmax(-1) if target is None else target
            logits.gather(1, target[:, None]).sum().backward(inputs=[seen["seq"]])
    finally:
        hook.remove()
    gh, gw = x.shape[-2] // model.vit.patch_size, x.shape[-1] // model.vit.patch_size
    seq, grad = seen["seq"][:, -gh * gw:], seen["seq"].grad[:, -gh * gw:]   # patches: (B, N, D) each
    cam = torch.relu((seq * grad.mean(1, keepdim=True)).sum(-1))            # (B, N)
    cam = cam / cam.amax(1, keepdim=True).clamp_min(1e-12)
    return rearrange(cam.detach(), "b (gh gw) -> b gh gw", gh=gh)


def show_overlays(images: torch.Tensor, maps: dict[str, torch.Tensor], alpha: float = 0.5, interpolation="nearest",
                  colorbar: bool = True, **norm):
    """Rows: images; columns: the image, then each map (title → (B, gh, gw) in [0, 1]) over the image.
    interpolation="nearest" shows a 7×7 map as the 7×7 values it has, not a smooth guess between them ("bilinear":
    the smooth picture Grad-CAM papers draw); the colour bar gives the scale."""
    B = images.shape[0]
    fig, axes = plt.subplots(B, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.2 * B), squeeze=False,
                             layout="constrained")
    for b in range(B):
        img = to_image(images[b], **norm)
        axes[b, 0].imshow(img)
        for j, (title, m) in enumerate(maps.items()):
            axes[b, j + 1].imshow(img)
            im = axes[b, j + 1].imshow(m[b].cpu().numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1,
                                       extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5),
                                       interpolation=interpolation)
            if b == 0:
                axes[b, j + 1].set_title(title)
        for a in axes[b]:
            a.axis("off")
    if colorbar:
        fig.colorbar(im, ax=axes, shrink=0.6, label="map value (1 = the image's maximum)")
    return fig


def plot_sweep(x, panels: dict[str, dict[str, list]], xlabel: str, symlog: bool = False):
    """Values against one knob (e.g. ViaPT's m), one panel per entry of `panels`: y-label → {line label → values at
    x}. Every x value gets a tick, so the runs of the sweep are easy to read off. symlog: a log x axis that keeps 0
    (linear below 1), for knobs swept as 0, 1, 4, 32, 192."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels.items()):
        for label, ys in lines.items():
            ax.plot(x, ys, marker="o", ms=4, label=label)
        if symlog:
            ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:,.0f}" if abs(v) >= 1000 else f"{v:g}")  # 25,000; 0.35
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_forest(rows: list[dict], tasks: list[str], reference: str = "vpt-deep"):
    """The paired comparison as a forest plot: one panel per task, one line per method, the mean paired difference of
    test accuracy from the reference (points) with its 95 % CI (a hollow marker: fewer than 2 seeds, no interval), and
    the zero line, the reference itself. Three panels a row at most, so that six tasks stay readable.
    rows: `evidence.paired_table` output."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != reference))
    ncols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.5, (0.42 * len(methods) + 1.8) * nrows),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(tasks):]:   # a last row that is not full: no empty panels
        fig.delaxes(ax)
    for ax, task in zip(axes.flat, tasks):
        for r in (r for r in rows if r["task"] == task and r["method"] != reference):
            y = methods.index(r["method"])
            if r["ci_low"] is None:
                ax.plot(r["mean_diff"], y, "o", mfc="none", color="C0")
            else:
                ax.errorbar(r["mean_diff"], y, xerr=[[r["mean_diff"] - r["ci_low"]], [r["ci_high"] - r["mean_diff"]]],
                            fmt="o", color="C0", capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(task)
        ax.set_xlabel(f"test accuracy − {reference} (points)")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(range(len(methods)), methods)   # shared by every panel
    axes[0, 0].set_ylim(len(methods) - 0.5, -0.5)          # the first method on top
    for ax in axes[:, 0]:   # sharey shows the names on each row's first panel only
        ax.set_ylabel("method (mean paired difference, 95 % CI)")
    fig.tight_layout()
    return fig


def show_token_sequences(kinds=("shallow", "deep"), blocks: int = 3, prompts: int = 2, patches: int = 3):
    """The token sequence entering blocks 1..`blocks`, one row per kind, drawn as boxes: CLS, prompts, patches.
    shallow: the learned P enters block 1 only, then each block's outputs at the prompt slots (Z_i) are carried on;
    deep: fresh learned P_{i-1} replace them before every block i (VPT, Eqs. 5 and 6)."""
    from matplotlib.patches import FancyArrowPatch, Rectangle
    colours = {"cls": "#bdbdbd", "learned": "#f28e2b", "carried": "#fdd0a2", "patch": "#9ecae1"}
    width = 1 + prompts + patches
    fig, ax = plt.subplots(figsize=(2.6 * blocks + 1.2, 1.3 * len(kinds) + 0.6))
    for r, kind in enumerate(kinds):
        if kind not in ("shallow", "deep"):
            raise ValueError(f"unknown kind {kind!r}; choose shallow or deep")
        y = -1.6 * r
        ax.text(-0.6, y + 0.4, f"VPT-{kind.capitalize()}", ha="right", va="center", fontsize=11)
        for b in range(blocks):
            x0 = b * (width + 2.2)
            learned = kind == "deep" or b == 0
            labels = ([f"x{b}"] + [f"P{b}" if kind == "deep" else "P" if learned else f"Z{b}"] * prompts
                      + [f"E{b}"] * patches)
            for k, label in enumerate(labels):
                part = "cls" if k == 0 else ("learned" if learned else "carried") if k <= prompts else "patch"
                ax.add_patch(Rectangle((x0 + k, y), 0.92, 0.8, color=colours[part], ec="k", lw=0.6))
                ax.text(x0 + k + 0.46, y + 0.4, label, ha="center", va="center", fontsize=8)
            ax.text(x0 + width / 2, y + 0.95, f"into block {b + 1}", ha="center", fontsize=8)
            if b < blocks - 1:
                ax.add_patch(FancyArrowPatch((x0 + width + 0.1, y + 0.4), (x0 + width + 2.0, y + 0.4),
                                             arrowstyle="->", mutation_scale=12))
                ax.text(x0 + width + 1.05, y + 0.55, f"L{b + 1}", ha="center", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=c, ec="k", lw=0.6) for c in colours.values()]
    ax.legend(handles, ["CLS", "learned prompts", "carried prompt outputs", "patch tokens"], loc="upper center",
              bbox_to_anchor=(0.5, -0.02), ncol=4, frameon=False, fontsize=8)
    ax.set_xlim(-3.2, blocks * (width + 2.2) - 1.8)
    ax.set_ylim(-1.6 * (len(kinds) - 1) - 0.4, 1.3)
    ax.axis("off")
    fig.tight_layout()
    return fig
