"""The README's front table: every committed paired comparison with VPT-Deep after the fixes of 2026-11-25/12-01,
read from the per-run CSVs (each row holds the command that made it) and written as paired.csv (the columns of
issue 17), paired.md and paired_forest.png (one panel per task), and put into the README's front table and
RESULTS.md's bar table (where issue 17's ±1.5 bar stands and the seeds it would take), selected-rate table (each
method at the learning rate validation chose for it against VPT-Deep at its own, from the committed selection.csv
files) and compute table. Run from the repository root: python results/front/make.py, then re-execute lesson 07,
whose section 6.3 prints paired.csv and the selected-rate table (pytest --nbval compares them).

Which runs pair with which: a seed fixes the split and the batch order for every method, and the runs below share the
recipe (default preset: 20 epochs, 112 px, lr 1e-3; fp32) and the test images of their task, so each method pairs with
the VPT-Deep runs of its task on the seeds both have. Labels are renamed to the method they are at today's defaults.
"""
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from vapt_min.config import METHODS  # noqa: E402
from vapt_min.evidence import (paired_difference, paired_markdown, paired_table, seeds_for_half_width,  # noqa: E402
                               write_paired_csv)
from vapt_min.grid import LR_GRID, lr_from_command  # noqa: E402

WHOLE = "cifar10-1k (whole test, selected lr)"   # all 10,000 test images, each method at its selected rate
SOURCES = [  # (file, {label in the file: label here}[, the tasks taken from it: all when not given[, the task here]])
    # MNIST-1k from the whole-test-set files at the end (10,000 test images), not these 2,000-image runs
    ("results/issue16/v2apt_finals.csv", {"vpt-deep": "vpt-deep", "v2apt, path open": "v2apt"}, {"cifar10-1k"}),
    ("results/issue16/davpt.csv", {"davpt, raw space, weights 0.01": "davpt"}),
    ("results/issue16/vapt_20epochs.csv", {"vapt, after": "vapt"}),
    ("results/issue17/cifar10_davpt_vapt_seeds34.csv", {"davpt": "davpt", "vapt": "vapt"}),
    ("results/issue17/cifar10_by_method.csv", {m: m for m in ("linear", "vpt-shallow", "viapt", "full-v2apt", "davpt+",
                                                                "full")}),
    ("results/issue17/cifar10_seeds56.csv", {m: m for m in ("vpt-deep", "vapt", "full-v2apt")}),   # 2026-12-02
    ("results/issue17/cifar10_seeds56b.csv", {m: m for m in ("vpt-shallow", "full")}),   # 2026-12-02, later
    ("results/issue17/cifar10_seeds78.csv", {m: m for m in ("vpt-deep", "full")}),   # 2026-12-02, later still
    # 2026-12-07: VPT-Deep at the learning rate validation chose for it on CIFAR-10-1k (3e-3; its default 1e-3 is the
    # reference every row pairs with), seeds 0-5 on the same 2,000 test images
    ("results/issue17/cifar10_vptdeep_lr3e-3.csv", {"vpt-deep": "vpt-deep, lr 3e-3 (selected)"}),
    # 2026-12-07, later: DA-VPT at the rate validation chose for it on CIFAR-10-1k (3e-3), seeds 0-4, the same images
    ("results/issue17/cifar10_davpt_lr3e-3.csv", {"davpt": "davpt, lr 3e-3 (selected)"}),
    # the same sitting, later: the linear probe at the rate validation chose for it (3e-4, the bottom of its grid)
    ("results/issue17/cifar10_linear_lr3e-4.csv", {"linear": "linear, lr 3e-4 (selected)"}),
    # 2026-12-07, night: the full V²APT at the rate validation chose for it (3e-3, the top of its grid), seeds 0-4
    ("results/issue17/cifar10_fullv2apt_lr3e-3.csv", {"full-v2apt": "full-v2apt, lr 3e-3 (selected)"}),
    ("results/struct/count/results.csv", {"vpt-deep": "vpt-deep", "v2apt levers": "v2apt",
                                          "v2apt": "v2apt, the paper's letter", "viapt": "viapt", "vapt": "vapt",
                                          "full-v2apt": "full-v2apt, VAE at the letter"}),
    ("results/struct/count/linear_shallow.csv", {"linear": "linear", "vpt-shallow": "vpt-shallow"}),   # 2026-12-02
    ("results/struct/count/davpt.csv", {"davpt": "davpt", "davpt+": "davpt+"}),   # 2026-12-02
    ("results/struct/count/seeds56.csv", {"vpt-deep": "vpt-deep", "linear": "linear"}),   # 2026-12-02, later
    ("results/struct/count/seeds78.csv", {"vpt-deep": "vpt-deep", "linear": "linear"}),   # 2026-12-02, evening
    ("results/struct/count/seeds5678.csv", {"vpt-shallow": "vpt-shallow", "v2apt": "v2apt"}),   # 2026-12-02, night
    ("results/struct/count/seeds910.csv", {"vpt-deep": "vpt-deep", "vpt-shallow": "vpt-shallow"}),   # 2026-12-02, late
    ("results/struct/count/v2apt_seeds910.csv", {"v2apt": "v2apt"}),   # 2026-12-03
    ("results/struct/count/seeds234.csv", {m: m for m in ("vapt", "viapt", "full-v2apt")}),   # 2026-12-03
    ("results/struct/count/full_v2apt_seeds01.csv", {"full-v2apt": "full-v2apt"}),   # 2026-12-03, later
    ("results/struct/count/full.csv", {"full": "full"}),   # 2026-12-03, later still
    ("results/struct/count/full_seeds510.csv", {m: m for m in ("full", "full-v2apt")}),   # 2026-12-06
    ("results/struct/position/results.csv", {"vpt-deep": "vpt-deep", "v2apt levers": "v2apt",
                                             "v2apt letter": "v2apt, the paper's letter",
                                             "v2apt levers, network lr x3": "v2apt, network lr x3"}),
    ("results/struct/position/seeds34.csv", {m: m for m in ("vpt-deep", "davpt", "davpt+")}),   # 2026-12-02, evening
    ("results/struct/position/davpt.csv", {m: m for m in ("davpt", "davpt+")}),   # 2026-12-02, evening
    ("results/struct/position/linear_shallow.csv", {m: m for m in ("linear", "vpt-shallow")}),   # 2026-12-06
    ("results/struct/position/viapt_vapt.csv", {m: m for m in ("viapt", "vapt")}),   # 2026-12-06, evening
    ("results/struct/position/full.csv", {m: m for m in ("full", "full-v2apt")}),   # 2026-12-06, evening
    ("results/struct/position/v2apt_seeds34.csv", {"v2apt": "v2apt"}),   # 2026-12-06, evening; default = levers
    # 2026-12-06, night: struct-orientation under the paired protocol (the whole test set), whole method blocks
    ("results/struct/orientation/vptdeep_linear.csv", {m: m for m in ("vpt-deep", "linear")}),
    ("results/struct/orientation/full_davptplus.csv", {m: m for m in ("full", "davpt+")}),
    ("results/struct/orientation/davpt.csv", {"davpt": "davpt"}),
    # 2026-12-07: VPT-Shallow and V²APT on struct-orientation, seeds 0-4
    ("results/struct/orientation/shallow_v2apt.csv", {m: m for m in ("vpt-shallow", "v2apt")}),
    # 2026-12-07: ViaPT and VAPT on struct-orientation, seeds 0-3, then (the grid resumed, one file) the full V²APT
    # at seeds 0-4 and seed 4 of ViaPT and VAPT
    ("results/struct/orientation/viapt_vapt_fullv2apt.csv", {m: m for m in ("viapt", "vapt", "full-v2apt")}),
    # 2026-12-07, evening: VPT-Deep and DA-VPT on struct-orientation, seeds 5-8 (DA-VPT's seed 6 never leaves chance)
    ("results/struct/orientation/vptdeep_davpt_seeds5-8.csv", {m: m for m in ("vpt-deep", "davpt")}),
    # 2026-12-07, evening: DA-VPT+ on struct-orientation, seeds 5-8 (paired with VPT-Deep's just above)
    ("results/struct/orientation/davptplus_seeds5-8.csv", {"davpt+": "davpt+"}),
    # 2026-12-02, evening: the 10-shot grid, every method
    ("results/issue17/cifar10_10shot.csv", {m: m for m in ("linear", "full", "vpt-shallow", "vpt-deep", "v2apt",
                                                             "viapt", "vapt", "davpt", "davpt+", "full-v2apt")}),
    # MNIST-1k on the whole 10,000-image test set (issue 17's protocol): VPT-Deep and V²APT at seeds 0-2 (2026-12-06,
    # mnist1k_fulltest.csv), the same grid resumed on 2026-12-07 with seeds 3-4 and the linear probe (one file, its
    # rows for seeds 0-2 those of mnist1k_fulltest.csv), and full fine-tuning beside it
    ("results/issue17/mnist1k_vptdeep_v2apt_linear.csv", {m: m for m in ("vpt-deep", "v2apt", "linear")}),
    ("results/issue17/mnist1k_full.csv", {"full": "full"}),
    # 2026-12-07, a later sitting: the other methods on MNIST-1k, one five-seed block per command (the same flags)
    ("results/issue17/mnist1k_full_v2apt.csv", {"full-v2apt": "full-v2apt"}),
    ("results/issue17/mnist1k_davptplus.csv", {"davpt+": "davpt+"}),
    ("results/issue17/mnist1k_viapt.csv", {"viapt": "viapt"}),
    ("results/issue17/mnist1k_vpt_shallow.csv", {"vpt-shallow": "vpt-shallow"}),
    ("results/issue17/mnist1k_davpt.csv", {"davpt": "davpt"}),   # after the two chains, one grid at 2 workers
    ("results/issue17/mnist1k_vapt.csv", {"vapt": "vapt"}),   # a third sitting of 2026-12-07, one grid at 2 workers
    # 2026-12-08: CIFAR-10-1k on its whole 10,000-image test set, every method at the rate validation chose for it:
    # the finals at a selected rate whose checkpoints are kept, scored again from them (python -m vapt_min.bench
    # rescore, which checks each against the 2,000-image score it recorded); a task of their own, VPT-Deep at 3e-3 its
    # reference
    *((f"results/issue17/cifar10_{name}_test10k.csv", {method: method}, {"cifar10-1k"}, WHOLE)
      for name, method in (("vptdeep_lr3e-3", "vpt-deep"), ("davpt_lr3e-3", "davpt"), ("linear_lr3e-4", "linear"),
                           ("fullv2apt_lr3e-3", "full-v2apt"))),
]


