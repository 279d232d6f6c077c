"""A compact Vision Transformer whose parameter names equal timm's.

Dosovitskiy et al., "An Image is Worth 16x16 Words", arXiv:2010.11929.
Any timm `vit_*_patch16/32` checkpoint loads into `ViT` with `strict=True`, from a local
`.safetensors`/`.pth` file or a folder (offline) or from a timm hub name (online).

Equations (pre-norm transformer, paper §3.1):
    Eq. (1)  z_0 = [x_cls; x_p^1 E; …; x_p^N E] + E_pos
    Eq. (2)  z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    Eq. (3)  z_l  = MLP(LN(z'_l)) + z'_l
    Eq. (4)  y    = LN(z_L^0)                      (then a linear head)

Seams used by the prompt methods: `embed` (Eq. 1), `blocks` (Eq. 2-3), `norm` (Eq. 4), `head`.

Shapes: B batch, C channels, H W image size, N patches, T tokens (1+N, or 1+P+N with prompts),
D width, h heads, d head width (D = h·d), L layers.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# timm's widths, depths and heads for the standard ViT sizes (the head count cannot be read off the weights).
SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
         "huge": (1280, 32, 16)}
# Preprocessing of the augreg/in21k checkpoints; a config.json beside the weights or timm's own config overrides it.
DEFAULT_CFG = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def check_input_size(size: int, patch: int):
    if size % patch:
        raise ValueError(f"img_size {size} is not divisible by the patch size {patch}: use a multiple of {patch}, "
                         f"e.g. {patch * max(1, round(size / patch))}")


class PatchEmbed(nn.Module):
    """Eq. (1): cut the image into P×P patches and project each to D with one strided convolution."""

    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        for size in x.shape[-2:]:
            check_input_size(size, self.patch_size)
        x = self.proj(x)                                   # (B, D, H/p, W/p)
        return rearrange(x, "b d h w -> b (h w) d")        # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: q, k, v blocks of D rows each)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.impl = "sdpa"  # "sdpa" (fused kernel) or "explicit" (softmax(qkᵀ/√d)v written out)
        # DA-VPT+ (metric_guidance.enable_bias_tuning): a trainable copy of the k, v parts of qkv.bias (2D,) that
        # replaces them, while the q part is read from the frozen fused bias. None (the default): not in the state dict.
        self.register_parameter("kv_bias", None)

    def forward(self, x, attn_out: list | None = None):
        qkv = self.qkv(x) if self.kv_bias is None else F.linear(  # DA-VPT+: frozen q bias, trainable k, v biases
            x, self.qkv.weight, torch.cat([self.qkv.bias[:self.qkv.in_features], self.kv_bias]))
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.num_heads)  # 3 × (B, h, T, d)
        if attn_out is None and self.impl == "sdpa":
            x = F.scaled_dot_product_attention(q, k, v)    # (B, h, T, d)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, T, T)
            attn = attn.softmax(dim=-1)
            if attn_out is not None:
                attn_out.append(attn.detach())
            x = attn @ v                                   # (B, h, T, d)
        return self.proj(rearrange(x, "b h t d -> b t (h d)"))  # (B, T, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_out: list | None = None):
        x = x + self.attn(self.norm1(x), attn_out)  # Eq. (2)
        return x + self.mlp(self.norm2(x))          # Eq. (3)


class ViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=1000):
        super().__init__()
        self.patch_size, self.dim = patch_size, dim
        self.grid = img_size // patch_size                # the grid the stored position embeddings belong to
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = dict(DEFAULT_CFG, input_size=(3, img_size, img_size))

    def set_attention(self, impl: str):
        """Pick the attention path: "sdpa" or "explicit" (numerically equal; speed differs per device)."""
        if impl not in ("sdpa", "explicit"):
            raise ValueError(f"unknown attention implementation {impl!r}: use 'sdpa' or 'explicit'")
        for blk in self.blocks:
            blk.attn.impl = impl
        return self

    def pos_embed_for(self, grid_h: int, grid_w: int):
        """Position embeddings for a grid_h × grid_w patch grid, bicubically resampled when it is not the stored one."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = rearrange(patch_pos, "1 (h w) d -> 1 d h w", h=self.grid)
        # Same resampling as timm's resample_abs_pos_embed (bicubic, antialias), so logits match timm at any size.
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", antialias=True,
                                  align_corners=False)
        patch_pos = rearrange(patch_pos.to(cls_pos.dtype), "1 d h w -> 1 (h w) d")  # (1, N, D)
        return torch.cat([cls_pos, patch_pos], dim=1)       # (1, 1+N, D)

    def embed(self, x):
        """Eq. (1): image (B, 3, H, W) → tokens (B, 1+N, D) = [CLS | patches] with position embeddings added."""
        p = self.patch_size
        patches = self.patch_embed(x)                                   # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                 # (B, 1, D)
        tokens = torch.cat([cls, patches], dim=1)                       # (B, 1+N, D)
        return tokens + self.pos_embed_for(x.shape[-2] // p, x.shape[-1] // p)

    def forward_features(self, x, attn_out: list | None = None):
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x, attn_out)
        return self.norm(x)                                             # (B, 1+N, D)

    def forward_head(self, feats):
        return self.head(feats[:, 0])                                   # Eq. (4): CLS → logits (B, classes)

    def forward(self, x, attn_out: list | None = None):
        return self.forward_head(self.forward_features(x, attn_out))


