"""Datasets, seeded few-shot splits and the ViT input transform.

VPT (Jia et al., 2022, arXiv:2203.12119) evaluates on VTAB-1k (Zhai et al., 2019, arXiv:1910.04867):
per task 800 training and 200 validation images, scored on the official test set. This file gives every
dataset one shape so that the rest of the package never branches on where images come from:

    load_source(name)            -> Source(classes, train, test[, official])  # all images, global class ids
    make_splits(source, ...)     -> {"train", "val", "test"}                  # seeded subsets, same ids
    build_transform(S, mean, std) : PIL image -> (3, S, S) float tensor (torchvision's resize + normalise, exactly)

Datasets: "cifar10" and "mnist" (laid out by `data/prepare.py`), the structured tasks "struct-count",
"struct-position", "struct-orientation" (rendered from a seed by `structured.py`, cached under <root>/structured/),
"folder:<path>" (any ImageFolder with train/ and test/), "vtab:<name>" (NOAH-style VTAB-1k lists under
<root>/vtab-1k/<name>/).
Every loader returns RGB, so grayscale MNIST goes through the same 3-channel patch embedding.
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import structured

DATA_ENV = "VAPT_MIN_DATA"
DATASETS = ("cifar10", "mnist", *structured.TASKS)  # plus the prefixed forms "folder:<path>" and "vtab:<name>"
PROTOCOLS = ("vtab1k", "shots", "percent", "full")
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}
PREPARE_HINT = ("run `python data/prepare.py --from ../shared/data` (local copy) or "
                "`python data/prepare.py --download` (online), or point --data-root / "
                f"${DATA_ENV} at a folder prepared that way")


def data_root(root=None) -> pathlib.Path:
    """Where prepared data lives: explicit `root` > $VAPT_MIN_DATA > <repo>/data. Need not exist yet."""
    if root is None:
        root = os.environ.get(DATA_ENV) or pathlib.Path(__file__).resolve().parents[1] / "data"
    return pathlib.Path(root).expanduser().resolve()


# ---------------------------------------------------------------------------------------------- loaders
def open_rgb(path) -> Image.Image:
    """Read one image file as RGB. Grayscale, RGBA and palette images are converted, not rejected."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the lazy decode, so bad bytes fail in here
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise OSError(f"cannot read image {path}: {e}") from e


class ArrayImages:
    """Loader for images held in memory as uint8 (N, H, W) or (N, H, W, 3); the key is the row index.
    A class rather than a lambda so DataLoader workers can pickle it."""

    def __init__(self, x):
        self.x = np.asarray(x)

    def __call__(self, i) -> Image.Image:
        return Image.fromarray(self.x[i]).convert("RGB")


class Samples(torch.utils.data.Dataset):
    """A list of (key, label) pairs plus a loader that turns a key (file path or row index) into an image.
    Subsets share the loader, so a split is just a list of indices: cheap to build, easy to compare."""

    def __init__(self, items, loader, transform=None):
        self.items = list(items)
        self.loader = loader
        self.transform = transform

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        key, label = self.items[i]
        img = self.loader(key)
        return (self.transform(img) if self.transform is not None else img), label

    def subset(self, indices) -> "Samples":
        return Samples([self.items[int(i)] for i in indices], self.loader, self.transform)

    def with_transform(self, t) -> "Samples":
        return Samples(self.items, self.loader, t)


@dataclass
class Source:
    """All images of one dataset. `classes[i]` names class id i in every split drawn from it."""
    name: str
    classes: list[str]
    train: Samples
    test: Samples
    official: dict[str, Samples] | None = None  # VTAB-1k lists when the format provides them


# ---------------------------------------------------------------------------------------------- sources
def _missing(path) -> FileNotFoundError:
    return FileNotFoundError(f"no data at {path}; {PREPARE_HINT}")


