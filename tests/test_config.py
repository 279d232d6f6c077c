"""Options and their checks, without data or training: the CLI, presets, every error message, the run-folder rules."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vapt_min import train as T

REPO = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "vapt_min.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_presets_and_overrides():
    assert T.config_from_args([]) == T.Config()
    paper = T.config_from_args(["--preset", "paper"])
    assert (paper.img_size, paper.epochs, paper.test_cap) == (224, 100, None)
    assert T.config_from_args(["--preset", "paper", "--epochs", "3"]).epochs == 3
    assert T.config_from_args(["--test-cap", "none"]).test_cap is None


def test_help_lists_every_option():
    text = T.build_parser().format_help()
    for f in T.fields(T.Config):
        assert "--" + f.name.replace("_", "-") in text


@pytest.mark.parametrize("args,message", [
    (["--method", "vpt-medium"], "unknown method 'vpt-medium'"),
    (["--protocol", "fewshot"], "unknown protocol"),
    (["--protocol", "shots"], r"needs shots=k \(--shots K\)"),
    (["--img-size", "100"], "not divisible by the patch size 16: use a multiple of 16, e.g. 96"),
    (["--num-prompts", "0"], "num_prompts must be >= 1"),
    (["--model", "resnet50"], "timm ViT name"),
    (["--method", "v2apt", "--inst-prompts", "11"], "prompt split does not add up"),
    (["--method", "v2apt", "--latent-dim", "0"], "--method v2apt: --latent-dim: latent_dim K must be >= 1"),
    (["--method", "v2apt", "--beta", "-1"], r"--beta: beta \(the KL weight\) must be >= 0"),
    (["--method", "viapt", "--pca-dim", "193"], r"--pca-dim: pca_dim m must be in \[0, 192\] .*got 193"),
    (["--method", "viapt", "--pca-dim", "-1"], r"--pca-dim: pca_dim m must be in \[0, 192\] .*got -1"),
    (["--method", "viapt", "--eval-samples", "0"], "--eval-samples: eval_samples R must be >= 1"),
    (["--method", "vapt", "--vapt-kernel", "8"], "--vapt-kernel: kernel 8 does not fit the 7×7 patch grid of 112 px inputs"),
    (["--method", "vapt", "--img-size", "32", "--vapt-kernel", "3"], "use 1 <= kernel <= 2, or a larger --img-size"),
    (["--method", "vapt", "--vapt-hidden", "0"], "--vapt-hidden: hidden .* must be >= 1"),
    (["--method", "davpt", "--mg-layers", "12"], "block indices must be in \\[0, 11\\] for a 12-block ViT"),
    (["--method", "davpt", "--mg-layers", "last,3"], "use 'last' or comma-separated block indices"),
    (["--method", "davpt", "--mg-prompts", "11"], r"--mg-prompts 11 must be in \[1, 10\] \(num_guided, of the prompts it can guide: --num-prompts"),
    (["--method", "davpt", "--mg-anchor", "cls"], "--mg-anchor: unknown anchor 'cls'"),
    (["--method", "vpt-deep", "--bias-extended"], "use it with --method davpt\\+ \\(or full-v2apt with --kv-bias\\), not vpt-deep"),
    (["--optimizer", "adam"], "unknown optimizer 'adam': use adamw or sgd"),
    (["--precision", "fp16"], "unknown precision 'fp16': use auto, bf16 or fp32"),
    (["--attention", "flash"], "unknown attention 'flash': use auto, sdpa or explicit"),
    (["--head-init", "kaiming"], "unknown head_init 'kaiming': use zero, timm or vpt"),
    # contradictory options: caught by Config.validate, before any data or weights load
    (["--shots", "5"], "--shots 5 needs --protocol shots \\(the protocol is 'vtab1k'\\)"),
    (["--protocol", "shots", "--shots", "-2"], r"protocol 'shots' needs shots=k \(--shots K\) with k >= 1 images per class, got -2"),
    (["--percent", "10"], "--percent 10.0 needs --protocol percent"),
    (["--protocol", "percent", "--percent", "150"], r"needs percent in \(0, 100\]"),
    (["--eval-samples", "4"], "--eval-samples 4 averages sampled prompts, which --method vpt-deep never draws: drop it"),
    (["--num-workers", "-1"], "num_workers >= 0"),
    (["--lr", "0"], r"--lr must be > 0, got 0.0"),
    (["--method", "full-v2apt", "--inst-prompts", "10"], "no domain prompts left"),
    (["--method", "full-v2apt", "--pca-dim", "0"], "--pca-dim 0 keeps no direction"),
    (["--method", "full-v2apt", "--mg-prompts", "6"], r"--mg-prompts 6 must be in \[1, 5\]"),
    (["--method", "full-v2apt", "--no-vae", "--eval-samples", "3"], "which --method full-v2apt --no-vae never draws"),
    (["--test-cap", "0"], "test_cap >= 1"),
    (["--method", "v2apt", "--network-lr-scale", "0"], "--network-lr-scale must be > 0"),
    (["--method", "vpt-deep", "--network-lr-scale", "10"], "--method vpt-deep has no generator network"),
    (["--method", "full-v2apt", "--no-vae", "--network-lr-scale", "10"], "--method full-v2apt has no generator network"),
])
def test_bad_config_values(args, message):
    with pytest.raises(ValueError, match=message):
        T.config_from_args(args)


def test_unknown_option_is_an_error():
    r = cli("--prompt-len", "5")
    assert r.returncode == 2 and "unrecognized arguments: --prompt-len" in r.stderr


def test_unknown_preset_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        T.config_from_args(["--preset", "fast"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --preset: invalid choice: 'fast'" in err and "paper" in err


def test_resume_continues_in_its_own_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(T.dataclasses.asdict(T.Config(out="somewhere/it/was/started"))))
    assert T.config_from_args(["--resume", str(run)]).out == str(run)  # the folder may have moved since
    with pytest.raises(ValueError, match=re.escape(f"continues that run in its own folder, but --out points to {tmp_path / 'other'}: drop --out")):
        T.config_from_args(["--resume", str(run), "--out", str(tmp_path / "other")])
    T.Config(resume=str(run), out=str(run)).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here; use --device cpu"):
        T.pick_device(T.Config(device="cuda"))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "last.safetensors"
    path.write_text("epoch 1")

    def crash_halfway(p):
        p.write_text("half of epoch 2")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        T.atomic_write(path, crash_halfway)
    assert path.read_text() == "epoch 1"
    T.atomic_write(path, lambda p: p.write_text("epoch 2"))
    assert path.read_text() == "epoch 2" and [q.name for q in tmp_path.iterdir()] == ["last.safetensors"]


def test_load_run_rejects_a_checkpoint_of_another_method(tmp_path):
    cfg = T.Config(method="vpt-shallow", weights="random", img_size=32)
    (tmp_path / "config.json").write_text(json.dumps(T.dataclasses.asdict(cfg)))
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    from safetensors.torch import save_file
    save_file({"generator.prompts": torch.zeros(12, 10, 192), "head.weight": torch.zeros(2, 192), "head.bias": torch.zeros(2)},
              str(tmp_path / "last.safetensors"))  # VPT-Deep's tensors: (L, P, D) prompts
    with pytest.raises(ValueError, match=re.escape("last.safetensors does not match method 'vpt-shallow' on vit_tiny_patch16_224."
                                                   "augreg_in21k_ft_in1k: missing [], unexpected [], other shapes "
                                                   "['generator.prompts (12, 10, 192) vs (1, 10, 192)']")):
        T.load_run(tmp_path)
    save_file({"head.weight": torch.zeros(2, 192), "head.bias": torch.zeros(2)}, str(tmp_path / "last.safetensors"))  # a linear probe's
    with pytest.raises(ValueError, match=re.escape("missing ['generator.prompts'], unexpected []")):
        T.load_run(tmp_path)


@pytest.mark.parametrize("method, network", [
    ("v2apt", {"generator.query", "generator.to_latent.weight", "generator.to_latent.bias", "generator.film.weight",
               "generator.film.bias"}),
    ("full-v2apt", {"generator.vae.query", "generator.vae.to_latent.weight", "generator.vae.to_latent.bias",
                    "generator.vae.film.weight", "generator.vae.film.bias"}),
    ("viapt", {"generator.encoder.local.weight", "generator.encoder.local.bias", "generator.encoder.to_slots.weight",
               "generator.encoder.to_slots.bias"}),
])
def test_network_lr_scale_gives_the_generator_network_its_own_learning_rate(method, network):
    from vapt_min.build import build_model, build_optimizer
    from vapt_min.vit import ViT, parse_name
    one = ["--viapt-learnt-lr-scale", "1"] if method in ("viapt", "full-v2apt") else []   # the network's group alone
    cfg = T.config_from_args(["--method", method, "--network-lr-scale", "10", "--lr", "2e-3", *one])
    with torch.device("meta"):
        model = build_model(cfg, ViT(num_classes=0, **parse_name(cfg.model)), num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(cfg, model).param_groups
    assert [g["lr"] for g in groups] == [2e-3, pytest.approx(2e-2)]
    assert {names[id(p)] for p in groups[1]["params"]} == network
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for g in groups for p in g["params"]} == trainable          # every one, once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    plain = build_optimizer(T.config_from_args(["--method", method, "--network-lr-scale", "1", *one]),
                            model).param_groups                                           # scale 1: one group
    assert len(plain) == 1 and len(plain[0]["params"]) == len(trainable)


@pytest.mark.parametrize("args, scale", [
    (["--method", "v2apt"], 10.0), (["--method", "full-v2apt"], 10.0), (["--method", "full-v2apt", "--no-vae",
     "--no-vae-slots", "static"], 1.0), (["--method", "vapt"], 1.0), (["--method", "viapt"], 1.0),
    (["--method", "vpt-deep"], 1.0), (["--method", "v2apt", "--network-lr-scale", "1"], 1.0),
    (["--method", "v2apt", "--network-lr-scale", "3"], 3.0),
])
def test_network_lr_scale_default_is_ten_for_the_vae_alone(args, scale):
    """Issue 16: the default opens V²APT's latent path with the VAE's encoder and decoder at 10× the lr; every other
    generator network keeps the shared lr unless asked. Fails if the default is one number for every method."""
    from vapt_min.build import build_model, build_optimizer, network_lr_scale
    from vapt_min.vit import ViT, parse_name
    one = ["--viapt-learnt-lr-scale", "1"] if args[1] in ("viapt", "full-v2apt") else []   # the network's group alone
    cfg = T.config_from_args([*args, "--lr", "2e-3", *one])
    assert network_lr_scale(cfg) == scale
    with torch.device("meta"):
        model = build_model(cfg, ViT(num_classes=0, **parse_name(cfg.model)), num_classes=10)
    lrs = sorted(g["lr"] for g in build_optimizer(cfg, model).param_groups)
    assert lrs == pytest.approx(sorted({2e-3, 2e-3 * scale}))


def test_vapt_network_is_its_token_maps_and_projector():
    from vapt_min.build import build_model, build_optimizer
    from vapt_min.vit import ViT, parse_name
    cfg = T.config_from_args(["--method", "vapt", "--network-lr-scale", "0.2"])
    with torch.device("meta"):
        model = build_model(cfg, ViT(num_classes=0, **parse_name(cfg.model)), num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    slow, fast = build_optimizer(cfg, model).param_groups[::-1]
    assert slow["lr"] == pytest.approx(2e-4) and fast["lr"] == 1e-3
    assert all(names[id(p)].startswith(("generator.layers.", "generator.projector.")) for p in slow["params"])
    assert {names[id(p)] for p in fast["params"]} >= {"generator.prompts", "head.weight", "head.bias"}


@pytest.mark.parametrize("args, learnt", [
    (["--method", "viapt"], [f"generator.new.{i}" for i in range(11)]),
    (["--method", "full-v2apt"], [f"generator.domain.new.{i}" for i in range(11)]),
])
def test_viapt_learnt_lr_scale_steps_the_learnt_coordinates_alone(args, learnt):
    """ViaPT's W_i sit on the running mean z̄: --viapt-learnt-lr-scale gives them, and nothing else, lr × s; with
    --network-lr-scale too, three groups."""
    from vapt_min.build import build_model, build_optimizer
    from vapt_min.vit import ViT, parse_name
    cfg = T.config_from_args([*args, "--viapt-learnt-lr-scale", "10", "--network-lr-scale", "3"])   # (default: 30)
    with torch.device("meta"):
        model = build_model(cfg, ViT(num_classes=0, **parse_name(cfg.model)), num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    base, net, new = build_optimizer(cfg, model).param_groups
    assert (base["lr"], net["lr"], new["lr"]) == (1e-3, pytest.approx(3e-3), pytest.approx(1e-2))
    assert [names[id(p)] for p in new["params"]] == learnt
    assert all(".new." not in names[id(p)] for g in (base, net) for p in g["params"])
    assert sum(len(g["params"]) for g in (base, net, new)) == sum(p.requires_grad for p in model.parameters())


def test_viapt_learnt_lr_scale_is_refused_without_a_carried_history():
    for args in (["--method", "vpt-deep"], ["--method", "full-v2apt", "--no-pca"], ["--method", "viapt", "--pca-dim",
                 "0"], ["--method", "viapt", "--pca-dim", "192"]):
        with pytest.raises(ValueError, match="--viapt-learnt-lr-scale 10.0: .* no learnt coordinates"):
            T.validate(T.config_from_args([*args, "--viapt-learnt-lr-scale", "10"]))
        T.validate(T.config_from_args(args))                     # the default is ignored where nothing is carried
    with pytest.raises(ValueError, match="--viapt-learnt-lr-scale must be > 0"):
        T.validate(T.config_from_args(["--method", "viapt", "--viapt-learnt-lr-scale", "0"]))


def test_viapt_default_steps_the_learnt_coordinates_30_times_faster_only_on_a_carried_history():
    """The default (chosen on validation, results/issue16/viapt.csv): W_i at lr × 30 for 0 < m < d; at m = 0 ViaPT's
    W_i are VPT-Deep's prompts and keep one learning rate, so the corner trains as VPT-Deep does."""
    from vapt_min.build import build_model, build_optimizer
    from vapt_min.vit import ViT, parse_name
    for m, groups in ((32, 2), (0, 1)):
        cfg = T.config_from_args(["--method", "viapt", "--pca-dim", str(m)])
        with torch.device("meta"):
            model = build_model(cfg, ViT(num_classes=0, **parse_name(cfg.model)), num_classes=10)
        lrs = [g["lr"] for g in build_optimizer(cfg, model).param_groups]
        assert lrs == [1e-3, pytest.approx(3e-2)][:groups]
