"""Structured tasks rendered from a seed: VTAB-1k's Structured group without a download.

V²APT reports its largest gains on VTAB-1k's Structured group (Zhai et al., 2019, arXiv:1910.04867): counting,
positions, orientations, distances, where the answer is *where* or *how many* rather than *what*. Those datasets
(CLEVR, dSprites, ...) cannot be downloaded here, so three tasks imitate them procedurally:

    task                 imitates (VTAB-1k)              label                                       classes
    struct-count         clevr/count_all                 how many discs (1..8) among other shapes    8
    struct-position      dsprites/label_x_position       x-bin of the one ring among discs/squares  8
    struct-orientation   dsprites/label_orientation      angle bin of the one elongated ellipse      8

Every image (64x64 RGB uint8) has background clutter: a two-colour gradient, low-frequency texture, thin strokes
(never objects of any task) and pixel noise. Objects are drawn 2x supersampled and box-filtered (anti-aliased).
Image i of a split is rendered from its own generator `np.random.default_rng([seed, task, split, i])`, so an image
never depends on how many others were rendered, and the same seed gives byte-identical images. Labels cycle
(label = i mod C), so every split is exactly balanced. Sizes: a training pool of 6,400 (the 800/200 protocol draws
from it by seed, as for CIFAR-10) and a test set of 6,400.

Choices where VTAB says nothing we can copy (each checked in calibration, RESULTS.md): 8 bins for position and
orientation (dSprites has 16 and renders at 64 px for a 224-px model; at our 112 px input one bin of 16 would be 3
input pixels); the orientation of a centrally symmetric ellipse is an angle in [0, 180) deg; counts 1..8 (CLEVR's 3..10
shifted down so the smallest count is one object).

    render(task, split, n, seed) -> (x (n, 64, 64, 3) uint8, y (n,) int64)
    load(task, root, seed)       -> the cached arrays under <root>/structured/, rendered on first use
"""
from __future__ import annotations

import pathlib

import numpy as np

SIZE = 64  # canvas side in pixels
SS = 2  # supersampling factor for anti-aliased edges
VERSION = 1  # bump when the rendering rules change: the cache name carries it, so old caches are not reused
SPLITS = {"train": 6400, "test": 6400}  # pool for the 800/200 draw; test >= 5,000 and divisible by every C
BINS = 8


def _classes(task: str) -> list[str]:
    if task == "struct-count":
        return [str(k) for k in range(1, 9)]
    if task == "struct-position":
        w = SIZE / BINS
        return [f"x {b * w:.0f}-{(b + 1) * w:.0f} px" for b in range(BINS)]
    return [f"{b * 180 / BINS:g}-{(b + 1) * 180 / BINS:g} deg" for b in range(BINS)]


TASKS = ("struct-count", "struct-position", "struct-orientation")
CLASSES = {t: _classes(t) for t in TASKS}


# ------------------------------------------------------------------------------------------ drawing
def _grid():
    c = ((np.arange(SIZE * SS) + 0.5) / SS).astype(np.float32)  # supersample centres in canvas pixels; float32
    # throughout (half the memory traffic of float64, and the output is 8-bit anyway)
    return np.meshgrid(c, c)  # xx, yy: (S*SS, S*SS)


XX, YY = _grid()
C = XX[0]  # (S*SS,) the supersample centres along one axis