# the front table's tasks, in this order
TASKS = ["cifar10-1k", WHOLE, "mnist-1k", "cifar10-10shot", "struct-count-1k", "struct-position-1k",
         "struct-orientation-1k"]


def rows():
    out = []
    for path, names, *more in SOURCES:
        tasks, task_here = (more + [None, None])[:2]
        with open(ROOT / path, newline="") as f:
            for r in csv.DictReader(f):
                if r["label"] in names and (not tasks or r["task"] in tasks):
                    out.append({**r, "label": names[r["label"]], "seed": int(r["seed"]), "task": task_here or r["task"],
                                "lr": r.get("lr") or lr_from_command(r["command"]),
                                "test_acc": float(r["test_acc"]),
                                "best_val_test_acc": (float(r["best_val_test_acc"]) if r.get("best_val_test_acc")
                                                      else None)})
    return out


def signed(x: float, digits: int) -> str:
    """A signed figure with the typographic minus, to `digits` decimals; one that rounds to ±0 there gets one more, so
    that an interval ending at −0.02 does not read "−0.0" beside "resolved: yes" (nor +0.002 "+0.00" beside "no")."""
    return (f"{x:+.{digits}f}" if round(x, digits) or not x else f"{x:+.{digits + 1}f}").replace("-", "−")