def _image_files(folder: pathlib.Path) -> list[str]:
    """Every image under `folder` (sub-folders too), in pathlib's order: by path component. Strings through os.walk,
    because CIFAR-10 lists 60,000 files on every run: rglob and sorting Path objects took 0.65 s per load, this
    0.12 s (a folder without sub-folders, the usual class folder, needs no component key: a plain sort is the same)."""
    found, nested = [], False
    for top, dirs, names in os.walk(folder):
        nested = nested or bool(dirs)
        found += [os.path.join(top, name) for name in names
                  if name.lower().endswith(IMG_EXTS) and not name.startswith(".")]  # skip ._foo.jpg junk
    return sorted(found, key=lambda f: f.split(os.sep)) if nested else sorted(found)


def _folder_source(name: str, folder: pathlib.Path, classes=None) -> Source:
    """ImageFolder layout: <folder>/{train,test}/<class>/<image>."""
    split_dirs = {split: folder / split for split in ("train", "test")}
    for d in split_dirs.values():
        if not d.is_dir():
            raise FileNotFoundError(f"expected image folders <class>/<image> under {d}")
    found = {c.name for d in split_dirs.values() for c in d.iterdir() if c.is_dir()}
    # Ids come from the union over both splits (or classes.txt), never per split: a class missing from
    # one split must not shift the ids of the others.
    classes = sorted(found) if classes is None else list(classes)
    if found - set(classes):
        raise ValueError(f"class folders {sorted(found - set(classes))} under {folder} are not in {classes}")
    samples = {split: Samples([(p, y) for y, c in enumerate(classes) for p in _image_files(d / c)], open_rgb)
               for split, d in split_dirs.items()}
    return Source(name, classes, samples["train"], samples["test"])


def _array_samples(x, y) -> Samples:
    return Samples([(i, int(label)) for i, label in enumerate(y)], ArrayImages(x))


def _cifar10(root: pathlib.Path, download: bool) -> Source:
    folder = root / "cifar10"
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        names = folder / "classes.txt"
        classes = [s.strip() for s in names.read_text().splitlines() if s.strip()] if names.exists() else None
        return _folder_source("cifar10", folder, classes)
    if not download:
        raise _missing(folder)
    from torchvision.datasets import CIFAR10
    train, test = (CIFAR10(root / "cifar10_torchvision", train=t, download=True) for t in (True, False))
    # train.data: (N, 32, 32, 3) uint8, the original pixels (no JPEG round trip on this route)
    return Source("cifar10", list(train.classes), _array_samples(train.data, train.targets),
                  _array_samples(test.data, test.targets))


def _mnist(root: pathlib.Path, download: bool) -> Source:
    path = root / "mnist" / "mnist.npz"
    if path.exists():
        with np.load(path) as z:  # decompress once; items then index into memory
            arrays = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif download:
        from torchvision.datasets import MNIST
        train, test = (MNIST(root / "mnist_torchvision", train=t, download=True) for t in (True, False))
        arrays = [a.numpy() for a in (train.data, train.targets, test.data, test.targets)]
    else:
        raise _missing(path)
    x_train, y_train, x_test, y_test = arrays  # x: (N, 28, 28) uint8
    classes = [str(d) for d in range(10)]
    return Source("mnist", classes, _array_samples(x_train, y_train), _array_samples(x_test, y_test))


