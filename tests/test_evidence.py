"""The paired evidence against scipy.stats and a simulation: the t interval, the power and the minimum detectable
effect; the grid's paired table, paired.csv, the forest plot and the learning-rate choice, on rows made by hand
(no training: the grid's runs are tested in test_bench.py)."""
import csv
import math

import matplotlib
import numpy as np
import pytest
from scipy import stats

from vapt_min import evidence as E
from vapt_min import grid as G
from vapt_min import selection as S
from vapt_min.bench import main
from vapt_min.build import base_lr
from vapt_min.config import METHODS, Config

matplotlib.use("Agg")


@pytest.mark.parametrize("n, level", [(2, 0.95), (3, 0.95), (5, 0.95), (12, 0.9)])
def test_paired_interval_is_scipys_ttest_rel(n, level):
    rng = np.random.default_rng(n)
    a, b = rng.normal(80, 3, n), rng.normal(79, 3, n)
    p = E.paired_difference(a, b, level)
    ref = stats.ttest_rel(a, b).confidence_interval(level)
    assert p["n"] == n
    np.testing.assert_allclose([p["mean"], p["ci_low"], p["ci_high"]], [np.mean(a - b), ref.low, ref.high], rtol=1e-12)
    np.testing.assert_allclose(p["sd"], np.std(a - b, ddof=1), rtol=1e-12)


def test_paired_interval_refuses_what_it_cannot_pair():
    with pytest.raises(ValueError, match="at least 2 paired seeds"):
        E.paired_difference([1.0], [2.0])
    with pytest.raises(ValueError, match="same length"):
        E.paired_difference([1.0, 2.0], [2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="level"):
        E.paired_difference([1.0, 2.0], [2.0, 3.0], level=95)


def scipy_power(delta, n, sd, alpha=0.05):
    """The paired t-test's power written out independently: both tails of scipy's noncentral t, the cdf form."""
    df, crit, nc = n - 1, stats.t.ppf(1 - alpha / 2, n - 1), delta * math.sqrt(n) / sd
    return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)


@pytest.mark.parametrize("n, sd", [(3, 1.5), (5, 1.0), (5, 2.7), (8, 0.8), (20, 3.0)])
def test_power_at_the_mde_is_80_percent_by_scipys_noncentral_t(n, sd):
    mde = E.min_detectable_effect(n, sd)
    assert scipy_power(mde, n, sd) == pytest.approx(0.80, abs=1e-9)
    assert scipy_power(0.97 * mde, n, sd) < 0.80 < scipy_power(1.03 * mde, n, sd)   # the smallest such effect
    assert E.paired_power(0.0, n, sd) == pytest.approx(0.05, abs=1e-12)               # no effect: the test's level
    # exact, not the shortcut (t_0.975 + t_0.80)·sd/√n, which undershoots at few seeds and is close at many
    shortcut = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.80, n - 1)) * sd / math.sqrt(n)
    assert mde > shortcut if n <= 8 else mde == pytest.approx(shortcut, rel=0.01)


def test_power_at_the_mde_is_80_percent_in_simulated_experiments():
    """An independent check: draw 40,000 five-seed experiments whose true difference is the MDE and count how often
    scipy's paired t-test rejects at 5 %. The standard error of that rate is 0.2 points; allow 5 of them."""
    n, sd = 5, 1.3
    mde = E.min_detectable_effect(n, sd)
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, size=(40_000, n))
    rejected = stats.ttest_1samp(d, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.80, abs=0.01)


def test_mde_scales_with_the_spread_and_refuses_bad_input():
    assert E.min_detectable_effect(5, 2.0) == pytest.approx(2 * E.min_detectable_effect(5, 1.0), rel=1e-9)
    assert E.min_detectable_effect(5, 0.0) == 0.0
    assert E.min_detectable_effect(10, 1.0) < E.min_detectable_effect(5, 1.0) < E.min_detectable_effect(3, 1.0)
    # the far tail where scipy's noncentral cdf returns NaN (df 1, λ ≈ 8-11): the power is still a number
    assert 0.05 < E.paired_power(8.0, 2, 1.0) < 1 and E.min_detectable_effect(2, 1.0) > 0
    for bad in (dict(n=1, sd=1.0), dict(n=5, sd=-1.0), dict(n=5, sd=1.0, power=0.01), dict(n=5, sd=1.0, alpha=1.5)):
        with pytest.raises(ValueError):
            E.min_detectable_effect(**bad)


@pytest.mark.parametrize("sd, target, level", [(3.41, 1.5, 0.95), (0.4, 1.5, 0.95), (9.26, 1.5, 0.95), (2.0, 0.5, 0.9),
                                               (1.0, 1.5, 0.95)])
