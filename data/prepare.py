"""Lay out vapt_min's data folder, from a local copy or from the internet.

    python data/prepare.py --from ../shared/data [--root data] [--only cifar10,mnist,weights,structured]
    python data/prepare.py --download            [--root data] [--only ...]

Result under the data root (default: $VAPT_MIN_DATA, else <repo>/data):

    cifar10/{train,test}/<class>/NNNN.jpg, cifar10/classes.txt
    mnist/mnist.npz                          x_train (60000, 28, 28), y_train, x_test (10000, 28, 28), y_test
    weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k/{model.safetensors, config.json, imagenet1k_class_names.txt}
    structured/struct-{count,position,orientation}-seed0-v1.npz   rendered here, not copied (vapt_min/structured.py)

Idempotent: a part that is already complete (file counts, checksums) is skipped. With --from, files are
checked against the source's SHA256SUMS when it has one. Only the files named above are read from the
source: anything else in it (e.g. imagenet_samples/) is never copied. --from needs only the standard
library (plus numpy for the structured tasks, which are rendered, never copied); --download needs torchvision
and timm.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
PARTS = ("cifar10", "mnist", "weights", "structured")
CIFAR_ZIPS = ("test.zip", "train_a.zip", "train_b.zip")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
WEIGHT_FILES = ("model.safetensors", "config.json", "imagenet1k_class_names.txt")


def default_root() -> Path:
    # Same precedence as vapt_min.data.data_root, repeated so --from runs without torch installed.
    return Path(os.environ.get("VAPT_MIN_DATA") or REPO / "data")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(src: Path) -> dict[str, str]:
    """SHA256SUMS lines `<hex>  ./dir/file` -> {"dir/file": hex}; empty when the source has none."""
    path = src / "SHA256SUMS"
    if not path.exists():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*").removeprefix("./")] = digest
    return sums


def verified(src: Path, rel: str, sums: dict[str, str]) -> Path:
    """The source file `rel`, after checking it against SHA256SUMS when listed there."""
    path = src / rel
    if not path.exists():
        sys.exit(f"error: {path} not found")
    if rel in sums:
        if sha256(path) != sums[rel]:
            sys.exit(f"error: checksum mismatch for {path} (expected {sums[rel]} from {src / 'SHA256SUMS'}); "
                     "the copy is damaged, fetch it again")
        print(f"  ok  sha256 {rel}")
    return path


def copy(path: Path, dst: Path) -> None:
    """Copy unless `dst` already has the same bytes. copyfile, not copy2: the source may be read-only."""
    if dst.exists() and dst.stat().st_size == path.stat().st_size and sha256(dst) == sha256(path):
        print(f"  skip {dst} (complete)")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, dst)
    print(f"  copy {path} -> {dst}")


def count_images(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*/*.jpg")) if folder.is_dir() else 0


# ------------------------------------------------------------------------------------------- --from
def jpgs_in(path: Path, split: str) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [m for m in zf.namelist() if m.startswith(f"{split}/") and m.endswith(".jpg")]


def cifar10_from(src: Path, root: Path, sums: dict[str, str]) -> None:
    # test.zip and train_a.zip are required. train_b.zip (train images 1000-4999 of each class) may be left
    # out to save space, e.g. to fit the device machine's 64 MiB limit; training then sees 10000 images.
    names = [z for z in CIFAR_ZIPS if z != "train_b.zip" or (src / "cifar10" / z).exists()]
    if "train_b.zip" not in names:
        print("  note: no train_b.zip, so only the first 1000 train images per class")
    zips = [verified(src, f"cifar10/{z}", sums) for z in names]
    out = root / "cifar10"
    for split in ("test", "train"):
        # Expected = the split's .jpg entries in the zips at hand: 10000 test; 50000 train (10000 without train_b)
        members = {z: jpgs_in(z, split) for z in zips}
        expected, found = sum(map(len, members.values())), count_images(out / split)
        if found == expected:
            print(f"  skip {out / split} ({found} images, complete)")
            continue
        print(f"  extract {expected} {split} images -> {out / split} (found {found})")
        for z, entries in members.items():
            with zipfile.ZipFile(z) as zf:
                zf.extractall(out, members=entries)  # extractall drops '..' and absolute parts of names
        if count_images(out / split) != expected:
            sys.exit(f"error: {out / split} has {count_images(out / split)} images, expected {expected}; "
                     "remove that folder and run again")
    if (src / "cifar10" / "classes.txt").exists():
        copy(verified(src, "cifar10/classes.txt", sums), out / "classes.txt")
    else:
        (out / "classes.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")


def files_from(src: Path, root: Path, sums: dict[str, str], part: str) -> None:
    if part == "mnist":
        copy(verified(src, "mnist/mnist.npz", sums), root / "mnist" / "mnist.npz")
        return
    for name in WEIGHT_FILES:
        rel = f"{WEIGHTS}/{name}"
        if name == "imagenet1k_class_names.txt" and not (src / rel).exists():
            continue  # optional: only used to print readable ImageNet predictions
        copy(verified(src, rel, sums), root / "weights" / WEIGHTS / name)


# --------------------------------------------------------------------------------------- --download
def cifar10_download(root: Path) -> None:
    from torchvision.datasets import CIFAR10
    out = root / "cifar10"
    for split, n in (("test", 10000), ("train", 50000)):
        if count_images(out / split) == n:
            print(f"  skip {out / split} ({n} images, complete)")
            continue
        ds = CIFAR10(root / "cifar10_torchvision", train=split == "train", download=True)  # checks md5 itself
        print(f"  write {len(ds)} {split} JPEGs -> {out / split}")
        write_jpegs(ds.data, ds.targets, CIFAR10_CLASSES, out / split)
    (out / "classes.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")


def write_jpegs(x, y, classes, out: Path) -> None:
    """(N, H, W, 3) uint8 -> <out>/<class>/NNNN.jpg, numbered per class in dataset order. Quality 75 with
    4:2:0 chroma (PIL's defaults) matches the shared copy, so both routes give the same kind of pixels."""
    from PIL import Image
    counts = [0] * len(classes)
    for img, label in zip(x, y):
        (out / classes[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out / classes[label] / f"{counts[label]:04d}.jpg", quality=75)
        counts[label] += 1


def mnist_download(root: Path) -> None:
    import numpy as np
    from torchvision.datasets import MNIST
    path = root / "mnist" / "mnist.npz"
    if path.exists():
        print(f"  skip {path} (exists)")
        return
    train, test = (MNIST(root / "mnist_torchvision", train=t, download=True) for t in (True, False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("mnist.partial.npz")  # renamed when complete, so "exists" means "complete"
    np.savez_compressed(tmp, x_train=train.data.numpy(), y_train=train.targets.numpy(),
                        x_test=test.data.numpy(), y_test=test.targets.numpy())
    tmp.replace(path)
    print(f"  write {path}")


def weights_config(model) -> dict:
    """config.json in the shared copy's format: what vapt_min reads is pretrained_cfg (mean, std, ...)."""
    keep = ("tag", "input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes",
            "first_conv", "classifier", "license")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    return {"architecture": model.pretrained_cfg.get("architecture", WEIGHTS.split(".")[0]),
            "num_classes": model.num_classes, "num_features": model.num_features, "global_pool": model.global_pool,
            "model_args": {"patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim,
                           "depth": len(model.blocks), "num_heads": attn.num_heads,
                           "mlp_ratio": mlp.fc1.out_features / model.embed_dim, "qkv_bias": attn.qkv.bias is not None,
                           "img_size": model.patch_embed.img_size[0]},
            "pretrained_cfg": {k: model.pretrained_cfg[k] for k in keep if k in model.pretrained_cfg}}


def weights_download(root: Path) -> None:
    import timm
    from safetensors.torch import save_file
    out = root / "weights" / WEIGHTS
    if all((out / name).exists() for name in WEIGHT_FILES):
        print(f"  skip {out} (complete)")
        return
    model = timm.create_model(WEIGHTS, pretrained=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(weights_config(model), indent=2))
    from timm.data import ImageNetInfo  # "tench, Tinca tinca" -> "tench"
    info = ImageNetInfo("imagenet-1k")
    names = [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]
    (out / "imagenet1k_class_names.txt").write_text("\n".join(names) + "\n")
    print(f"  write {out}/{{{', '.join(WEIGHT_FILES)}}}")


# ------------------------------------------------------------------------------------- structured
def structured_render(root: Path) -> None:
    """The three structured tasks, rendered from seed 0 (two processes; about 40 s on 2 cores)."""
    sys.path.insert(0, str(REPO))  # run as a script: make the package importable (it needs only numpy here)
    from vapt_min import structured
    structured.ensure_all(root, workers=2)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Lay out vapt_min's data folder.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="src", type=Path, help="local folder laid out like shared/data")
    source.add_argument("--download", action="store_true", help="fetch with torchvision and timm (online)")
    parser.add_argument("--root", "--data-root", type=Path, default=None,
                        help="data root (default: $VAPT_MIN_DATA, else <repo>/data)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    args = parser.parse_args(argv)  # unknown options exit with an error
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--only takes a comma list of {', '.join(PARTS)}, got {args.only!r}")

    root = (args.root or default_root()).expanduser().resolve()
    print(f"data root: {root}")
    if args.src is not None:
        src = args.src.expanduser().resolve()
        if not src.is_dir():
            parser.error(f"--from {src}: no such folder")
        sums = read_sums(src)
        print(f"source: {src} ({'checking against SHA256SUMS' if sums else 'no SHA256SUMS, not verified'})")
    for part in parts:
        print(f"[{part}]")
        if part == "structured":  # same on both routes: nothing to fetch
            structured_render(root)
        elif args.download:
            {"cifar10": cifar10_download, "mnist": mnist_download, "weights": weights_download}[part](root)
        elif part == "cifar10":
            cifar10_from(src, root, sums)
        else:
            files_from(src, root, sums, part)
    print("done")


if __name__ == "__main__":
    main()