# ---------------------------------------------------------------------------------------------------------
# Loading checkpoints: a timm name (online), a .safetensors/.pth file, or a folder holding model.safetensors.

def parse_name(name: str):
    """'vit_base_patch16_224.augreg_in21k' → dict(dim=768, depth=12, num_heads=12, patch_size=16, img_size=224)."""
    m = re.match(r"vit_(tiny|small|base|large|huge)_patch(\d+)_(\d+)", name)
    if not m:
        raise ValueError(f"unknown model name {name!r}: expected a timm ViT name such as "
                         f"'vit_tiny_patch16_224' or 'vit_base_patch32_224' (sizes: {', '.join(SIZES)})")
    dim, depth, heads = SIZES[m.group(1)]
    return dict(dim=dim, depth=depth, num_heads=heads, patch_size=int(m.group(2)), img_size=int(m.group(3)))


PREPARE = "re-run `python data/prepare.py --from ../shared/data` (or `--download`), or pass --weights another file"


def read_state_dict(path: Path) -> dict:
    try:  # a truncated download or a file of another kind: one clear line, not the loader's traceback
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights file {path} is damaged or not a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}): {PREPARE}") from None
    for key in ("model", "state_dict", "model_state"):  # common wrappers around a raw state dict
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def arch_of(sd: dict) -> dict:
    """Width, depth, patch and grid read off a state dict (the head count is not in the shapes)."""
    try:
        dim, _, p, _ = sd["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1)
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a timm ViT state dict (missing or malformed {e}); expected keys such as "
                         "'patch_embed.proj.weight', 'pos_embed', 'blocks.0.attn.qkv.weight'") from None
    return dict(dim=dim, depth=depth, patch_size=p, img_size=grid * p)


def check_arch(sd: dict, model: ViT, source: str):
    got = arch_of(sd)
    want = dict(dim=model.dim, depth=len(model.blocks), patch_size=model.patch_size,
                img_size=model.grid * model.patch_size)
    if got != want:
        raise ValueError(f"weights in {source} are for a ViT with {got}, but the model is {want}: "
                         "pass the model name that matches the weights file (e.g. --model vit_tiny_patch16_224 for "
                         "ViT-Ti/16 weights)")


def from_pretrained(name: str = "vit_tiny_patch16_224.augreg_in21k_ft_in1k", weights: str | Path | None = None) -> ViT:
    """Build a `ViT` and load timm weights with `strict=True`.

    weights=None: download through timm (needs internet). weights=a file or folder: load it offline.
    Every tensor's shape is checked against the architecture that `name` describes.
    """
    arch = parse_name(name)
    cfg = dict(DEFAULT_CFG)
    if weights is None:
        import timm  # online path: timm fetches the checkpoint from its hub
        ref = timm.create_model(name, pretrained=True)
        sd, source = ref.state_dict(), f"timm hub '{name}'"
        cfg.update({k: ref.pretrained_cfg[k] for k in DEFAULT_CFG if k in ref.pretrained_cfg})
    else:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}. Lay the real weights out with "
                                    "`python data/prepare.py --from ../shared/data` (offline copy) or `--download` "
                                    "(online), "
                                    "or pass --weights hub to download through timm")
        sd, source = read_state_dict(path), str(path)
        cfg_file = path.parent / "config.json"
        if cfg_file.is_file():
            try:
                meta = json.loads(cfg_file.read_text())
            except ValueError as e:
                raise ValueError(f"{cfg_file} is damaged (not JSON: {e}): {PREPARE}") from None
            arch["num_heads"] = meta.get("model_args", {}).get("num_heads", arch["num_heads"])
            given = meta.get("pretrained_cfg", {})
            cfg.update({k: given[k] for k in DEFAULT_CFG if k in given})
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    model = ViT(mlp_ratio=4.0, num_classes=num_classes, **arch)
    check_arch(sd, model, source)
    model.load_state_dict(sd, strict=True)
    model.pretrained_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return model
