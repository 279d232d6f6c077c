"""Damaged files give one line naming the file, what is wrong and the fix, exit code 2, and write nothing.

Weights (a text file renamed model.safetensors, a truncated safetensors file, a .pth that is not a checkpoint),
a run's checkpoints (last/best.safetensors on --resume and on load_run), its train_state.pt and config.json.
No real data needed: a random ViT-Ti/16 saved by the test, a folder dataset of tiny PNGs.
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vapt_min import train as T
from vapt_min.vit import ViT, parse_name

MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def one_clear_line(r, *names):
    """Exit code 2, a single `error:` line that names every given string, no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for split, count in (("train", 8), ("test", 2)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (30 * i, 200, 30)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def args(images):
    return ["--dataset", f"folder:{images}", "--img-size", "32", "--n-train", "8", "--n-val", "4", "--batch-size", "4",
            "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, args):
    """A finished 1-epoch run, resumable with --epochs 2: last, best, train_state and config."""
    out = tmp_path_factory.mktemp("run") / "r"
    T.main(["--weights", "random", "--epochs", "1", *args, "--out", str(out)])
    return out


def weights_file(folder: Path) -> Path:
    """A genuine (random) ViT-Ti/16 checkpoint in timm's names, with a config.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = ViT(num_classes=0, **parse_name(MODEL))
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    return folder / "model.safetensors"


@pytest.mark.parametrize("damage", ["text", "truncated", "pth"])
def test_damaged_weights_file(tmp_path, args, damage, cli_here):
    path = weights_file(tmp_path / "w")
    assert cli_here("--weights", str(path), "--max-steps", "1", *args, "--out", str(tmp_path / "ok")).returncode == 0
    if damage == "text":
        path.write_text("this is not a checkpoint\n")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a download cut half-way
    else:
        path = path.with_name("model.pth")
        path.write_text("not a pickle either")
    out = tmp_path / "new"
    line = one_clear_line(cli_here("--weights", str(path), *args, "--out", str(out)), path, "damaged", "prepare.py")
    assert not out.exists(), line


def test_damaged_weights_under_the_data_root_name_prepare(tmp_path, args, cli_here):
    path = weights_file(tmp_path / "root" / "weights" / MODEL)
    path.write_bytes(path.read_bytes()[:1000])
    out = tmp_path / "new"
    one_clear_line(cli_here("--data-root", str(tmp_path / "root"), *args, "--out", str(out)), path, "prepare.py")
    assert not out.exists()
    (path.parent / "model.safetensors").unlink()
    weights_file(path.parent)
    (path.parent / "config.json").write_text("{ not json")
    one_clear_line(cli_here("--data-root", str(tmp_path / "root"), *args, "--out", str(out)), path.parent / "config.json",
                   "damaged", "prepare.py")
    assert not out.exists()


@pytest.mark.parametrize("name,content", [
    ("last.safetensors", b"garbage"),
    ("last.safetensors", None),                 # truncated
    ("train_state.pt", b"garbage"),
    ("train_state.pt", None),                   # truncated zip
    ("config.json", b"{\"method\": "),
])
def test_damaged_run_file_on_resume(tmp_path, run, name, content, cli_here):
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in run.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    path = folder / name
    path.write_bytes(content if content is not None else path.read_bytes()[: path.stat().st_size // 2])
    before = snapshot(folder)
    one_clear_line(cli_here("--resume", str(folder), "--epochs", "2", "--no-progress"), path, "damaged", "another run")
    assert snapshot(folder) == before  # nothing written, nothing lost


@pytest.mark.parametrize("which", ["last", "best"])
def test_damaged_checkpoint_on_load_run(tmp_path, run, which):
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in run.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    T.load_run(folder, which)  # intact: loads
    path = folder / f"{which}.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path} is damaged .*another run"):
        T.load_run(folder, which)


@pytest.mark.parametrize("lr", ["0", "-0.001"])
def test_non_positive_lr_fails_in_validation(lr):
    with pytest.raises(ValueError, match=f"--lr must be > 0, got {float(lr)}"):
        T.config_from_args(["--lr", lr])
