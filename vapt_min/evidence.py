"""Paired evidence: by how much a method differs from VPT-Deep, how sure we are, and what the grid could have seen.

Every method of the grid runs on the same seeds as VPT-Deep, and a seed fixes the split and the batch order for
every method (build.py: one seeded permutation draws the split, one seeded generator orders the batches), so the
per-seed difference d_s = acc(method, s) − acc(VPT-Deep, s) cancels what a seed does to both. Over n seeds:

    d̄ = (1/n) Σ_s d_s,   s_d² = Σ_s (d_s − d̄)² / (n − 1)           the mean paired difference and its spread
    d̄ ± t_{0.975, n−1} · s_d / √n                                  its t-based 95 % confidence interval
    power(δ) = P(|T| > t_{0.975, n−1}), T ~ t'_{n−1}(λ = δ √n / s_d)    the paired t-test's power (two-sided) at δ
    MDE = the δ > 0 at which power(δ) = 0.80                        the minimum detectable effect

The noncentral t is used exactly (scipy.stats.nct, both tails) and the MDE is solved for numerically (Brent's method);
the common shortcut (t_{0.975} + t_{0.80}) · s_d / √n underestimates it at few seeds. The MDE here is taken at the
observed s_d: what this many seeds could resolve if the seed-to-seed spread were what they showed. It says what the
experiment can see, not how good the method is.

`paired_table` turns the grid's per-run rows (grid.py's results.csv) into one row per task and method: PAIRED_CSV's
columns, in percentage points, plus the spread, the MDE and the same comparison at the best-validation epoch.
"""
from __future__ import annotations

import csv
import math

import numpy as np
from scipy import optimize, stats

REFERENCE = "vpt-deep"
PAIRED_CSV = ["task", "method", "n_seeds", "lr", "mean_acc", "mean_diff", "ci_low", "ci_high"]


def paired_difference(a, b, level: float = 0.95) -> dict:
    """a − b seed by seed (a[s] and b[s] from the same seed) → n, mean, sd of the differences and the t interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired values need two 1-d sequences of the same length, got shapes {a.shape} and "
                         f"{b.shape}: pass one value per seed for each method, in the same seed order")
    if len(a) < 2:
        raise ValueError(f"a confidence interval needs at least 2 paired seeds, got {len(a)}: run more seeds")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level} (0.95 for a 95 % interval)")
    d = a - b
    n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def paired_power(delta: float, n: int, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level alpha, n pairs, true mean difference delta, difference SD sd."""
    if n < 2 or not sd > 0:
        raise ValueError(f"power needs n >= 2 pairs and sd > 0, got n = {n}, sd = {sd}")
    df, crit = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))
    nc = delta * math.sqrt(n) / sd                                  # the noncentrality λ
    # P(T > t) + P(T < −t); the lower tail as P(−T > t), −T ~ t'(−λ): scipy's cdf turns NaN out there, its sf does not
    power = float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))
    if not math.isfinite(power):
        raise ValueError(f"the noncentral t gave no power at n = {n}, delta = {delta}, sd = {sd}")
    return power