def _read_list(path: pathlib.Path) -> list[tuple[str, int]]:
    """One `relative/path label` per line (rsplit, so paths may contain spaces)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rel, label = line.rsplit(maxsplit=1)
                rows.append((rel, int(label)))
            except ValueError:
                raise ValueError(f"{path}:{n}: expected `relative/path label`, got {line!r}") from None
    return rows


def _vtab(root: pathlib.Path, name: str) -> Source:
    folder = root / "vtab-1k" / name
    lists = {}
    for split, fname in VTAB_LISTS.items():
        if not (folder / fname).exists():
            raise FileNotFoundError(f"no VTAB-1k list {folder / fname}; a NOAH-style task folder holds "
                                    f"{', '.join(VTAB_LISTS.values())} (put it under {root / 'vtab-1k'})")
        lists[split] = _read_list(folder / fname)
    labels = sorted({y for rows in lists.values() for _, y in rows})
    idx = {y: i for i, y in enumerate(labels)}  # the identity when labels are 0..C-1, as in VTAB
    official = {split: Samples([(str(folder / rel), idx[y]) for rel, y in rows], open_rgb)
                for split, rows in lists.items()}
    return Source(f"vtab:{name}", [str(y) for y in labels], official["trainval"], official["test"], official)


def load_source(name: str, root=None, download: bool = False) -> Source:
    """Find a dataset by name; `download=True` lets cifar10/mnist fall back to torchvision's downloader."""
    root = data_root(root)
    if name == "cifar10":
        return _cifar10(root, download)
    if name == "mnist":
        return _mnist(root, download)
    if name in structured.TASKS:  # rendered on first use (data/prepare.py renders them ahead)
        z = structured.load(name, root)
        return Source(name, structured.CLASSES[name], _array_samples(z["x_train"], z["y_train"]),
                      _array_samples(z["x_test"], z["y_test"]))
    if name.startswith("folder:") and name[len("folder:"):]:
        return _folder_source(name, pathlib.Path(name[len("folder:"):]).expanduser().resolve())
    if name.startswith("vtab:") and name[len("vtab:"):]:
        return _vtab(root, name[len("vtab:"):])
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, folder:<path>, vtab:<name>")


# ----------------------------------------------------------------------------------------------- splits
def _by_class(indices, labels) -> dict[int, list[int]]:
    groups = {}
    for i in indices:
        groups.setdefault(labels[i], []).append(i)
    return groups


def _draw(labels, num_classes, protocol, g, n_train, n_val, shots, percent) -> tuple[list[int], list[int]]:
    """Indices of train and val inside `labels`. One seeded permutation decides everything, so a seed
    fixes the split and the two parts are disjoint by construction."""
    perm = torch.randperm(len(labels), generator=g).tolist()
    if protocol == "vtab1k":
        if n_train + n_val > len(perm):
            raise ValueError(f"n_train + n_val = {n_train + n_val} but only {len(perm)} training images; "
                             "lower them")
        return perm[:n_train], perm[n_train:n_train + n_val]
    if protocol == "full":
        if n_val >= len(perm):
            raise ValueError(f"n_val = {n_val} leaves no training images out of {len(perm)}; lower n_val")
        return perm[n_val:], perm[:n_val]
    groups = _by_class(perm, labels)  # each class's indices, in random order
    if protocol == "shots":
        for c in range(num_classes):
            if len(groups.get(c, [])) < shots:
                raise ValueError(f"shots={shots} but class {c} has {len(groups.get(c, []))} training images; "
                                 "lower shots")
        train = [i for c in sorted(groups) for i in groups[c][:shots]]
    else:  # percent, stratified: every class keeps its share, and at least one image
        keep = {c: max(1, round(len(idx) * percent / 100)) for c, idx in groups.items()}
        train = [i for c in sorted(groups) for i in groups[c][:keep[c]]]
    chosen = set(train)
    rest = [i for i in perm if i not in chosen]
    if n_val > len(rest):
        raise ValueError(f"n_val = {n_val} but only {len(rest)} images remain after the train draw; lower n_val")
    return train, rest[:n_val]