def test_seeds_for_half_width_is_the_first_n_whose_scipy_interval_is_that_narrow(sd, target, level):
    n = E.seeds_for_half_width(sd, target, level)
    # scipy's own interval on differences with exactly this sd: n seeds are narrow enough, n - 1 are not
    def scipy_half(k):
        d = np.linspace(-1, 1, k)
        d = d / d.std(ddof=1) * sd                       # k differences whose sample sd is sd
        ci = stats.ttest_1samp(d, 0.0).confidence_interval(level)
        return (ci.high - ci.low) / 2
    assert scipy_half(n) <= target + 1e-12
    assert n == 2 or scipy_half(n - 1) > target


def test_seeds_for_half_width_grows_with_the_spread_and_refuses_bad_input():
    assert E.seeds_for_half_width(0.0, 1.5) == 2
    assert E.seeds_for_half_width(1.0, 1.5) < E.seeds_for_half_width(2.0, 1.5) < E.seeds_for_half_width(4.0, 1.5)
    assert E.seeds_for_half_width(2.0, 1.5) > E.seeds_for_half_width(2.0, 1.5, level=0.8)
    for bad in (dict(sd=-1.0, half_width=1.5), dict(sd=float("nan"), half_width=1.5), dict(sd=1.0, half_width=0.0),
                dict(sd=1.0, half_width=1.5, level=1.0), dict(sd=1e6, half_width=1e-3, n_max=1000)):
        with pytest.raises(ValueError):
            E.seeds_for_half_width(**bad)


# ------------------------------------------------------------------------------------------- the grid's paired table
def rows_of(accs: dict, lr=1e-3, best=None) -> list[dict]:
    """results.csv-like rows: accs maps (label, task) → test accuracy per seed (fractions), seeds 0, 1, ..."""
    out = []
    for (label, task), values in accs.items():
        for seed, acc in enumerate(values):
            if acc is not None:
                out.append({"label": label, "task": task, "seed": seed, "test_acc": acc, "lr": lr,
                            "best_val_test_acc": None if best is None else acc + best})
    return out


def test_paired_table_pairs_on_seeds_and_matches_ttest_rel():
    deep, v2 = [0.80, 0.82, 0.79, 0.81, 0.83], [0.81, 0.80, 0.80, 0.84, None]   # v2apt lacks seed 4
    rows = rows_of({("vpt-deep", "a"): deep, ("v2apt", "a"): v2, ("linear", "a"): [0.6, None, None, None, None],
                    ("v2apt", "b"): [0.5, 0.6]})                               # task b has no VPT-Deep: no rows
    table = E.paired_table(rows)
    assert [(r["task"], r["method"], r["n_seeds"]) for r in table] == [("a", "vpt-deep", 5), ("a", "v2apt", 4),
                                                                      ("a", "linear", 1)]
    ref, v, lin = table
    assert (ref["mean_diff"], ref["ci_low"], ref["ci_high"], ref["mde"]) == (0.0, 0.0, 0.0, None)
    a, b = 100 * np.array(v2[:4]), 100 * np.array(deep[:4])
    ci = stats.ttest_rel(a, b).confidence_interval()
    np.testing.assert_allclose([v["mean_acc"], v["mean_diff"], v["ci_low"], v["ci_high"]],
                               [a.mean(), (a - b).mean(), ci.low, ci.high], rtol=1e-12)
    assert v["mde"] == pytest.approx(E.min_detectable_effect(4, np.std(a - b, ddof=1)))
    assert v["lr"] == "0.001" and v["best_acc"] is None                         # no best-val column in these rows
    assert lin["mean_diff"] == pytest.approx(-20.0) and lin["ci_low"] is None and lin["mde"] is None  # one seed


def test_paired_table_best_validation_column_and_bad_rows():
    rows = rows_of({("vpt-deep", "a"): [0.8, 0.7, 0.9], ("vapt", "a"): [0.7, 0.7, 0.8]}, best=0.01)
    ref, v = E.paired_table(rows)
    assert v["best_acc"] == pytest.approx(v["mean_acc"] + 1) and v["best_diff"] == pytest.approx(v["mean_diff"])
    assert (ref["best_diff"], ref["best_ci_low"]) == (0.0, 0.0)
    rows[-1]["lr"] = 3e-4
    with pytest.raises(ValueError, match="several learning rates"):
        E.paired_table(rows)
    with pytest.raises(ValueError, match="two results"):
        E.paired_table(rows_of({("vpt-deep", "a"): [0.8, 0.7]}) * 2)