def resolved(low: float, high: float) -> str:
    """The tables' "resolved" column: does the 95 % interval exclude 0?"""
    return "yes" if low > 0 or high < 0 else "no"


def readme_table(table) -> str:
    """The README's compact form: one line per task and method, the interval and whether it excludes 0."""
    num = lambda x: signed(x, 1)
    out = ["| task | method | seeds | test acc (%) | − VPT-Deep, paired [95 % CI] | MDE | resolved |",
           "|---|---|---|---|---|---|---|"]
    for r in table:
        if r["method"] == "vpt-deep":
            out.append(f"| {r['task']} | VPT-Deep | {r['n_seeds']} | {r['mean_acc']:.1f} | reference | | |")
        elif r["ci_low"] is not None:
            out.append(f"| {r['task']} | {r['method']} | {r['n_seeds']} | {r['mean_acc']:.1f} | {num(r['mean_diff'])} "
                       f"[{num(r['ci_low'])}, {num(r['ci_high'])}] | {r['mde']:.1f} | "
                       f"{resolved(r['ci_low'], r['ci_high'])} |")
    return "\n".join(out)


BAR = 1.5   # issue 17's bar: a 95 % half-width of at most 1.5 points against VPT-Deep
BAR_TASKS = ["cifar10-1k", "struct-count-1k", "struct-position-1k", "struct-orientation-1k"]   # where the issue asks it


