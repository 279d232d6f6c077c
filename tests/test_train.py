"""The training CLI end to end on real data (tiny budgets), presets, checkpoints, resume and bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import need
from vapt_min import build as B
from vapt_min import train as T
from vapt_min.data import data_root

REPO = Path(__file__).resolve().parents[1]
# A few real images at 32 px (2×2 patches): seconds per run, every code path of the loop.
TINY = ["--n-train", "40", "--n-val", "20", "--test-cap", "40", "--img-size", "32", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def real():
    need(data_root() / "cifar10" / "train")
    need(data_root() / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "model.safetensors")


def metrics_without_times(run_dir) -> list[dict]:
    """metrics.jsonl rows without the wall-clock fields, the one thing two identical runs may differ in."""
    rows = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if not k.endswith("time_s")} for r in rows]


def cli(*args, timeout=300):
    """A real `python -m vapt_min.train` process: for the short run and the kill, the paths a process must take."""
    return subprocess.run([sys.executable, "-m", "vapt_min.train", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_cli_short_run_writes_everything(real, tmp_path):
    out = tmp_path / "run"
    r = cli("--max-steps", "7", "--out", str(out), *TINY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("trainable params: 24,970 || all params: 5,549,386 || trainable%: 0.4500")  # 12·10·192 + 192·10 + 10
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 7  # 40 images / 8 = 5 steps per epoch → stops at 7
    s = json.loads((out / "summary.json").read_text())
    for key in ("best_val_acc", "last_val_acc", "test_acc", "trainable_params", "total_params", "wall_time_s", "train_img_per_s"):
        assert key in s
    assert s["trainable_params"] == 24_970 and 0 <= s["test_acc"] <= 1
    assert set(json.loads((out / "config.json").read_text())) == {f.name for f in T.fields(T.Config)}
    assert "| vpt-deep | cifar10 | 0 |" in r.stdout


def test_checkpoint_holds_only_trainable_tensors_and_reloads_to_identical_logits(real, tmp_path, monkeypatch):
    built = []
    orig = B.build_model
    monkeypatch.setattr(B, "build_model", lambda *a, **k: built.append(orig(*a, **k)) or built[-1])
    cfg = T.config_from_args(["--max-steps", "2", "--out", str(tmp_path / "r"), *TINY])
    T.train(cfg)
    model = built[-1].eval()  # the last one built: validate's meta-device models come first
    from safetensors.torch import load_file
    assert set(load_file(str(tmp_path / "r" / "last.safetensors"))) == {"generator.prompts", "head.weight", "head.bias"}
    reloaded, cfg2 = T.load_run(tmp_path / "r")
    assert cfg2 == cfg
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], model(x)[0])


def test_backbone_in_eval_mode_inside_train(real, tmp_path, monkeypatch):
    modes = []
    orig = B.build_model

    def spy(*a, **k):
        m = orig(*a, **k)
        m.vit.blocks[0].register_forward_pre_hook(lambda mod, args: modes.append((mod.training, m.training)))
        return m
    monkeypatch.setattr(B, "build_model", spy)
    T.train(T.config_from_args(["--max-steps", "2", "--out", str(tmp_path / "r"), *TINY]))
    assert (False, True) in modes            # a training step: the wrapper trains, the frozen backbone does not
    assert all(block is False for block, _ in modes)


@pytest.mark.parametrize("method,trainable", [
    ("linear", 1_930), ("vpt-shallow", 3_850), ("full", 5_524_416 + 1_930),  # backbone without its ImageNet head + ours
    ("vapt", 9_480 + 1_930),  # 32 px = 2×2 grid: 10·192 + 2·192·8 + 11·(2·192 + 2² + 1·10 + 10), + head
    ("viapt", 21_540 + 1_930),  # m = 32, 2×2 grid: 10·192 + 11·10·(192 − 32) + encoder 10·192 + 2·10·4 + 2·10, + head
    ("davpt", 23_040 + 1_930),  # VPT-Deep's prompts: the guidance is a loss, not parameters
    ("davpt+", 23_040 + 2 * 192 * 12 + 1_930),  # + the k and v biases of 12 blocks
    # VAE 192 + (192·16 + 16) + 12·5·192 + (8·384 + 384), domain prompts with PCA 5·192 + 11·5·(192 − 32), k, v biases, head
    ("full-v2apt", 18_256 + 9_760 + 4_608 + 1_930),
])


def test_methods_train_what_they_should(real, tmp_path, method, trainable):
    s = T.train(T.config_from_args(["--method", method, "--max-steps", "1", "--out", str(tmp_path / method), *TINY]))
    assert s["trainable_params"] == trainable


def test_same_seed_same_metrics(real, tmp_path):
    a = T.train(T.config_from_args(["--max-steps", "4", "--out", str(tmp_path / "a"), *TINY]))
    b = T.train(T.config_from_args(["--max-steps", "4", "--out", str(tmp_path / "b"), *TINY]))
    assert metrics_without_times(tmp_path / "a") == metrics_without_times(tmp_path / "b") and a["test_acc"] == b["test_acc"]


def test_kill_and_resume_matches_uninterrupted_run(real, tmp_path, cli_here):
    args = ["--epochs", "3", "--n-train", "160", "--n-val", "20", "--test-cap", "40", "--img-size", "64", "--batch-size", "16", "--no-progress"]
    full = cli_here("--out", str(tmp_path / "full"), *args)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "vapt_min.train", "--out", str(out), *args], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "train_state.pt").exists() and (out / "metrics.jsonl").exists()):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) < 3, "the run finished before it could be killed; make the epochs longer"
    r = cli_here("--resume", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert metrics_without_times(out) == metrics_without_times(tmp_path / "full")


def test_unknown_dataset_and_missing_data_root(tmp_path, cli_here):
    r = cli_here("--dataset", "imagenet", "--data-root", str(tmp_path), "--weights", "random", *TINY)
    assert r.returncode == 2 and "imagenet" in r.stderr and "cifar10" in r.stderr
    r = cli_here("--data-root", str(tmp_path / "nowhere"), "--weights", "random", *TINY)
    assert r.returncode == 2 and "prepare.py" in r.stderr


def test_missing_and_mismatched_weights(real, tmp_path, cli_here):
    r = cli_here("--weights", str(tmp_path / "missing.safetensors"), *TINY)
    assert r.returncode == 2 and "prepare.py" in r.stderr
    tiny_dir = data_root() / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    r = cli_here("--model", "vit_small_patch16_224", "--weights", str(tiny_dir), *TINY)
    assert r.returncode == 2 and "pass the model name that matches" in r.stderr


def test_existing_run_folder_is_not_overwritten(real, tmp_path, cli_here):
    out = tmp_path / "r"
    assert cli_here("--max-steps", "1", "--out", str(out), *TINY).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    r = cli_here("--max-steps", "1", "--out", str(out), *TINY)
    assert r.returncode == 2 and "--resume" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_v2apt_logs_kl_and_reports_a_collapsed_posterior(real, tmp_path, monkeypatch, capsys):
    args = ["--method", "v2apt", "--max-steps", "6", *TINY]
    s = T.train(T.config_from_args([*args, "--out", str(tmp_path / "ok")]))
    rows = [json.loads(l) for l in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 1e-2 and "warnings" not in r for r in rows) and s["aux_near_zero"] == []
    assert s["trainable_params"] == 29_776 + 1_930
    from vapt_min import vae_prompt
    monkeypatch.setattr(vae_prompt, "kl_standard_normal", lambda mu, logvar: 0.0 * mu.sum())  # a posterior that collapsed
    s = T.train(T.config_from_args([*args, "--out", str(tmp_path / "collapsed")]))
    printed = capsys.readouterr().out
    assert s["aux_near_zero"] == ["kl"] and "warning: auxiliary loss 'kl' stayed below" in printed
    rows = [json.loads(l) for l in (tmp_path / "collapsed" / "metrics.jsonl").read_text().splitlines()]
    dead = "auxiliary loss 'kl' was zero all epoch although its weight is 0.01"
    assert [r["warnings"] for r in rows] == [[dead], [dead]]          # every epoch says so, as it happens
    assert f"warning: epoch 1: {dead}" in printed and f"warning: epoch 2: {dead}" in printed


@pytest.mark.parametrize("method", ["davpt+", "full-v2apt"])
def test_davpt_logs_every_term_and_resume_restores_the_class_map(real, tmp_path, monkeypatch, method):
    args = ["--method", method, "--mg-prompts", "4", "--epochs", "3", *TINY]   # 10 classes on 4 prompts: k-means
    T.train(T.config_from_args([*args, "--out", str(tmp_path / "full")]))
    rows = metrics_without_times(tmp_path / "full")
    assert all(r["mg_visual"] > 0 and r["mg_cls"] > 0 for r in rows) and "map_changes" in rows[0]
    assert method != "full-v2apt" or all(r["kl"] > 0 for r in rows)
    calls = {"n": 0}
    real_evaluate = T.evaluate

    def crash_in_epoch_2(*a, **k):  # an interruption after epoch 1's checkpoint, inside the same process
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_evaluate(*a, **k)

    monkeypatch.setattr(T, "evaluate", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        T.train(T.config_from_args([*args, "--out", str(tmp_path / "cut")]))
    monkeypatch.setattr(T, "evaluate", real_evaluate)
    T.train(T.config_from_args(["--resume", str(tmp_path / "cut"), "--no-progress"]))
    assert metrics_without_times(tmp_path / "cut") == rows


# ----------------------------------------------------------------------------------- reliability: input, NaN, --check


def folder_dataset(root, n=6):
    """A folder:<root> dataset of tiny PNGs in every mode PIL hands out: L, RGBA, P and RGB."""
    for split, count in (("train", n), ("test", 2)):
        for c in ("ant", "bee"):
            for i in range(count):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (6 + i, 5), (40 * i, 200, 30)).convert(("L", "RGBA", "P", "RGB")[i % 4]).save(root / split / c / f"{i}.png")
    return root


FOLDER_ARGS = ["--weights", "random", "--img-size", "32", "--n-train", "8", "--n-val", "4", "--batch-size", "4", "--epochs", "1",
               "--no-progress"]


def test_folder_dataset_of_mixed_modes_trains_and_a_corrupt_image_names_its_file(tmp_path, capsys):
    root = folder_dataset(tmp_path / "imgs")
    T.main(["--dataset", f"folder:{root}", "--out", str(tmp_path / "ok"), *FOLDER_ARGS])  # L, RGBA and P become RGB
    assert json.loads((tmp_path / "ok" / "summary.json").read_text())["num_classes"] == 2
    bad = root / "train" / "bee" / "5.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")  # a truncated download
    with pytest.raises(SystemExit) as e:
        T.main(["--dataset", f"folder:{root}", "--out", str(tmp_path / "bad"), *FOLDER_ARGS])  # all 12 images load in epoch 1
    assert e.value.code == 2 and f"error: cannot read image {bad}" in capsys.readouterr().err


def test_nan_loss_stops_the_run_and_leaves_the_last_epoch_resumable(real, tmp_path, monkeypatch):
    args = ["--max-steps", "9", *TINY]  # 5 steps per epoch
    T.train(T.config_from_args([*args, "--out", str(tmp_path / "full")]))
    out, real_loss, calls, before = tmp_path / "cut", T.total_loss, {"n": 0}, {}

    def nan_at_step_7(*a, **k):
        calls["n"] += 1
        loss, ce = real_loss(*a, **k)
        if calls["n"] < 7:
            return loss, ce
        before.update({f: (out / f).read_bytes() for f in ("last.safetensors", "train_state.pt", "metrics.jsonl")})
        return loss * float("nan"), ce

    monkeypatch.setattr(T, "total_loss", nan_at_step_7)
    with pytest.raises(FloatingPointError, match=r"non-finite loss in epoch 2, step 7 \(batch 2 of the epoch\): loss nan, ce 2\.\d+; "
                                                 r"stopped before the optimizer step\. " + re.escape(f"{out} still holds the checkpoint "
                                                 f"of epoch 1: continue with --resume {out} and a lower --lr")):
        T.train(T.config_from_args([*args, "--out", str(out)]))
    assert calls["n"] == 7 and {f: (out / f).read_bytes() for f in before} == before  # nothing written after epoch 1
    monkeypatch.setattr(T, "total_loss", real_loss)
    saved_config = (out / "config.json").read_text()
    with pytest.raises(ValueError, match=re.escape("other shapes ['generator.prompts (12, 10, 192) vs (12, 20, 192)']")):
        T.train(T.config_from_args(["--resume", str(out), "--num-prompts", "20"]))  # options that reshape the model
    assert (out / "config.json").read_text() == saved_config
    T.train(T.config_from_args(["--resume", str(out)]))
    assert metrics_without_times(out) == metrics_without_times(tmp_path / "full")
    with pytest.raises(ValueError, match="that run already finished \\(epoch 2 of 20, step 9\\); pass a larger --epochs or --max-steps"):
        T.train(T.config_from_args(["--resume", str(out)]))


def test_nan_loss_in_the_first_epoch_exits_2_naming_step_and_terms(real, tmp_path, monkeypatch, capsys):
    real_loss = T.total_loss
    monkeypatch.setattr(T, "total_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), real_loss(*a, **k)[1]))
    args = ["--method", "v2apt", "--max-steps", "3", "--out", str(tmp_path / "r"), *TINY]
    with pytest.raises(SystemExit) as e:
        T.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: non-finite loss in epoch 1, step 1 (batch 1 of the epoch): loss nan, ce 2.303, kl " in err
    assert f"No epoch finished, nothing to resume: run again with --out {tmp_path / 'r'}" in err
    assert not (tmp_path / "r" / "last.safetensors").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()
    monkeypatch.setattr(T, "total_loss", real_loss)
    T.main(args)  # the advice works: the same --out runs
    assert (tmp_path / "r" / "summary.json").exists()


def test_check_prints_the_plan_and_writes_nothing(real, tmp_path, cli_here):
    r = cli_here("--check", "--max-steps", "7", "--out", str(tmp_path / "r"), *TINY)
    assert r.returncode == 0, r.stderr
    for line in ["check: the configuration is valid; the data, the weights and two training steps ran; nothing was written",
                 "  method     vpt-deep | trainable params: 24,970 || all params: 5,549,386 || trainable%: 0.4500",
                 "  data       cifar10 (vtab1k) | train 40 | val 20 | test 40 | 10 classes | 32px",
                 "  schedule   5 steps per epoch | 7 steps in all (20 epochs, capped by --max-steps 7) | global batch 8",
                 f"  run folder {tmp_path / 'r'} (new)"]:
        assert line in r.stdout.splitlines()
    assert "1 process, 8 images each per step" in r.stdout and "extrapolated from 2 timed training steps on a real batch" in r.stdout
    assert not (tmp_path / "r").exists()


def test_check_of_an_invalid_configuration_exits_2(real, tmp_path, capsys):
    for args, message in [(["--img-size", "100"], "not divisible by the patch size 16"),
                          (["--n-train", "50000", "--n-val", "1"], "only 50000 training images"),  # found by loading the data
                          (["--shots", "4"], "needs --protocol shots")]:
        with pytest.raises(SystemExit) as e:
            T.main(["--check", "--out", str(tmp_path / "r"), *TINY, *args])
        out, err = capsys.readouterr()
        assert e.value.code == 2 and message in err and "check:" not in out
    assert not (tmp_path / "r").exists()


def test_viapt_checkpoint_keeps_the_running_principal_directions(real, tmp_path, monkeypatch):
    built = []
    orig = B.build_model
    monkeypatch.setattr(B, "build_model", lambda *a, **k: built.append(orig(*a, **k)) or built[-1])
    T.train(T.config_from_args(["--method", "viapt", "--pca-dim", "32", "--pca-refresh", "2", "--max-steps", "4",
                                "--out", str(tmp_path / "r"), *TINY]))
    trained = built[-1]  # the last one built by train (validate's meta-device models come first)
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "r" / "last.safetensors"))
    assert {"generator.pcas.0.basis", "generator.pcas.0.cov", "generator.inst_pca.mean"} <= set(saved)
    assert not torch.equal(saved["generator.pcas.0.basis"], torch.eye(192))   # estimated, not the initial basis
    reloaded, _ = T.load_run(tmp_path / "r")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x)[0], trained.eval()(x)[0])