def test_paired_csv_has_exactly_the_columns_and_the_forest_plot_its_panels(tmp_path):
    from vapt_min.plots import plot_forest
    rows = rows_of({("vpt-deep", "a"): [0.8, 0.7, 0.9], ("vapt", "a"): [0.7, 0.7, 0.8],
                    ("vpt-deep", "b"): [0.5, 0.6, 0.55], ("vapt", "b"): [0.6, 0.7, 0.6], ("linear", "b"): [0.4]})
    table = E.paired_table(rows)
    E.write_paired_csv(tmp_path / "paired.csv", table)
    with open(tmp_path / "paired.csv", newline="") as f:
        got = list(csv.reader(f))
    assert got[0] == ["task", "method", "n_seeds", "lr", "mean_acc", "mean_diff", "ci_low", "ci_high"]
    assert got[1] == ["a", "vpt-deep", "3", "0.001", "80.0000", "0.0000", "0.0000", "0.0000"]
    assert got[-1][:4] == ["b", "linear", "1", "0.001"] and got[-1][6:] == ["", ""]   # one seed: no interval
    fig = plot_forest(table, ["a", "b"])
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["a", "b"]
    assert all(ax.get_xlabel() == "test accuracy − vpt-deep (points)" for ax in axes) and axes[0].get_ylabel()
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["vapt", "linear"]
    for ax in axes:   # the zero line: a vertical line at x = 0
        assert any(list(l.get_xdata()) == [0, 0] for l in ax.get_lines())
    vapt_a = next(r for r in table if r["task"] == "a" and r["method"] == "vapt")
    bars = axes[0].collections[0].get_segments()[0]                       # the interval drawn = the one computed
    np.testing.assert_allclose(bars[:, 0], [vapt_a["ci_low"], vapt_a["ci_high"]])


def test_forest_plot_wraps_at_three_panels_a_row_without_empty_panels():
    """Six tasks in one row were 27 inches wide: the panels wrap at three a row, every panel on the same method axis,
    the method names on the first panel of each row, no empty panel where the last row is short."""
    from vapt_min.plots import plot_forest
    tasks = ["a", "b", "c", "d"]
    rows = rows_of({(m, t): v for t in tasks for m, v in (("vpt-deep", [0.8, 0.7, 0.9]), ("vapt", [0.7, 0.7, 0.8]),
                                                         ("linear", [0.5, 0.4, 0.6]))})
    fig = plot_forest(E.paired_table(rows), tasks)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == tasks                   # four panels, none empty, in the task order
    rows_of_axes = [ax.get_subplotspec().rowspan.start for ax in axes]
    assert rows_of_axes == [0, 0, 0, 1]
    assert all(ax.get_ylim() == axes[0].get_ylim() for ax in axes)   # one method axis for every panel
    assert [t.get_text() for t in axes[3].get_yticklabels() if t.get_visible()] == ["vapt", "linear"]
    assert axes[3].yaxis.get_tick_params()["labelleft"] and axes[3].get_ylabel()
    assert not axes[1].yaxis.get_tick_params()["labelleft"]          # inner panels: no repeated names