def bar_table(table, runs, tasks=BAR_TASKS) -> list[dict]:
    """Where the ±1.5 bar stands: for every method at today's defaults (the ten of config.METHODS, not the diagnostic
    rows) on the tasks the issue asks the bar for, its half-width now, the seeds that would bring it within the bar at
    the spread its seeds show (evidence.seeds_for_half_width), the runs to add for it and for VPT-Deep (whose seeds
    every method pairs with), and their cost at the median single-thread wall time of that method's runs on that task
    on this project's CPU (run times move with the host by up to 1.5x between sittings: an estimate; where a method's
    file has no wall times, the median of every run on that task)."""
    wall = {}
    for r in runs:
        if r.get("wall_time_s"):
            wall.setdefault((r["task"], r["label"]), []).append(float(r["wall_time_s"]))
            wall.setdefault((r["task"], None), []).append(float(r["wall_time_s"]))
    sec = lambda task, label: statistics.median(wall.get((task, label)) or wall[(task, None)])
    out = []
    for task in tasks:
        mine = [r for r in table if r["task"] == task and r["method"] in METHODS and r["method"] != "vpt-deep"]
        ref = next(r for r in table if r["task"] == task and r["method"] == "vpt-deep")
        for r in mine:
            half = (r["ci_high"] - r["ci_low"]) / 2
            need = max(r["n_seeds"], seeds_for_half_width(r["sd_diff"], BAR))   # the seeds it has, when within
            out.append({"task": task, "method": r["method"], "n_seeds": r["n_seeds"], "half": half, "sd": r["sd_diff"],
                        "need": need, "add": need - r["n_seeds"],
                        "sec": sec(task, r["method"])})
        need = max(r["need"] for r in out if r["task"] == task)
        out.append({"task": task, "method": "vpt-deep", "n_seeds": ref["n_seeds"], "half": None, "sd": None,
                    "need": max(need, ref["n_seeds"]), "add": max(0, need - ref["n_seeds"]),
                    "sec": sec(task, "vpt-deep")})
    return out


