"""The package's shape, read from its source: file sizes, line length, a method-blind loop, one home per default,
and the generator contract that lets a new method train through the loop unchanged."""
import ast
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from vapt_min import build as B
from vapt_min import train as T
from vapt_min.adaptive_prompt import AdaptivePrompts
from vapt_min.config import METHODS, Config
from vapt_min.metric_guidance import MetricGuidedPrompts
from vapt_min.pca_fusion import ViaPTPrompts
from vapt_min.prompts import PromptedViT, PromptGenerator
from vapt_min.vae_prompt import VAEPrompts

PACKAGE = Path(__file__).resolve().parents[1] / "vapt_min"
METHOD_MODULES = {"vae_prompt", "pca_fusion", "adaptive_prompt", "metric_guidance", "full_v2apt"}


def test_files_stay_readable():
    sources = {p.name: p.read_text().splitlines() for p in PACKAGE.glob("*.py")}
    assert {n: len(s) for n, s in sources.items() if len(s) > 400} == {}, "no package file over 400 lines"
    long = [f"{n}:{i}" for n, s in sources.items() for i, line in enumerate(s, 1) if len(line) > 120]
    assert long == [], f"lines over 120 characters: {long}"


def test_the_loop_is_short_and_knows_no_method():
    src = inspect.getsource(T.train)
    assert len(src.splitlines()) <= 100
    names = [*METHODS, "davpt", "DA-VPT", "V²APT", "ViaPT", "VAPT", "class_map", "update_map", "mg_", "kl", "pca"]
    assert [n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}", src)] == []


def test_train_imports_no_method_module():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    imported = {node.module.split(".")[-1] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported & METHOD_MODULES == set(), "train.py reaches the methods only through build.build_model"
    build = ast.parse((PACKAGE / "build.py").read_text())
    names = {a.asname or a.name for node in build.body if isinstance(node, ast.ImportFrom) and node.module
             and node.module.split(".")[-1] in METHOD_MODULES for a in node.names}
    outside = [n.id for f in build.body if isinstance(f, ast.FunctionDef) and f.name != "build_model"
               for n in ast.walk(f) if isinstance(n, ast.Name) and n.id in names]
    assert outside == [], "method names are used only in build_model's assembly"


@pytest.mark.parametrize("cls,fields", [
    (VAEPrompts, {"latent_dim": "latent_dim", "beta": "beta", "eval_samples": "eval_samples", "encode_at": "encode_at",
                  "film_init": "film_init", "logvar_init": "logvar_init", "free_bits": "free_bits"}),
    (ViaPTPrompts, {"instance": "viapt_instance", "inst_pca_dim": "inst_pca_dim", "refresh": "pca_refresh",
                    "history": "viapt_history"}),
    (AdaptivePrompts, {"kernel": "vapt_kernel", "hidden": "vapt_hidden", "dropout": "vapt_dropout",
                       "kernel_init": "vapt_kernel_init"}),
    (MetricGuidedPrompts, {"lambda_visual": "mg_visual", "lambda_cls": "mg_cls", "alpha": "mg_alpha",
                           "delta": "mg_delta", "normalise": "mg_normalise", "anchor": "mg_anchor",
                           "space": "mg_space"}),
])
def test_config_defaults_are_the_constructors(cls, fields):
    """The one duplication left on purpose (a default in Config for the CLI, one in the constructor for the lessons):
    they must agree."""
    sig = inspect.signature(cls.__init__).parameters
    assert {p: sig[p].default for p in fields} == {p: getattr(Config(), f) for p, f in fields.items()}


class ToyPrompts(PromptGenerator):
    """A method written against the contract alone: one prompt per block, a made-up auxiliary loss, a buffer that an
    epoch hook changes. Nothing in the loop was edited for it."""

    def __init__(self, dim, depth):
        super().__init__()
        self.prompts = torch.nn.Parameter(torch.zeros(depth, 1, dim))
        self.register_buffer("hook_calls", torch.zeros((), dtype=torch.long))
        self.loss_weights = {"toy": 0.5}

    def epoch_hook(self, model, loader):
        self.hook_calls += 1
        return {"toy_hook": int(self.hook_calls)}

    def forward(self, i, tokens, prompts, aux):
        aux["toy"] = aux.get("toy", 0.0) + self.prompts[i].pow(2).sum() + 1.0
        return self.prompts[i].expand(tokens.shape[0], -1, -1)


def test_a_new_method_trains_through_the_unchanged_loop(tmp_path, monkeypatch):
    """Adding a method = its generator + one branch in build.build_model (+ its options): here the branch is patched in."""
    from PIL import Image
    for split, n in (("train", 8), ("test", 2)):
        for c in ("ant", "bee"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (30 * i, 100, 30)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    real = B.build_model

    def with_toy(cfg, vit, num_classes):
        if cfg.method != "vpt-deep":
            return real(cfg, vit, num_classes)
        return PromptedViT(vit, num_classes, ToyPrompts(vit.dim, len(vit.blocks)), prompt_dropout=cfg.prompt_dropout)
    monkeypatch.setattr(B, "build_model", with_toy)
    args = ["--dataset", f"folder:{tmp_path / 'imgs'}", "--weights", "random", "--img-size", "32", "--n-train", "8",
            "--n-val", "4", "--batch-size", "4", "--epochs", "3", "--no-progress"]
    s = T.train(T.config_from_args([*args, "--out", str(tmp_path / "run")]))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["toy"] >= 12.0 for r in rows)                       # its aux loss is logged raw (12 blocks × ≥ 1)
    assert [r.get("toy_hook") for r in rows] == [2, 3, None]         # before epoch 1 (unlogged), after epochs 1 and 2
    from safetensors.torch import load_file
    assert int(load_file(str(tmp_path / "run" / "last.safetensors"))["generator.hook_calls"]) == 3  # checkpointed
    assert s["trainable_params"] == 12 * 192 + 2 * 192 + 2