def test_report_writes_paired_csv_and_the_mde_from_an_old_results_csv(tmp_path, capsys):
    """`bench accuracy --report` on a results.csv from before the lr and best-validation columns: lr read from each
    run's command, paired.csv, the forest plot and the MDE in results.md."""
    out = tmp_path / "res"
    out.mkdir()
    fields = ["label", "task", "seed", "test_acc", "best_val_acc", "trainable_params", "trainable_pct", "command"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for label, accs, opts in (("vpt-deep", [0.80, 0.78, 0.83], "--method vpt-deep"),
                                  ("full", [0.82, 0.79, 0.86], "--method full"),
                                  ("vapt", [0.70, 0.72, 0.74], "--method vapt --lr 3e-4")):
            for s, acc in enumerate(accs):
                w.writerow({"label": label, "task": "cifar10-1k", "seed": s, "test_acc": acc, "best_val_acc": acc,
                            "trainable_params": 1, "trainable_pct": 0.1, "command": f"OMP_NUM_THREADS=1 python -m "
                            f"vapt_min.train --preset cpu {opts} --seed {s} --out runs/x"})
    main(["accuracy", "--report", "--out", str(out), "--tasks", "cifar10-1k"])
    with open(out / "paired.csv", newline="") as f:
        got = {r["method"]: r for r in csv.DictReader(f)}
    assert list(next(iter(got.values()))) == E.PAIRED_CSV
    assert {m: r["lr"] for m, r in got.items()} == {"vpt-deep": "0.001", "full": "0.0001", "vapt": "0.0003"}
    assert float(got["full"]["mean_diff"]) == pytest.approx(2.0) and float(got["vapt"]["ci_high"]) < 0
    md = (out / "results.md").read_text()
    assert "MDE (80 % power)" in md and "| cifar10-1k | vapt | 3 | 0.0003 | 72.00 | -8.33 [" in md
    assert (out / "paired_forest.png").stat().st_size > 10_000
    assert "Paired against vpt-deep" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- the learning-rate selection
def test_lr_grid_is_three_log_spaced_values_around_each_default():
    for m in METHODS:
        lrs = G.LR_GRID[m]
        assert len(lrs) == 3 and base_lr(Config(method=m)) in lrs, m
        assert all(2.9 < b / a < 3.5 for a, b in zip(lrs, lrs[1:])), m   # ×3 or ×3.3: a log scale


def test_choose_lr_takes_the_best_mean_and_ties_go_to_the_smaller():
    assert S.choose_lr({3e-4: 0.80, 1e-3: 0.82, 3e-3: 0.81}) == 1e-3
    assert S.choose_lr({3e-4: 0.82, 1e-3: 0.82, 3e-3: 0.80}) == 3e-4
    assert S.choose_lr({3e-3: 0.5, 1e-3: 0.5}) == 1e-3


def test_entry_lrs_and_the_lr_of_a_command():
    assert G.entry_lrs("vapt", ["--method", "vapt"]) == (1e-4, 3e-4, 1e-3)
    assert G.entry_lrs("mine", ["--method", "vapt", "--lr=5e-4"]) == (5e-4,)       # its own lr: nothing to select
    assert G.entry_lrs("deep", []) == G.LR_GRID["vpt-deep"]
    with pytest.raises(ValueError, match="give it its own --lr"):
        G.entry_lrs("sgd", ["--method", "vpt-deep", "--optimizer", "sgd"])
    with pytest.raises(ValueError, match="unknown --method 'vpt-huge'"):
        G.entry_lrs("typo", ["--method", "vpt-huge"])
    assert G.lr_from_command("python -m vapt_min.train --method full --seed 0") == 1e-4
    assert G.lr_from_command("python -m vapt_min.train --optimizer sgd --lr 0.05 --lr 0.01") == 0.01


def test_select_options_need_select_lr_and_a_fixed_lr_is_refused(tmp_path, capsys):
    base = ["accuracy", "--tasks", "cifar10-1k", "--out", str(tmp_path / "r"), "--runs", str(tmp_path / "x"),
            "--dry-run"]
    for extra, message in ((["--select-on", "mnist-1k"], "add --select-lr"), (["--select-only"], "add --select-lr"),
                           (["--select-lr", "--extra", "--lr 1e-3"], "drop --lr"),
                           (["--select-lr", "--select-n-val", "0"], "--select-n-val must be >= 1"),
                           (["--select-lr", "--entry", "s: --optimizer sgd"], "give it its own --lr")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_select_lr_dry_run_lists_selection_then_five_paired_seeds(tmp_path, capsys):
    main(["accuracy", "--select-lr", "--methods", "vpt-deep", "vapt", "--tasks", "cifar10-1k", "mnist-1k",
          "--select-on", "cifar10-1k", "--out", str(tmp_path / "r"), "--runs", str(tmp_path / "x"), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("learning-rate selection: 12 runs | seeds 100, 101 | 1000 validation images each, "
                               "no test split")
    assert lines[1:13] == [f"  select {m} | cifar10-1k | lr {lr:g} | seed {s}" for s in (100, 101)
                           for m in ("vpt-deep", "vapt") for lr in G.LR_GRID[m]]
    assert lines[13].startswith("accuracy grid: 2 entries, 2 tasks, seeds 0, 1, 2, 3, 4: 20 runs")


def test_select_only_lists_and_runs_the_selection_and_no_finals(tmp_path, capsys, monkeypatch):
    main(["accuracy", "--select-lr", "--select-only", "--methods", "vpt-deep", "--tasks", "cifar10-1k", "--out",
          str(tmp_path / "r"), "--runs", str(tmp_path / "x"), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("learning-rate selection: 6 runs") and len(lines) == 7      # the 6 runs, no finals
    assert not any("accuracy grid" in l for l in lines)
    # without --dry-run: the selection's choice comes back and no final run starts (no results.csv, no run folder)
    chosen = {("vpt-deep", "cifar10-1k"): 3e-4}
    monkeypatch.setattr(G, "select_lr", lambda *a, **k: chosen)
    monkeypatch.setattr(G, "run_all", lambda *a, **k: pytest.fail("--select-only started a final run"))
    assert G.accuracy({"vpt-deep": ["--method", "vpt-deep"]}, {"cifar10-1k": G.TASKS["cifar10-1k"]}, (0, 1),
                      out=tmp_path / "r", runs=tmp_path / "x", select=S.Selection(no_finals=True)) == []
    assert "no finals run" in capsys.readouterr().out
    assert not (tmp_path / "r" / "results.csv").exists() and not (tmp_path / "x").exists()
