"""The README's front table, results/front/paired.csv and .md, and RESULTS.md's bar and compute tables are regenerated
from the committed per-run CSVs by results/front/make.py: each must equal what that script computes now, so every
figure in them traces to rows that hold the command that made them (issue 17). Fails when a CSV is added or changed
and the tables were not regenerated, or when a table was edited by hand."""
import csv
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FRONT = REPO / "results" / "front"


def make():
    spec = importlib.util.spec_from_file_location("front_make", FRONT / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stated(p):
    """An interval as RESULTS.md's hand-written tables state it: two decimals, the typographic minus, bold when it
    excludes 0. p: mean, ci_low, ci_high (floats or paired.csv's strings)."""
    num = lambda x: f"{float(x):+.2f}".replace("-", "−")
    text = f"{num(p['mean'])} [{num(p['ci_low'])}, {num(p['ci_high'])}]"
    return f"**{text}**" if float(p["ci_low"]) > 0 or float(p["ci_high"]) < 0 else text


def between(text, start, end):
    a = text.index(start) + len(start)
    return text[a:text.index(end, a)].strip()


def test_front_table_paired_csv_bar_and_compute_tables_are_regenerated(tmp_path):
    m = make()
    runs = m.rows()
    table = m.paired_table(runs, m.TASKS)
    readme = (REPO / "README.md").read_text()
    assert between(readme, m.FRONT_START, m.FRONT_END) == m.readme_table(table)
    assert (FRONT / "paired.md").read_text().strip() == m.paired_markdown(table)
    m.write_paired_csv(tmp_path / "paired.csv", table)
    assert (FRONT / "paired.csv").read_text() == (tmp_path / "paired.csv").read_text()
    with open(FRONT / "paired.csv", newline="") as f:
        assert next(csv.reader(f)) == ["task", "method", "n_seeds", "lr", "mean_acc", "mean_diff", "ci_low", "ci_high"]
    results = (REPO / "RESULTS.md").read_text()
    assert between(results, m.BAR_START, m.BAR_END) == m.bar_markdown(m.bar_table(table, runs))
    assert between(results, m.SEL_START, m.SEL_END) == m.selected_markdown(m.selected_table(runs, m.selections()))
    compute = results[results.index(m.COMPUTE_HEAD):]
    assert compute.startswith(m.spent().split("\n\n")[0])


def test_results_md_cifar_table_is_the_front_tables_rows():
    """RESULTS.md's CIFAR-10-1k table is paired.md's CIFAR-10-1k rows without the best-validation columns."""
    md = [l for l in (FRONT / "paired.md").read_text().splitlines() if l.startswith("| cifar10-1k |")]
    want = ["|".join(l.split("|")[:8]) + "|" for l in md]
    results = (REPO / "RESULTS.md").read_text()
    section = results[results.index("## CIFAR-10-1k: more methods paired with VPT-Deep"):]
    got = re.findall(r"^\| cifar10-1k \|.*$", section.split("\n## ")[0], flags=re.M)
    assert got == want


def test_results_md_mnist_table_states_the_front_tables_intervals():
    """MNIST-1k under the paired protocol (issue 17): every method run there has five paired seeds in paired.csv, and
    RESULTS.md's MNIST table states each one's interval as paired.csv has it (two decimals, bold when resolved)."""
    with open(FRONT / "paired.csv", newline="") as f:
        mnist = [r for r in csv.DictReader(f) if r["task"] == "mnist-1k" and r["method"] != "vpt-deep"]
    results = (REPO / "RESULTS.md").read_text()
    section = results[results.index("## MNIST-1k under the paired protocol"):].split("\n## ")[0]
    table = [l for l in section.splitlines() if l.startswith("| ")]

    assert mnist
    for r in mnist:
        assert r["n_seeds"] == "5", r["method"]
        ci = stated({**r, "mean": r["mean_diff"]})
        assert sum(f"| {ci} |" in l for l in table) == 1, (r["method"], ci)
    assert len(table) == len(mnist) + 2   # and the header and VPT-Deep's row: no row without its method in paired.csv


def test_bar_table_counts_the_seeds_and_runs_each_method_and_vpt_deep_still_need():
    """On hand-made rows: a method that moves with VPT-Deep is within the bar at its seeds and needs nothing; one
    whose differences spread by s_d needs evidence.seeds_for_half_width(s_d, 1.5) seeds, and VPT-Deep as many (every
    method pairs with VPT-Deep's seeds); the cost is the runs to add times the median wall time."""
    from vapt_min.evidence import seeds_for_half_width
    m = make()
    ref = [80.0, 86.0, 83.0, 77.0, 85.0]
    steady = [a + 0.5 + 0.1 * i for i, a in enumerate(ref)]          # moves with VPT-Deep: s_d 0.16
    loose = [83.0, 82.5, 84.0, 83.5, 82.0]                              # does not: s_d is VPT-Deep's own spread
    runs = [{"label": label, "task": "t", "seed": s, "test_acc": acc / 100, "lr": 1e-3, "best_val_test_acc": None,
             "wall_time_s": str(w)}
            for label, accs, w in (("vpt-deep", ref, 600), ("davpt", steady, 700), ("viapt", loose, 900))
            for s, acc in enumerate(accs)]
    bar = {r["method"]: r for r in m.bar_table(m.paired_table(runs, ["t"]), runs, tasks=["t"])}
    sd = float(np.std(np.subtract(loose, ref), ddof=1))
    need = seeds_for_half_width(sd, 1.5)
    assert need > 5
    assert (bar["davpt"]["need"], bar["davpt"]["add"]) == (5, 0) and bar["davpt"]["half"] <= 1.5
    assert (bar["viapt"]["need"], bar["viapt"]["add"]) == (need, need - 5)
    assert bar["viapt"]["sd"] == pytest.approx(sd) and bar["viapt"]["half"] > 1.5
    assert (bar["vpt-deep"]["need"], bar["vpt-deep"]["add"]) == (need, need - 5)
    md = m.bar_markdown(list(bar.values()))
    assert f"| t | viapt | 5 | {bar['viapt']['half']:.2f} | {sd:.2f} | no | {need} | {need - 5} | " \
           f"{(need - 5) * 900 / 3600:.1f} |" in md
    assert f"- t: 1 of 2 methods within ±1.5; {2 * (need - 5)} runs to add, about " \
           f"{(need - 5) * (900 + 600) / 3600:.0f} core h" in md


def test_results_md_cifar_methods_against_vpt_deep_at_its_selected_lr_are_the_committed_runs():
    """RESULTS.md's table of every CIFAR-10-1k method against VPT-Deep at the learning rate validation chose for it
    (3e-3) and at the default (1e-3), on the seeds both have: recomputed here from the front table's per-run rows."""
    from vapt_min.evidence import paired_difference
    m = make()
    acc = {}
    for r in m.rows():
        if r["task"] == "cifar10-1k":
            acc.setdefault(r["label"], {})[r["seed"]] = 100 * r["test_acc"]
    names = {"davpt+": "DA-VPT+", "full-v2apt": "full V²APT", "davpt": "DA-VPT", "v2apt": "V²APT", "viapt": "ViaPT",
             "full": "full fine-tuning", "vapt": "VAPT", "vpt-shallow": "VPT-Shallow", "linear": "linear probe"}
    results = (REPO / "RESULTS.md").read_text()
    section = results[results.index("**What that does to the small differences.**"):].split("\n## ")[0]
    first = section[section.index("\n|"):].split("\n\n")[0]          # the first table after that line
    table = [l for l in first.splitlines() if l.startswith("| ")]

    def cell(a, b):
        return stated(paired_difference(a, b))
    selected = acc["vpt-deep, lr 3e-3 (selected)"]
    for label, name in names.items():
        seeds = sorted(acc[label].keys() & selected.keys())
        mine = [acc[label][s] for s in seeds]
        want = (f"| {name} | {len(seeds)} | {cell(mine, [selected[s] for s in seeds])} | "
                f"{cell(mine, [acc['vpt-deep'][s] for s in seeds])} |")
        assert want in table, want
    assert len(table) == len(names) + 1   # and the header: no row this test does not check


SELECTIONS = sorted(REPO.glob("results/**/*selection.csv"))


@pytest.mark.parametrize("path", SELECTIONS, ids=lambda p: p.stem)
def test_committed_learning_rate_selections_match_their_runs_and_never_scored_test(path):
    """Every committed selection.csv (issue 17's per-method learning rate): each mean is its runs' mean last-epoch
    validation accuracy, the chosen rate is the best mean (one per method and task), the runs built no test split and
    used seeds no final run uses, and RESULTS.md states each chosen mean in bold. Recomputed here from the *_runs.csv
    beside it, not through vapt_min.selection, so that a wrong rule there would show."""
    runs = list(csv.DictReader(open(path.with_name(path.stem + "_runs.csv"), newline="")))
    table = list(csv.DictReader(open(path, newline="")))
    assert runs and table
    for r in runs:
        assert "--no-eval-test" in r["command"] and f"--n-val {r['n_val']}" in r["command"], r["command"]
        assert f"--lr {r['lr']}" in r["command"] and f"--seed {r['seed']}" in r["command"]
        assert int(r["seed"]) >= 100                      # the finals use seeds 0-10: a selection seed never
    results = (REPO / "RESULTS.md").read_text()
    groups = {}
    for t in table:
        groups.setdefault((t["task"], t["method"]), []).append(t)
    for (task, method), rows in groups.items():
        means = {}
        for t in rows:
            these = [r for r in runs if (r["task"], r["label"], float(r["lr"])) == (task, method, float(t["lr"]))]
            mine = [float(r["last_val_acc"]) for r in these]
            assert len(mine) == int(t["n_seeds"]) >= 2, (method, t["lr"])
            assert int(t["val_images"]) == sum(int(r["n_val"]) for r in these)
            assert float(t["mean_last_val_acc"]) == pytest.approx(100 * np.mean(mine), abs=0.006)
            means[float(t["lr"])] = 100 * np.mean(mine)
        chosen = [float(t["lr"]) for t in rows if t["chosen"].strip() == "1"]
        assert chosen == [max(means, key=means.get)], (task, method, chosen, means)
        best = next(t for t in rows if t["chosen"].strip() == "1")["mean_last_val_acc"]
        assert f"**{best}**" in results or f"**{float(best):.1f}**" in results, (method, best)   # bold: the chosen


def test_selected_rate_table_pairs_each_method_at_its_chosen_rate_with_vpt_deep_at_its_own(tmp_path, monkeypatch):
    """Hand-made rows: a method whose chosen rate is not its default pairs through its '(selected)' rows, one at its
    default through its own; a variant label at the same rate is not taken; a choice without finals and a method not
    selected say so; a choice at the top of the method's learning-rate grid says so; a task without VPT-Deep's choice
    has no rows; a method chosen twice is refused."""
    from vapt_min.evidence import paired_difference
    m = make()
    acc = {("vpt-deep", 1e-3): [80.0, 81.0, 79.0], ("vpt-deep, lr 3e-3 (selected)", 3e-3): [82.0, 81.5, 80.0],
           ("davpt", 1e-3): [81.0, 81.0, 81.0], ("davpt, lr 3e-3 (selected)", 3e-3): [83.0, 81.0],
           ("davpt, a variant", 3e-3): [99.0, 99.0, 99.0], ("viapt", 1e-3): [70.0, 72.0, 71.0]}
    runs = [{"task": "cifar10-1k", "label": label, "lr": str(lr), "seed": s, "test_acc": a / 100}
            for (label, lr), accs in acc.items() for s, a in enumerate(accs)]
    runs.append({"task": "struct-count-1k", "label": "davpt", "lr": "0.001", "seed": 0, "test_acc": 0.5})
    chosen = {("cifar10-1k", "vpt-deep"): 3e-3, ("cifar10-1k", "davpt"): 3e-3, ("cifar10-1k", "viapt"): 1e-3,
              ("cifar10-1k", "vapt"): 1e-3, ("struct-count-1k", "davpt"): 1e-3}
    sel = {r["method"]: r for r in m.selected_table(runs, chosen)}
    assert {r["task"] for r in m.selected_table(runs, chosen)} == {"cifar10-1k"}
    assert len(sel) == 9 and "vpt-deep" not in sel
    want = paired_difference([83.0, 81.0], [82.0, 81.5])
    assert sel["davpt"]["n"] == 2 and sel["davpt"]["p"] == pytest.approx(want)
    assert sel["viapt"]["p"] == pytest.approx(paired_difference([70.0, 72.0, 71.0], [82.0, 81.5, 80.0]))
    assert sel["vapt"]["p"] is None and sel["linear"]["lr"] is None
    md = m.selected_markdown(list(sel.values()))
    top = "3e-3 (top of its grid)"     # grid.LR_GRID's largest for both: a better rate may lie beyond, untested
    assert f"| cifar10-1k | davpt | {top} | {top} | 2 | {stated(want)} | no |" in md      # not resolved: not bold
    assert f"| cifar10-1k | vapt | 1e-3 (top of its grid) | {top} | 0 | finals at this rate not run yet | |" in md
    assert f"| cifar10-1k | linear | not selected yet | {top} | 0 | — | |" in md
    line = next(l for l in md.splitlines() if l.startswith("| cifar10-1k | viapt |"))
    assert line.startswith(f"| cifar10-1k | viapt | 1e-3 | {top} | 3 | −10.17 [") and line.endswith("] | yes |")
    for name in ("a", "b"):
        (tmp_path / "results" / name).mkdir(parents=True)
        (tmp_path / "results" / name / "selection.csv").write_text(
            "task,method,lr,n_seeds,val_images,mean_last_val_acc,chosen\r\ncifar10-1k,davpt,0.003,2,2000,82.60,1\r\n")
    monkeypatch.setattr(m, "ROOT", tmp_path)
    with pytest.raises(ValueError, match="chosen twice"):
        m.selections()