def _bilinear(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix that linearly interpolates n_in samples spread over n_out points."""
    pos = np.linspace(0, n_in - 1, n_out)
    i0 = np.minimum(pos.astype(int), n_in - 2)
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] = 1 - (pos - i0)
    m[np.arange(n_out), i0 + 1] = pos - i0
    return m


UP = _bilinear(SIZE * SS, 5).astype(np.float32)


def _colour(rng, lo: float, hi: float) -> np.ndarray:
    """A saturated colour whose brightest channel lies in [lo, hi]."""
    c = rng.uniform(0.0, 1.0, 3)
    c[rng.integers(3)] = 1.0
    return (c * rng.uniform(lo, hi)).astype(np.float32)


def _background(rng) -> np.ndarray:
    """(S*SS, S*SS, 3) float in [0, 1]: gradient + texture + strokes. Kept dark so objects stand out."""
    a, b = _colour(rng, 0.1, 0.45), _colour(rng, 0.1, 0.45)
    theta = rng.uniform(0, 2 * np.pi)
    cos, sin = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    t = ((C[None, :] * cos + C[:, None] * sin) / SIZE + 1) / 2  # 0..1 across the canvas
    coarse = rng.normal(0, 0.06, (5, 5, 3)).astype(np.float32)  # low-frequency texture, upsampled: UP @ coarse @ UP.T
    img = a + (b - a) * t[..., None] + np.einsum("ia,abc,jb->ijc", UP, coarse, UP, optimize=True)
    for _ in range(rng.integers(3, 7)):  # thin strokes, ~1 px wide: clutter, never counted or located
        p, q = rng.uniform(0, SIZE, 2), rng.uniform(0, SIZE, 2)
        d = q - p
        w = _window(min(p[0], q[0]) - 1, max(p[0], q[0]) + 1, min(p[1], q[1]) - 1, max(p[1], q[1]) + 1)
        xx, yy = XX[w], YY[w]
        s = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / (d @ d + 1e-9), 0, 1)
        dist = np.hypot(xx - p[0] - s * d[0], yy - p[1] - s * d[1])
        img[w][dist < 0.6] = _colour(rng, 0.3, 0.6)
    return img


def _window(x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """The supersampled rows/columns covering canvas box [x0, x1] x [y0, y1]: shapes are drawn only there."""
    lo = lambda t: max(0, int(t * SS))
    hi = lambda t: min(SIZE * SS, int(np.ceil(t * SS)) + 1)
    return slice(lo(y0), hi(y1)), slice(lo(x0), hi(x1))


def _mask(kind: str, cx: float, cy: float, r: float, angle: float, w: tuple[slice, slice]) -> np.ndarray:
    """Boolean supersampled mask, inside window w, of one shape with centre (cx, cy) and size r (pixels)."""
    dx, dy = XX[w] - cx, YY[w] - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)  # object frame
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if kind == "disc":
        return u * u + v * v < r * r
    if kind == "ring":
        d2 = u * u + v * v
        return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
    if kind == "square":
        return np.maximum(abs(u), abs(v)) < 0.85 * r
    if kind == "triangle":  # equilateral, circumradius r
        return (v < r / 2) & (np.sqrt(3) * u - v < r) & (-np.sqrt(3) * u - v < r)
    if kind == "ellipse":  # the elongated object: semi-axes r and r/3.5 along `angle`
        return (u / r) ** 2 + (v / (r / 3.5)) ** 2 < 1
    raise ValueError(kind)


def _place(rng, radii, margin: float = 1.0, first: tuple[float, float] | None = None) -> list[tuple[float, float]]:
    """Centres for objects of the given radii, inside the canvas and not touching (rejection sampling)."""
    out = [] if first is None else [first]
    for r in radii[len(out):]:
        for _ in range(500):
            c = rng.uniform(r + 1, SIZE - r - 1, 2)
            if all(np.hypot(*(c - o)) > r + radii[j] + margin for j, o in enumerate(out)):
                out.append((float(c[0]), float(c[1])))
                break
        else:
            raise RuntimeError("could not place the objects; the canvas is too crowded")  # never at these sizes
    return out


def _draw(img, kind, centre, r, rng, angle=None, scene=None):
    angle = rng.uniform(0, 2 * np.pi) if angle is None else angle
    w = _window(centre[0] - r - 1, centre[0] + r + 1, centre[1] - r - 1, centre[1] + r + 1)
    img[w][_mask(kind, centre[0], centre[1], r, angle, w)] = _colour(rng, 0.75, 1.0)
    if scene is not None:
        scene.append({"kind": kind, "x": centre[0], "y": centre[1], "r": r, "angle": float(angle)})


def render_one(task: str, label: int, rng, scene: list | None = None) -> np.ndarray:
    """One (SIZE, SIZE, 3) uint8 image of class `label`; `scene`, when given a list, receives every object drawn
    (kind, centre x/y, size r and angle in radians; x to the right, y down, in canvas pixels), target first."""
    img = _background(rng)
    if task == "struct-count":  # label + 1 discs, 0..4 distractors (squares, triangles); count the discs
        n_d = int(rng.integers(0, 5))
        radii = list(rng.uniform(3.5, 5.0, label + 1)) + list(rng.uniform(3.5, 5.0, n_d))
        kinds = ["disc"] * (label + 1) + list(rng.choice(["square", "triangle"], n_d))
        for kind, c, r in zip(kinds, _place(rng, radii), radii):
            _draw(img, kind, c, r, rng, scene=scene)
    elif task == "struct-position":  # the one ring; its centre's x lies in bin `label`
        r = float(rng.uniform(5.0, 6.5))
        w = SIZE / BINS
        x = float(rng.uniform(max(label * w, r + 1), min((label + 1) * w, SIZE - r - 1)))
        y = float(rng.uniform(r + 1, SIZE - r - 1))
        n_d = int(rng.integers(2, 5))
        radii = [r] + list(rng.uniform(4.0, 6.0, n_d))
        kinds = ["ring"] + list(rng.choice(["disc", "square"], n_d))
        for kind, c, rr in zip(kinds, _place(rng, radii, first=(x, y)), radii):
            _draw(img, kind, c, rr, rng, scene=scene)
    elif task == "struct-orientation":  # the one ellipse; its long axis' angle mod 180 lies in bin `label`
        r = float(rng.uniform(11.0, 14.0))
        angle = np.deg2rad(rng.uniform(label, label + 1) * 180 / BINS)
        n_d = int(rng.integers(2, 5))
        radii = [r] + list(rng.uniform(3.5, 5.0, n_d))
        kinds = ["ellipse"] + list(rng.choice(["disc", "square", "triangle"], n_d))
        for i, (kind, c, rr) in enumerate(zip(kinds, _place(rng, radii), radii)):
            _draw(img, kind, c, rr, rng, angle=angle if i == 0 else None, scene=scene)
    else:
        raise ValueError(f"unknown structured task {task!r}; choose one of {', '.join(TASKS)}")
    img = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))  # box filter: anti-aliased edges
    img = img + rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


SPLIT_CODE = {"train": 0, "test": 1}


def render(task: str, split: str, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images 0..n-1 of a split: (n, SIZE, SIZE, 3) uint8 and labels (n,) = i mod C."""
    if task not in TASKS:
        raise ValueError(f"unknown structured task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; choose train or test")
    n = SPLITS[split] if n is None else n
    c = len(CLASSES[task])
    y = np.arange(n, dtype=np.int64) % c
    x = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        x[i] = render_one(task, int(y[i]), np.random.default_rng([seed, TASKS.index(task), SPLIT_CODE[split], i]))
    return x, y


def cache_path(root, task: str, seed: int = 0) -> pathlib.Path:
    return pathlib.Path(root) / "structured" / f"{task}-seed{seed}-v{VERSION}.npz"


def ensure(root, task: str, seed: int = 0, log=print, sizes: dict | None = None) -> pathlib.Path:
    """Render the task's cache under <root>/structured/ unless it is there; returns its path."""
    path = cache_path(root, task, seed)
    if path.exists():
        return path
    sizes = SPLITS if sizes is None else sizes
    log(f"  render {task} (seed {seed}): {sizes['train']} pool + {sizes['test']} test images -> {path}")
    arrays = {}
    for split, n in sizes.items():
        arrays[f"x_{split}"], arrays[f"y_{split}"] = render(task, split, n, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial.npz")  # renamed when complete, so "exists" means "complete"
    np.savez(tmp, **arrays)  # uncompressed: noise does not compress, and loading stays fast
    tmp.replace(path)
    return path


def ensure_all(root, tasks=TASKS, seed: int = 0, workers: int = 2, log=print) -> None:
    """Render every missing cache, one task per process (three tasks take ~75 s on one core, ~40 s on two)."""
    missing = [t for t in tasks if not cache_path(root, t, seed).exists()]
    for t in tasks:
        if t not in missing:
            log(f"  skip {cache_path(root, t, seed)} (exists)")
    if workers <= 1 or len(missing) <= 1:
        for t in missing:
            ensure(root, t, seed, log)
        return
    import concurrent.futures
    for t in missing:
        log(f"  render {t} (seed {seed}): {SPLITS['train']} pool + {SPLITS['test']} test images")
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(missing))) as pool:
        k = len(missing)  # sizes passed explicitly: a spawned worker would not see a changed SPLITS
        for path in pool.map(ensure, [root] * k, missing, [seed] * k, [_quiet] * k, [dict(SPLITS)] * k):
            log(f"  wrote {path}")


def _quiet(*args):
    pass


def load(task: str, root, seed: int = 0) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test of a task, rendered and cached on first use."""
    with np.load(ensure(root, task, seed)) as z:
        return {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
