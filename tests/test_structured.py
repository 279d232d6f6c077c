"""The structured tasks (vapt_min/structured.py): deterministic, balanced, of the stated sizes, and each label true
to the scene it names."""
import importlib.util

import numpy as np
import pytest

from vapt_min import structured
from vapt_min.data import data_root, load_source, make_splits

REPO = structured.pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", structured.TASKS)
def test_same_seed_same_bytes_other_seed_other_images(task):
    x, y = structured.render(task, "train", 24, seed=0)
    x2, y2 = structured.render(task, "train", 24, seed=0)
    assert x.dtype == np.uint8 and x.shape == (24, 64, 64, 3)
    assert x.tobytes() == x2.tobytes() and np.array_equal(y, y2)
    # image i depends on i only, not on how many were rendered before it
    assert structured.render(task, "train", 5, seed=0)[0].tobytes() == x[:5].tobytes()
    other, _ = structured.render(task, "train", 24, seed=1)
    test, _ = structured.render(task, "test", 24, seed=0)
    assert all(not np.array_equal(x[i], other[i]) and not np.array_equal(x[i], test[i]) for i in range(24))


@pytest.mark.parametrize("task", structured.TASKS)
def test_balanced_and_stated_sizes(task):
    c = len(structured.CLASSES[task])
    assert c == 8 and structured.SPLITS == {"train": 6400, "test": 6400}
    for n in structured.SPLITS.values():  # labels cycle, so a split is balanced exactly when C divides its size
        assert n % c == 0 and n >= 5000
    _, y = structured.render(task, "test", 3 * c)
    assert np.bincount(y, minlength=c).tolist() == [3] * c


def scene_of(task, label, i):
    scene = []
    img = structured.render_one(task, label, np.random.default_rng([0, 9, 9, i]), scene)
    return img, scene


@pytest.mark.parametrize("i", range(40))
def test_labels_name_the_scene(i):
    label = i % 8
    _, s = scene_of("struct-count", label, i)
    assert sum(o["kind"] == "disc" for o in s) == label + 1  # count the discs ...
    assert {o["kind"] for o in s} <= {"disc", "square", "triangle"} and len(s) <= label + 1 + 4  # ... among others

    _, s = scene_of("struct-position", label, i)
    assert [o["kind"] for o in s].count("ring") == 1 and s[0]["kind"] == "ring"
    assert label * 8 <= s[0]["x"] < (label + 1) * 8  # 64 px in 8 bins

    _, s = scene_of("struct-orientation", label, i)
    assert [o["kind"] for o in s].count("ellipse") == 1 and s[0]["kind"] == "ellipse"
    assert label * 22.5 <= np.rad2deg(s[0]["angle"]) % 180 < (label + 1) * 22.5
    for task in structured.TASKS:  # every object inside the canvas, no two touching
        _, s = scene_of(task, label, i)
        for a in s:
            assert a["r"] < a["x"] < 64 - a["r"] and a["r"] < a["y"] < 64 - a["r"]
            assert all(np.hypot(a["x"] - b["x"], a["y"] - b["y"]) > a["r"] + b["r"] for b in s if b is not a)


def test_the_target_is_drawn_where_the_scene_says():
    # the ring's centre is background (its hole), a pixel half-way out along its radius is the ring's colour
    img, s = scene_of("struct-position", 3, 0)
    ring = s[0]
    inside = img[int(ring["y"]), int(ring["x"] + 0.78 * ring["r"])].astype(int)
    hole = img[int(ring["y"]), int(ring["x"])].astype(int)
    assert inside.max() > 150 and np.abs(inside - hole).max() > 60


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="struct-count, struct-position, struct-orientation"):
        structured.render("struct-distance", "train", 2)
    with pytest.raises(ValueError, match="train or test"):
        structured.render("struct-count", "val", 2)


def test_load_source_renders_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(structured, "SPLITS", {"train": 40, "test": 16})
    src = load_source("struct-orientation", root=tmp_path)
    path = structured.cache_path(tmp_path, "struct-orientation")
    assert path.exists() and not list(path.parent.glob("*.partial.npz"))
    assert (len(src.train), len(src.test), len(src.classes)) == (40, 16, 8)
    assert src.train[0][0].mode == "RGB" and src.train[0][0].size == (64, 64)
    assert np.array_equal(np.asarray(src.train[9][0]), structured.render("struct-orientation", "train", 10)[0][9])

    def no_render(*a, **k):
        raise AssertionError("re-rendered a cached task")
    monkeypatch.setattr(structured, "render", no_render)
    again = load_source("struct-orientation", root=tmp_path)
    s = make_splits(again, seed=3, n_train=24, n_val=8)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (24, 8, 16)
    assert not set(s["train"].items) & set(s["val"].items)


def test_prepare_renders_the_structured_part(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("prepare", REPO / "data" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    assert "structured" in prepare.PARTS
    monkeypatch.setattr(structured, "SPLITS", {"train": 16, "test": 8})
    prepare.structured_render(tmp_path)  # two worker processes, given the small sizes
    for task in structured.TASKS:
        with np.load(structured.cache_path(tmp_path, task)) as z:
            assert z["x_train"].shape == (16, 64, 64, 3) and z["y_test"].tolist() == list(range(8))
            assert z["x_test"].tobytes() == structured.render(task, "test", 8)[0].tobytes()


def test_real_caches_have_the_stated_sizes():
    root = data_root()
    paths = [structured.cache_path(root, t) for t in structured.TASKS]
    if not all(p.exists() for p in paths):
        pytest.skip(f"no rendered caches under {root / 'structured'}; run data/prepare.py")
    for task in structured.TASKS:
        src = load_source(task)
        assert len(src.train) == 6400 and len(src.test) == 6400
        assert np.bincount(src.test.labels).tolist() == [800] * 8
