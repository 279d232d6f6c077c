"""vapt_min.data and data/prepare.py: splits are seeded and disjoint, class ids never move, every image
loads as RGB, and the errors say how to fix them. Tiny generated datasets cover the formats; the prepared
CIFAR-10 / MNIST copies (python data/prepare.py --from ../shared/data) cover the real layout."""
import collections
import hashlib
import importlib.util
import io
import json
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import need
from vapt_min import data
from vapt_min.data import build_transform, data_root, load_source, make_splits

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def keys(samples):
    return [key for key, _ in samples.items]


def png(path, mode, size=(6, 5)):
    """A tiny image in `mode`: L (grayscale), RGBA, P (palette) or RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, (200, 30, 90)).convert(mode)
    img.save(path)
    return path


def jpg_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="JPEG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------- real CIFAR-10
@pytest.fixture(scope="module")
def cifar():
    need(data_root() / "cifar10" / "train")
    return load_source("cifar10")


def test_cifar10_source_classes_and_counts(cifar):
    assert cifar.classes == CIFAR10
    assert (len(cifar.train), len(cifar.test)) == (50000, 10000)
    assert collections.Counter(cifar.test.labels) == {c: 1000 for c in range(10)}
    key, label = cifar.train.items[0]
    assert pathlib.Path(key).parent.name == CIFAR10[label]


def test_vtab1k_800_200_disjoint_and_seeded(cifar):
    a, b, c = (make_splits(cifar, seed=s) for s in (0, 0, 1))
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (800, 200, 10000)
    assert not set(keys(a["train"])) & set(keys(a["val"]))
    assert keys(a["train"]) == keys(b["train"]) and keys(a["val"]) == keys(b["val"])
    assert set(keys(a["train"])) != set(keys(c["train"]))


def test_class_ids_are_the_sources_in_every_split(cifar):
    label_of = dict(cifar.train.items) | dict(cifar.test.items)
    for split in (make_splits(cifar, seed=3), make_splits(cifar, protocol="shots", shots=2, seed=4)):
        for samples in split.values():
            for key, label in samples.items:
                assert label == label_of[key]
                assert pathlib.Path(key).parent.name == CIFAR10[label]  # folder name = class name


def test_shots_gives_k_per_class(cifar):
    s = make_splits(cifar, protocol="shots", shots=5, n_val=50, seed=0)
    assert collections.Counter(s["train"].labels) == {c: 5 for c in range(10)}
    assert len(s["val"]) == 50 and not set(keys(s["train"])) & set(keys(s["val"]))


def test_percent_is_stratified(cifar):
    s = make_splits(cifar, protocol="percent", percent=2, seed=0)
    assert collections.Counter(s["train"].labels) == {c: 100 for c in range(10)}  # 2% of 5000 per class
    assert len(s["val"]) == 200 and not set(keys(s["train"])) & set(keys(s["val"]))
    tiny = make_splits(cifar, protocol="percent", percent=0.001, seed=0)
    assert collections.Counter(tiny["train"].labels) == {c: 1 for c in range(10)}  # at least one each


def test_full_holds_out_n_val(cifar):
    s = make_splits(cifar, protocol="full", n_val=1000)
    assert (len(s["train"]), len(s["val"])) == (49000, 1000)
    assert not set(keys(s["train"])) & set(keys(s["val"]))


def test_test_cap_is_fixed_across_seeds_and_balanced(cifar):
    a, b = (make_splits(cifar, seed=s, test_cap=105)["test"] for s in (0, 7))
    assert keys(a) == keys(b) and len(a) == 105
    assert sorted(collections.Counter(a.labels).values()) == [10] * 5 + [11] * 5


def test_split_errors_say_the_fix(cifar):
    with pytest.raises(ValueError, match="unknown protocol.*vtab1k"):
        make_splits(cifar, protocol="fewshot")
    with pytest.raises(ValueError, match="shots=k"):
        make_splits(cifar, protocol="shots")
    with pytest.raises(ValueError, match="percent in"):
        make_splits(cifar, protocol="percent", percent=150)
    with pytest.raises(ValueError, match="percent in"):
        make_splits(cifar, protocol="percent", percent=0)
    with pytest.raises(ValueError, match="only 50000"):
        make_splits(cifar, n_train=50000, n_val=1)
    with pytest.raises(ValueError, match="lower shots"):
        make_splits(cifar, protocol="shots", shots=5001)
    with pytest.raises(ValueError, match="empty"):
        make_splits(cifar, n_val=0)


def test_transform_gives_normalised_tensor(cifar):
    x, y = cifar.train.with_transform(build_transform(112, (0.5,) * 3, (0.5,) * 3))[0]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and isinstance(y, int)
    assert -1.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(ValueError, match="bicubic"):
        build_transform(112, (0.5,) * 3, (0.5,) * 3, interpolation="lanczos5")


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_transform_equals_torchvision(interpolation):
    """Our Transform is torchvision's Resize + ToTensor + Normalize, bit for bit, on an RGB photo-like image, a
    grayscale one (converted as the loaders do) and an upscale and a downscale."""
    from torchvision import transforms
    g = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # ImageNet's: not all equal, so channels cannot mix
    images = [Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
              Image.fromarray(g.integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB"),
              Image.fromarray(g.integers(0, 256, (300, 260, 3), dtype=np.uint8))]
    mode = transforms.InterpolationMode(interpolation)
    for size in (112, 224):
        ref = transforms.Compose([transforms.Resize((size, size), interpolation=mode), transforms.ToTensor(),
                                  transforms.Normalize(mean, std)])
        ours = build_transform(size, mean, std, interpolation)
        for img in images:
            assert torch.equal(ours(img), ref(img))


def test_importing_the_package_does_not_import_torchvision():
    """The transform is ours, so a process that trains imports no torchvision (about 1 s of its start)."""
    code = "import sys, vapt_min.train, vapt_min.bench; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_real_mnist_counts():
    need(data_root() / "mnist" / "mnist.npz")
    m = load_source("mnist")
    assert (len(m.train), len(m.test), m.classes) == (60000, 10000, [str(d) for d in range(10)])


# ------------------------------------------------------------------------------ generated datasets
def test_mnist_items_are_three_equal_channels(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist.npz", x_train=x, y_train=np.arange(12) % 10, x_test=x[:3], y_test=np.arange(3))
    m = load_source("mnist", root=tmp_path)
    img, label = m.train[5]
    assert img.mode == "RGB" and label == 5
    t, _ = m.train.with_transform(build_transform(32, (0.5,) * 3, (0.5,) * 3))[1]
    assert t.shape == (3, 32, 32)
    torch.testing.assert_close(t[0], t[1])
    torch.testing.assert_close(t[1], t[2])


def test_folder_source_converts_modes_and_ids_are_global(tmp_path):
    png(tmp_path / "train" / "bee" / "gray.png", "L")
    png(tmp_path / "train" / "bee" / "rgba.png", "RGBA")
    png(tmp_path / "train" / "ant" / "palette.png", "P")
    png(tmp_path / "test" / "ant" / "0.png", "RGB")
    png(tmp_path / "test" / "cow" / "0.jpg", "RGB")  # a class only the test split has
    src = load_source(f"folder:{tmp_path}")
    assert src.classes == ["ant", "bee", "cow"]
    assert sorted(src.train.labels) == [0, 1, 1] and sorted(src.test.labels) == [0, 2]
    for i in range(len(src.train)):
        img, _ = src.train[i]
        assert img.mode == "RGB" and img.size == (6, 5)


def test_image_files_keep_pathlib_order_nested_and_filtered(tmp_path):
    """The listing (os.walk, for speed) keeps the order of the sorted pathlib listing it replaced: the order the seeded
    splits index into. Nested folders whose names sort differently as strings and as path parts ("b-c" < "b/" as text,
    "b" < "b-c" as parts), upper-case suffixes, dot-files and non-images."""
    for rel in ("b/c.png", "b-c.png", "b/a/z.JPG", "b.d/x.jpeg", "a.txt", "._junk.png", "B.png", "b0.PNG", "b/.hid.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    reference = sorted(p for p in tmp_path.rglob("*")
                       if p.suffix.lower() in data.IMG_EXTS and not p.name.startswith("."))
    got = data._image_files(tmp_path)
    assert got == [str(p) for p in reference]
    assert [pathlib.Path(f).relative_to(tmp_path).as_posix() for f in got] == [
        "B.png", "b/a/z.JPG", "b/c.png", "b-c.png", "b.d/x.jpeg", "b0.PNG"]
    flat = tmp_path / "b" / "a"                             # no sub-folders: the plain sort's path
    for name in ("a-b.png", "a.png", "a0.png", "Y.jpg", "._x.png"):
        (flat / name).write_bytes(b"")
    assert data._image_files(flat) == [str(p) for p in sorted(flat.glob("[!.]*.*")) if p.suffix.lower() in data.IMG_EXTS]
    assert [pathlib.Path(f).name for f in data._image_files(flat)] == ["Y.jpg", "a-b.png", "a.png", "a0.png", "z.JPG"]


def test_corrupt_image_error_names_the_file(tmp_path):
    png(tmp_path / "train" / "a" / "ok.png", "RGB")
    png(tmp_path / "test" / "a" / "ok.png", "RGB")
    bad = tmp_path / "train" / "a" / "zz_bad.png"
    bad.write_bytes(b"not an image at all")
    src = load_source(f"folder:{tmp_path}")
    with pytest.raises(OSError, match="zz_bad.png"):
        src.train[[k for k, _ in src.train.items].index(str(bad))]


def test_folder_without_a_split_says_the_layout(tmp_path):
    png(tmp_path / "train" / "a" / "0.png", "RGB")  # no test/
    with pytest.raises(FileNotFoundError, match=f"expected image folders <class>/<image> under {tmp_path / 'test'}"):
        load_source(f"folder:{tmp_path}")


def test_vtab_folder_uses_official_lists(tmp_path):
    task = tmp_path / "vtab-1k" / "toy"
    rows = {"train800.txt": [("images/a 0.png", 3), ("images/b.png", 7)], "val200.txt": [("images/c.png", 3)],
            "test.txt": [("images/d.png", 7), ("images/e.png", 9)]}
    rows["train800val200.txt"] = rows["train800.txt"] + rows["val200.txt"]
    for name, lines in rows.items():
        for rel, _ in lines:
            png(task / rel, "L")
        (task / name).write_text("".join(f"{rel} {y}\n" for rel, y in lines))
    src = load_source("vtab:toy", root=tmp_path)
    assert src.name == "vtab:toy" and src.classes == ["3", "7", "9"]  # sorted labels, ids 0..C-1
    assert set(src.official) == {"train", "val", "trainval", "test"}
    s = make_splits(src, seed=5)
    assert keys(s["train"]) == [str(task / "images/a 0.png"), str(task / "images/b.png")]  # spaces kept
    assert s["train"].labels == [0, 1] and s["val"].labels == [0] and s["test"].labels == [1, 2]
    assert s["test"][0][0].mode == "RGB"
    with pytest.raises(FileNotFoundError, match="train800.txt"):
        load_source("vtab:absent", root=tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="cifar10, mnist, struct-count, struct-position, struct-orientation, folder:<path>, vtab:<name>"):
        load_source("imagenet")


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_missing_data_says_run_prepare(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="prepare.py") as e:
        load_source(name, root=tmp_path)
    assert str(tmp_path / name) in str(e.value)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert data_root() == REPO / "data"
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"


def test_download_path_wraps_torchvision(tmp_path, monkeypatch):
    class FakeCIFAR10:  # stands in for torchvision's downloader: arrays, targets, classes
        def __init__(self, root, train, download):
            n = 6 if train else 2
            self.data, self.targets, self.classes = np.zeros((n, 32, 32, 3), np.uint8), [1] * n, CIFAR10
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    src = load_source("cifar10", root=tmp_path, download=True)
    assert (len(src.train), len(src.test), src.classes) == (6, 2, CIFAR10)
    assert src.train[0][0].mode == "RGB" and src.train[0][1] == 1


# ------------------------------------------------------------------------------------- prepare.py
def run_prepare(*args):
    return subprocess.run([sys.executable, str(REPO / "data" / "prepare.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


@pytest.fixture
def fake_source(tmp_path):
    """A tiny folder laid out like shared/data, with SHA256SUMS."""
    src = tmp_path / "src"
    (src / "cifar10").mkdir(parents=True)
    layout = {"test.zip": ["test/cat/0000.jpg", "test/dog/0000.jpg"],
              "train_a.zip": ["train/cat/0000.jpg", "train/dog/0000.jpg"],
              "train_b.zip": ["train/cat/0001.jpg", "train/dog/0001.jpg", "train/dog/0002.jpg"]}
    for zname, members in layout.items():
        with zipfile.ZipFile(src / "cifar10" / zname, "w") as zf:
            for m in members:
                zf.writestr(m, jpg_bytes((10, 200, 10) if "cat" in m else (10, 10, 200)))
    (src / "cifar10" / "classes.txt").write_text("cat\ndog\n")
    (src / "mnist").mkdir()
    x = np.zeros((4, 28, 28), np.uint8)
    np.savez(src / "mnist" / "mnist.npz", x_train=x, y_train=np.arange(4), x_test=x[:2], y_test=np.arange(2))
    vit = src / "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    vit.mkdir()
    (vit / "model.safetensors").write_bytes(b"\0" * 64)
    (vit / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5] * 3}}))
    png(src / "imagenet_samples" / "n0_1.JPEG", "RGB")
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    (src / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(src)}\n"
                                            for p in files))
    return src


def test_prepare_lays_out_and_is_idempotent(fake_source, tmp_path):
    out = tmp_path / "out"
    first = run_prepare("--from", str(fake_source), "--root", str(out), "--only", "cifar10,mnist,weights")
    assert first.returncode == 0, first.stderr
    assert "extract 5 train images" in first.stdout
    weights = out / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert (weights / "model.safetensors").read_bytes() == b"\0" * 64 and (weights / "config.json").exists()
    assert not [p for p in out.rglob("*") if "imagenet_samples" in str(p) or p.suffix == ".JPEG"]
    src = load_source("cifar10", root=out)
    assert src.classes == ["cat", "dog"] and sorted(src.train.labels) == [0, 0, 1, 1, 1]
    assert len(load_source("mnist", root=out).train) == 4

    again = run_prepare("--from", str(fake_source), "--root", str(out), "--only", "cifar10,mnist,weights")
    assert again.returncode == 0, again.stderr
    assert "extract" not in again.stdout and "copy" not in again.stdout and again.stdout.count("skip") == 6


def test_prepare_checks_sums_and_options(fake_source, tmp_path):
    out = tmp_path / "out"
    only = run_prepare("--from", str(fake_source), "--root", str(out), "--only", "mnist")
    assert only.returncode == 0 and (out / "mnist" / "mnist.npz").exists() and not (out / "cifar10").exists()
    (fake_source / "mnist" / "mnist.npz").write_bytes(b"tampered")
    bad = run_prepare("--from", str(fake_source), "--root", str(out), "--only", "mnist")
    assert bad.returncode != 0 and "checksum mismatch" in bad.stderr and "mnist.npz" in bad.stderr
    assert run_prepare("--from", str(fake_source), "--bogus").returncode == 2
    assert run_prepare("--from", str(fake_source), "--only", "imagenet").returncode == 2


def test_prepare_download_writes_loadable_jpegs(tmp_path):
    spec = importlib.util.spec_from_file_location("prepare", REPO / "data" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for split in ("train", "test"):
        prepare.write_jpegs(x, [0, 2, 0, 9, 2], prepare.CIFAR10_CLASSES, tmp_path / "cifar10" / split)
    src = load_source("cifar10", root=tmp_path)  # no classes.txt: sorted folder names
    assert src.classes == ["airplane", "bird", "truck"]
    assert sorted(pathlib.Path(k).name for k in keys(src.train)) == ["0000.jpg", "0000.jpg", "0000.jpg",
                                                                     "0001.jpg", "0001.jpg"]