def _capped(labels, cap: int) -> list[int]:
    """About cap/C test images per class. Seed 0 on purpose, not the run's seed: every run of a comparison
    is then scored on the same test images."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).tolist()
    groups = [g for _, g in sorted(_by_class(perm, labels).items())]
    # Round-robin: the r-th image of every class comes before the (r+1)-th of any, so counts differ by <= 1
    # (unless a class runs out).
    order = [g[r] for r in range(max(map(len, groups), default=0)) for g in groups if r < len(g)]
    return sorted(order[:cap])


def check_protocol(protocol: str, n_train: int, n_val: int, shots: int | None, percent: float | None,
                   test_cap: int | None):
    """The split options' rules, stated once (train.Config.validate and make_splits both call this)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    if protocol == "shots" and not (shots or 0) >= 1:
        raise ValueError(f"protocol 'shots' needs shots=k (--shots K) with k >= 1 images per class, got {shots}")
    if protocol == "percent" and not 0 < (percent or 0) <= 100:
        raise ValueError(f"protocol 'percent' needs percent in (0, 100] (--percent P), got {percent}")
    if shots is not None and protocol != "shots":
        raise ValueError(f"--shots {shots} needs --protocol shots (the protocol is {protocol!r})")
    if percent is not None and protocol != "percent":
        raise ValueError(f"--percent {percent} needs --protocol percent (the protocol is {protocol!r})")
    if n_train < 1 or n_val < 0 or (test_cap is not None and test_cap < 1):
        raise ValueError(f"need n_train >= 1, n_val >= 0 and test_cap >= 1 (or none), got {n_train}, {n_val}, "
                         f"{test_cap}")


def make_splits(source: Source, *, protocol: str = "vtab1k", seed: int = 0, n_train: int = 800, n_val: int = 200,
                shots: int | None = None, percent: float | None = None, test_cap: int | None = None
                ) -> dict[str, Samples]:
    """Train/val/test Samples. Class ids are the Source's in every split; only the chosen images differ.

    vtab1k : official lists when the Source has them, else n_train then n_val drawn from source.train
    shots  : `shots` images per class, val = n_val from the rest     percent: `percent`% of each class, ditto
    full   : everything except n_val held out for val                test_cap: fixed, class-balanced subset
    """
    check_protocol(protocol, n_train, n_val, shots, percent, test_cap)
    if protocol == "vtab1k" and source.official:  # the published 800/200 lists; n_train/n_val are ignored
        splits = {"train": source.official["train"], "val": source.official["val"]}
    else:
        g = torch.Generator().manual_seed(seed)
        train, val = _draw(source.train.labels, len(source.classes), protocol, g, n_train, n_val, shots, percent)
        splits = {"train": source.train.subset(train), "val": source.train.subset(val)}
    test = source.test
    splits["test"] = test if test_cap is None else test.subset(_capped(test.labels, test_cap))
    for split, samples in splits.items():
        if len(samples) == 0:
            raise ValueError(f"the {split} split of {source.name} is empty; check the data and n_train/n_val")
    return splits


# ------------------------------------------------------------------------------------------- transform
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class Transform:
    """PIL image -> (3, S, S) normalised tensor: resized by PIL, scaled to [0, 1], x -> (x - mean) / std per channel.
    What torchvision's Resize((S, S)) + ToTensor() + Normalize(mean, std) compute, bit for bit (tests/test_data.py),
    written out so that importing the package does not import torchvision: its import took 1.4 s (python -X
    importtime, 2026-12-02), paid by every process the grid and the tests start (a short grid run: 6.4 -> 5.4 s).
    torchvision is still what downloads CIFAR-10 and MNIST online."""

    def __init__(self, img_size: int, mean, std, interpolation: str = "bicubic"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {', '.join(INTERPOLATIONS)}")
        self.size, self.filter = img_size, INTERPOLATIONS[interpolation]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.resize((self.size, self.size), self.filter)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()  # (3, S, S) uint8
        return x.float().div(255).sub_(self.mean).div_(self.std)


def build_transform(img_size: int, mean, std, interpolation: str = "bicubic") -> Transform:
    """PIL image -> (3, img_size, img_size) normalised tensor, for train and test alike.
    No augmentation: VTAB-1k practice (followed by VPT and its successors) trains on the plain resized
    images, so results compare the prompts rather than the augmentation recipe. No centre crop either:
    at 32x32 (CIFAR) or 28x28 (MNIST) a crop would cut away object, not border."""
    return Transform(img_size, mean, std, interpolation)