def bar_markdown(bar) -> str:
    out = [f"| task | method | seeds | half-width | s_d | within ±{BAR} | seeds for ±{BAR} | runs to add | core h |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in bar:
        if r["method"] == "vpt-deep":
            name, half, sd, within = "VPT-Deep (the seeds the others pair with)", "—", "—", ""
        else:
            name, half, sd = r["method"], f"{r['half']:.2f}", f"{r['sd']:.2f}"
            within = "yes" if r["add"] == 0 else "no"
        out.append(f"| {r['task']} | {name} | {r['n_seeds']} | {half} | {sd} | {within} | {r['need']} | {r['add']} | "
                   f"{r['add'] * r['sec'] / 3600:.1f} |")
    out.append("")
    for task in dict.fromkeys(r["task"] for r in bar):
        rs = [r for r in bar if r["task"] == task]
        within = sum(r["add"] == 0 for r in rs if r["method"] != "vpt-deep")
        out.append(f"- {task}: {within} of {len(rs) - 1} methods within ±{BAR}; "
                   f"{sum(r['add'] for r in rs)} runs to add, about {sum(r['add'] * r['sec'] for r in rs) / 3600:.0f} "
                   "core h")
    return "\n".join(out)


def selections() -> dict:
    """Every committed choice of issue 17's learning-rate selection, (task, method) → the chosen rate, read from the
    selection.csv files under results/ (`--select-lr` writes one per grid; each method and task is chosen once: a
    second choice for it is refused, so that the table below cannot quietly take one of two)."""
    out = {}
    for path in sorted((ROOT / "results").rglob("*selection.csv")):
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["chosen"].strip() == "1":
                    if (r["task"], r["method"]) in out:
                        raise ValueError(f"{r['method']} on {r['task']} is chosen twice (again in {path}): keep one "
                                         "selection.csv per method and task")
                    out[(r["task"], r["method"])] = float(r["lr"])
    return out


def sci(lr: float) -> str:
    """A learning rate as the labels and tables write it: 0.003 → "3e-3"."""
    return f"{lr:.0e}".replace("e-0", "e-")


def at_rate(runs, task, method, lr) -> dict:
    """seed → test accuracy (%) of method's runs on task at learning rate lr: the rows labelled with the method itself
    (it ran at its default) or '<method>, lr <lr> (selected)' (the finals at a rate validation chose instead)."""
    names = (method, f"{method}, lr {sci(lr)} (selected)")
    return {r["seed"]: 100 * r["test_acc"] for r in runs
            if r["task"] == task and r["label"] in names and float(r["lr"]) == lr}


def selected_table(runs, chosen) -> list[dict]:
    """The protocol's comparison where it exists: on every task where VPT-Deep's rate was selected, each method at the
    rate validation chose for it against VPT-Deep at its own chosen rate, paired on the seeds both have. A method not
    yet selected, or whose finals at its chosen rate have not run, is a row that says so (no interval). "edge" names a
    choice at the top or the bottom of the method's grid (grid.LR_GRID, for VPT-Deep too): the best rate may lie
    beyond it, untested."""
    def edge(method, lr):
        grid = LR_GRID[method]
        return "top" if lr == max(grid) else "bottom" if lr == min(grid) else ""
    out = []
    for task in TASKS:
        if (task, "vpt-deep") not in chosen:
            continue
        ref_lr = chosen[(task, "vpt-deep")]
        ref = at_rate(runs, task, "vpt-deep", ref_lr)
        for method in (m for m in METHODS if m != "vpt-deep"):
            lr = chosen.get((task, method))
            mine = at_rate(runs, task, method, lr) if lr is not None else {}
            seeds = sorted(mine.keys() & ref.keys())
            p = paired_difference([mine[s] for s in seeds], [ref[s] for s in seeds]) if len(seeds) >= 2 else None
            out.append({"task": task, "method": method, "lr": lr, "ref_lr": ref_lr, "n": len(seeds), "p": p,
                        "edge": edge(method, lr) if lr is not None else "", "ref_edge": edge("vpt-deep", ref_lr)})
    return out


def selected_markdown(sel) -> str:
    num = lambda x: signed(x, 2)
    at = lambda lr, edge: sci(lr) + (f" ({edge} of its grid)" if edge else "")
    out = ["| task | method | its selected lr | VPT-Deep's | seeds "
           "| − VPT-Deep, both at their selected rates [95 % CI] | resolved |", "|---|---|---|---|---|---|---|"]
    for r in sel:
        lr = "not selected yet" if r["lr"] is None else at(r["lr"], r["edge"])
        head = f"| {r['task']} | {r['method']} | {lr} | {at(r['ref_lr'], r['ref_edge'])} | {r['n']} |"
        p = r["p"]
        if p is None:
            out.append(f"{head} {'—' if r['lr'] is None else 'finals at this rate not run yet'} | |")
        else:
            out.append(f"{head} {num(p['mean'])} [{num(p['ci_low'])}, {num(p['ci_high'])}] | "
                       f"{resolved(p['ci_low'], p['ci_high'])} |")
    return "\n".join(out)


def spent() -> str:
    """The compute behind the committed per-run CSVs: each training run's wall time (wall_time_s; every grid run ran at
    1 thread, so wall hours are CPU-core hours), counted once per command. Files without the column are named."""
    hours, runs, without = {}, {}, []
    seen = set()
    for path in sorted((ROOT / "results").rglob("*.csv")):
        with open(path, newline="") as f:
            table = list(csv.DictReader(f))
        if not table or "wall_time_s" not in table[0]:
            if table and "command" in table[0]:
                without.append(str(path.relative_to(ROOT)))
            continue
        name = str(path.relative_to(ROOT))
        for r in table:
            if r["command"] in seen or not r["wall_time_s"]:
                continue
            seen.add(r["command"])
            hours[name] = hours.get(name, 0.0) + float(r["wall_time_s"]) / 3600
            runs[name] = runs.get(name, 0) + 1
    lines = ["| per-run CSV | runs | hours (1 core each) |", "|---|---|---|"]
    lines += [f"| {n} | {runs[n]} | {hours[n]:.1f} |" for n in hours]
    lines.append(f"| all | {sum(runs.values())} | {sum(hours.values()):.1f} |")
    if without:
        lines.append(f"\nNo wall times in {', '.join(without)}.")
    return "\n".join(lines)


# where the two tables sit in the docs (tests/test_results_front.py reads them from here)
FRONT_START, FRONT_END = "<!-- front table: python results/front/make.py -->", "<!-- end front table -->"
COMPUTE_HEAD, COMPUTE_END = "| per-run CSV | runs | hours (1 core each) |", "\n\nLesson executions"
BAR_START, BAR_END = "<!-- bar table: python results/front/make.py -->", "<!-- end bar table -->"
SEL_START, SEL_END = "<!-- selected-rate table: python results/front/make.py -->", "<!-- end selected-rate table -->"


def write_docs(table, bar, sel):
    """Put the front table into the README (between its markers), the bar and selected-rate tables into RESULTS.md
    (between their markers) and the compute table into RESULTS.md (up to the paragraph that follows it), the places
    tests/test_results_front.py holds to this script's output."""
    def put(text, start, end, table):   # the table between a pair of markers, replacing what was there
        a, b = text.index(start) + len(start), text.index(end)
        return text[:a] + "\n" + table + "\n" + text[b:]
    readme = (ROOT / "README.md").read_text()
    (ROOT / "README.md").write_text(put(readme, FRONT_START, FRONT_END, readme_table(table)))
    results = (ROOT / "RESULTS.md").read_text()
    results = put(results, BAR_START, BAR_END, bar_markdown(bar))
    results = put(results, SEL_START, SEL_END, selected_markdown(sel))
    a, b = results.index(COMPUTE_HEAD), results.index(COMPUTE_END)
    (ROOT / "RESULTS.md").write_text(results[:a] + spent() + results[b:])


if __name__ == "__main__":
    runs = rows()
    table = paired_table(runs, TASKS)
    bar = bar_table(table, runs)
    write_paired_csv(Path(__file__).parent / "paired.csv", table)
    md = paired_markdown(table)
    (Path(__file__).parent / "paired.md").write_text(md + "\n")
    from vapt_min.plots import plot_forest   # matplotlib only here: the tests import this file for its tables
    plot_forest(table, TASKS).savefig(Path(__file__).parent / "paired_forest.png", dpi=110)
    sel = selected_table(runs, selections())
    write_docs(table, bar, sel)
    print(md, readme_table(table), bar_markdown(bar), selected_markdown(sel), spent(), sep="\n\n")
