"""The lessons' scale: the CPU budget of their saved outputs, or the papers' scale on a GPU, by one switch.

    VAPT_MIN_SCALE=paper jupyter lab lessons/      # 224 px, the full 1k training split, the full test set, 100 epochs

Every lesson takes its training budget from `lesson_budget(...)`. Without the variable (or with VAPT_MIN_SCALE=cpu)
the budget is what the lesson wrote, the one its saved outputs and `pytest --nbval` were made with; training runs take
the GPU when there is one (numbers then differ from the saved ones a little: other kernels, other rounding). With
VAPT_MIN_SCALE=paper the budget becomes the `paper` preset (config.PRESETS): meant for a GPU, hours on a CPU.

`check_band(...)` is how a lesson guards a number that comes out of training, sampling or a long float reduction
(STYLE 10): the number must lie in a stated band around the saved run's, so a library update's last digits pass and a
real regression fails; the cell's printout is `# NBVAL_IGNORE_OUTPUT`.

Re-setting bands after a change that moves a lesson's numbers (README, Contributing): execute the lesson once with
VAPT_MIN_BANDS_RECORD=<file>, and every value outside its band is appended to the file instead of stopping the lesson;
look at each, set its `saved=` to the new run's value where the move is explained, and execute again without it.

`log_result(...)` / `show_log()`: the course's running log. Each lesson trains on its own small budget, so VPT-Deep's
accuracy differs from lesson to lesson; every training run is logged with its budget, and a lesson shows the log so
far: the methods on one page, comparable where the budgets agree.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

from .config import PRESETS

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; lessons run one at a time there
    fcntl = None

ENV = "VAPT_MIN_SCALE"
RECORD = "VAPT_MIN_BANDS_RECORD"
LESSON_RUNS = Path(__file__).resolve().parents[1] / "runs" / "lessons"   # lesson_run's folders and the course log
SCALES = ("cpu", "paper")


def scale() -> str:
    s = os.environ.get(ENV, "cpu").strip().lower() or "cpu"
    if s not in SCALES:
        raise ValueError(f"{ENV}={s!r}: use one of {', '.join(SCALES)} (cpu: the saved outputs' budget; paper: a GPU)")
    return s


def lesson_budget(**cpu) -> dict:
    """The lesson's Config options: `cpu` as given, or at paper scale 224 px, 100 epochs, the whole test set, and the 1k
    protocol's 800/200 images where the lesson draws a smaller vtab1k split (few-shot protocols keep their shots).
    At cpu scale no run scores its best-validation checkpoint on test as well (best_val_test=False, unless the lesson
    asks): the lessons print the last epoch's test accuracy only, and that second pass over the test images took about
    70 s of the 830 s their saved training runs took (estimated from the runs' epoch times, 2026-12-01)."""
    if scale() == "cpu":
        return {"best_val_test": False, **cpu}
    paper = {**cpu, **PRESETS["paper"], "num_workers": min(8, os.cpu_count() or 1)}
    if cpu.get("protocol", "vtab1k") == "vtab1k":
        paper.update(n_train=800, n_val=200)
    return paper


def check_band(what: str, value, saved, tol: float):
    """Assert |value − saved| <= tol, elementwise for sequences: `saved` is what the lesson's saved run printed, `tol`
    the band a library update or another machine stays inside (a few seed-to-seed standard deviations at most). At
    paper scale the budget differs from the saved run's: nothing to compare, so nothing is checked."""
    if scale() != "cpu":
        return
    values, saveds = (list(value), list(saved)) if isinstance(saved, (list, tuple)) else ([value], [saved])
    values = [v.detach() if hasattr(v, "detach") else v for v in values]  # a tensor that still has a graph
    if len(values) != len(saveds):
        raise AssertionError(f"{what}: {len(values)} values, but the saved run has {len(saveds)}")
    off = [(float(v), s) for v, s in zip(values, saveds) if not abs(float(v) - s) <= tol]
    if off and os.environ.get(RECORD):
        with open(os.environ[RECORD], "a") as f:
            f.write(f"{what}: now {[round(float(v), 4) for v in values]}, saved {saveds}, band ± {tol:g}\n")
        return
    if off:
        raise AssertionError(f"{what}: {off[0][0]:.4g} is outside the band {off[0][1]:.4g} ± {tol:g} of the saved run "
                             f"({len(off)} of {len(values)} values): a regression, or a change that needs the lesson "
                             "re-executed and its bands re-set")


@contextlib.contextmanager
def locked(target: Path):
    """Hold an exclusive lock on `target` (through the file <target>.lock beside it) for the block: two processes that
    reach one lesson run or the course log at once (`pytest -n 2` executes two notebooks side by side, lessons 01 and
    02 train the same runs) take turns, the second one then finds the first one's result. A no-op where fcntl is
    missing (Windows)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def run_key(options: dict) -> str:
    """12 hex digits naming one configuration under one version of the package: the options (sorted) and the bytes
    of every vapt_min/*.py file, so an edited method never reads a run trained by the old code."""
    h = hashlib.sha256(json.dumps({"scale": scale(), **options}, sort_keys=True, default=str).encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:12]


def lesson_run(root=None, **options) -> dict:
    """train(Config(**options)) once per configuration: the run lands in <repo>/runs/lessons/<method>-<key>/ and a later
    call with the same options and package (another lesson, a re-run) reads its summary.json instead of training again.
    Lessons 01 and 02 train the same linear probe and VPT-Shallow: the second one to run loads them. A run cut short
    (no summary.json) is trained again from scratch."""
    from .train import Config, train
    if "out" in options:
        raise ValueError("lesson_run chooses the run folder itself; call train(Config(out=...)) for a folder of yours")
    root = Path(root) if root is not None else LESSON_RUNS
    out = root / f"{options.get('method', 'vpt-deep')}-{run_key(options)}"
    with locked(out):  # another kernel training this run: wait for it, then load it
        if (out / "summary.json").is_file():
            summary = json.loads((out / "summary.json").read_text())
            print(f"{summary['method']}: loaded the finished run {out} (same options, same package), not trained again")
            return summary
        if out.exists():
            shutil.rmtree(out)
        return train(Config(out=str(out), **options))


def log_path(path=None):
    """The running log's file: `path`, or <repo>/runs/lessons/log.csv."""
    return Path(path) if path is not None else LESSON_RUNS / "log.csv"


LOG_FIELDS = ("lesson", "method", "dataset", "n_train", "epochs", "img_size", "lr", "seed", "test_images", "test_acc")


def log_result(lesson: str, summary: dict, budget: dict, label: str | None = None, path=None) -> dict:
    """Append one trained run to the course's running log (<repo>/runs/lessons/log.csv), replacing an older row of the
    same lesson, method (or `label`, e.g. "viapt m=32") and budget, so a re-executed lesson does not count twice.
    Every lesson logs its runs; `show_log` puts them on one page, with the budget beside each accuracy: two rows
    compare only where their budgets agree."""
    from .runs import atomic_write
    path = log_path(path)
    row = {"lesson": lesson, "method": label or summary["method"], "dataset": summary["dataset"],
           "n_train": budget.get("n_train", budget.get("shots")), "epochs": budget.get("epochs"),
           "img_size": budget.get("img_size"), "lr": budget.get("lr"), "seed": summary["seed"],
           "test_images": budget.get("test_cap"), "test_acc": round(100 * summary["test_acc"], 1)}
    row = {k: "" if v is None else str(v) for k, v in row.items()}
    with locked(path):  # two lessons logging at once: neither loses the other's rows
        same = [k for k in LOG_FIELDS if k != "test_acc"]
        rows = [r for r in read_log(path) if [r.get(k) for k in same] != [row[k] for k in same]] + [row]
        atomic_write(path, lambda tmp: write_log(tmp, rows))  # another kernel never reads a half-written log
    return row


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_log(path: Path, rows: list[dict]):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, LOG_FIELDS)
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["lesson"], r["method"])))


def show_log(path=None, upto: str | None = None) -> list[dict]:
    """Print the running log as a table, lesson by lesson; return its rows. `upto` ("03"): only the lessons up to that
    one, what a learner who went through them in order has seen (the file keeps the rows of every lesson ever run)."""
    rows = [r for r in read_log(log_path(path)) if upto is None or r["lesson"] <= upto]
    print("| lesson | method | data | train images | epochs | px | lr | seed | test images | test acc (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r[k] or "—" for k in LOG_FIELDS) + " |")
    return rows