def min_detectable_effect(n: int, sd: float, alpha: float = 0.05, power: float = 0.80) -> float:
    """The smallest true paired difference the two-sided paired t-test detects with this power (same units as sd)."""
    if n < 2:
        raise ValueError(f"the minimum detectable effect needs at least 2 paired seeds, got {n}: run more seeds")
    if not (0 < alpha < 1 and alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha = {alpha}, power = {power}")
    if sd < 0 or not math.isfinite(sd):
        raise ValueError(f"sd must be a finite number >= 0, got {sd}")
    if sd == 0:
        return 0.0                                                  # identical differences on every seed
    # in units of sd: power rises monotonically from alpha at 0; bracket the root, then solve
    f = lambda e: paired_power(e, n, 1.0, alpha) - power
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
    return sd * float(optimize.brentq(f, 0.0, hi, xtol=1e-12))


def seeds_for_half_width(sd: float, half_width: float, level: float = 0.95, n_max: int = 100_000) -> int:
    """The fewest paired seeds n (>= 2) whose t interval has a half-width of at most half_width when the differences
    spread by sd: the smallest n with t_{(1+level)/2, n−1} · sd / √n <= half_width. A planning figure (issue 17's
    "add seeds until it holds"): it takes the observed sd for the true one, and an sd from five seeds is itself
    uncertain by about a third, so the seeds it names are where to look next, not a promise."""
    if sd < 0 or not math.isfinite(sd):
        raise ValueError(f"sd must be a finite number >= 0, got {sd}")
    if not half_width > 0:
        raise ValueError(f"half_width must be > 0 (in the units of sd), got {half_width}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level} (0.95 for a 95 % interval)")
    half = lambda n: float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    if half(n_max) > half_width:
        raise ValueError(f"even {n_max} seeds give a half-width of {half(n_max):.3g} > {half_width} at sd = {sd}")
    lo, hi = 1, n_max          # half(n) falls as n grows: half(lo) > half_width (or lo = 1), half(hi) <= half_width
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if half(mid) <= half_width else (mid, hi)
    return max(hi, 2)


# ---------------------------------------------------------------------------------------------------------------------
# The grid's rows → the paired table


def _lr_text(rows: list[dict], label: str, task: str) -> str:
    lrs = sorted({f"{float(r['lr']):g}" for r in rows if r.get("lr") not in (None, "")})
    if len(lrs) > 1:
        raise ValueError(f"{label} on {task} ran at several learning rates ({', '.join(lrs)}): one results.csv holds "
                         "one learning rate per method and task; write the other runs to another --out")
    return lrs[0] if lrs else ""


def paired_table(rows: list[dict], tasks: list[str] | None = None, reference: str = REFERENCE) -> list[dict]:
    """One row per (task, method) that shares seeds with the reference: PAIRED_CSV's columns in percentage points
    (mean_acc: the method's last-epoch test accuracy on the paired seeds; difference = method − reference), plus
    sd_diff and mde (None under 2 seeds), and best_acc / best_diff / best_ci_low / best_ci_high: the same at the
    best-validation epoch, where every paired run has it. The reference's own rows: 0 difference, 0 interval."""
    by = {}
    for r in rows:
        key = (r["task"], r["label"], r["seed"])
        if key in by:
            raise ValueError(f"two results for {r['label']} on {r['task']}, seed {r['seed']}: keep one per seed")
        by[key] = r
    tasks = tasks or list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    labels = [reference, *[l for l in labels if l != reference]]
    out = []
    for task in tasks:
        ref = {s: r for (t, l, s), r in by.items() if t == task and l == reference}
        for label in labels:
            mine = {s: r for (t, l, s), r in by.items() if t == task and l == label}
            seeds = sorted(mine.keys() & ref.keys())
            if not seeds:
                continue
            a = [100 * mine[s]["test_acc"] for s in seeds]
            b = [100 * ref[s]["test_acc"] for s in seeds]
            row = {"task": task, "method": label, "n_seeds": len(seeds), "lr": _lr_text(list(mine.values()), label,
                   task), "mean_acc": float(np.mean(a)), "mean_diff": float(np.mean(a) - np.mean(b)),
                   "ci_low": None, "ci_high": None, "sd_diff": None, "mde": None, "best_acc": None, "best_diff": None,
                   "best_ci_low": None, "best_ci_high": None}
            if len(seeds) >= 2:
                p = paired_difference(a, b)
                row.update(ci_low=p["ci_low"], ci_high=p["ci_high"], sd_diff=p["sd"],
                           mde=min_detectable_effect(len(seeds), p["sd"]))
            best = [(mine[s].get("best_val_test_acc"), ref[s].get("best_val_test_acc")) for s in seeds]
            if all(x is not None and y is not None for x, y in best):
                a_best, b_best = [100 * x for x, _ in best], [100 * y for _, y in best]
                row.update(best_acc=float(np.mean(a_best)), best_diff=float(np.mean(a_best) - np.mean(b_best)))
                if len(seeds) >= 2:
                    q = paired_difference(a_best, b_best)
                    row.update(best_ci_low=q["ci_low"], best_ci_high=q["ci_high"])
            if label == reference:  # the zero every other row is measured from, exactly
                row.update(mean_diff=0.0, ci_low=0.0, ci_high=0.0, sd_diff=None, mde=None)
                if row["best_acc"] is not None:
                    row.update(best_diff=0.0, best_ci_low=0.0, best_ci_high=0.0)
            out.append(row)
    return out


def _cell(v) -> str:
    return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def write_paired_csv(path, table: list[dict]):
    """paired.csv: exactly PAIRED_CSV's columns (the rest of paired_table's row goes to results.md)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAIRED_CSV)
        for r in table:
            w.writerow([_cell(r[k]) for k in PAIRED_CSV])


def paired_markdown(table: list[dict], reference: str = REFERENCE) -> str:
    """The paired table for results.md: the difference with its interval, the MDE, and the best-validation epoch."""
    def diff(m, lo, hi):
        return "—" if m is None else f"{m:+.2f}" + ("" if lo is None else f" [{lo:+.2f}, {hi:+.2f}]")
    lines = [f"| task | method | seeds | lr | test acc (%) | Δ vs {reference} [95 % CI] | MDE (80 % power) | "
             f"test acc at best val (%) | Δ at best val [95 % CI] |", "|---" * 9 + "|"]
    for r in table:
        ref = r["method"] == reference
        lines.append(f"| {r['task']} | {r['method']} | {r['n_seeds']} | {r['lr'] or '—'} | {r['mean_acc']:.2f} | "
                     + ("reference" if ref else diff(r["mean_diff"], r["ci_low"], r["ci_high"])) + " | "
                     + ("—" if r["mde"] is None else f"{r['mde']:.2f}") + " | "
                     + ("—" if r["best_acc"] is None else f"{r['best_acc']:.2f}") + " | "
                     + ("reference" if ref and r["best_acc"] is not None else
                        diff(r["best_diff"], r["best_ci_low"], r["best_ci_high"])) + " |")
    return "\n".join(lines)
