"""The figures of RESULTS.md's issue-16 section, from the CSVs beside this file (no run folders needed).

    python results/issue16/figures.py        # writes viapt_sweep.png here
"""
import csv
from pathlib import Path

import matplotlib
matplotlib.use("Agg")

from vapt_min.plots import plot_sweep

HERE = Path(__file__).parent
rows = list(csv.DictReader(open(HERE / "viapt.csv")))
M = [0, 1, 4, 32, 96, 192]
RULES = {  # line label → the CSV labels' rule; the corners m = 0 and m = d are the same under every rule
    "before: z̄ + history, dropout on all, lr": "before",
    "centred history (the literal reading)": "centred",
    "after: z̄ + history, W at lr × 30 (default)": "default (W lr x30)",
}


def acc(rule: str, m: int, key: str) -> float:
    corner = rule != "before" and m in (0, 192)
    want = f"viapt m={m}, " + ("centred" if corner else rule)
    hit = [r for r in rows if r["label"] == want]
    if not hit and rule == "default (W lr x30)":             # m = 1, 32 ran under the option's name
        hit = [r for r in rows if r["label"] == f"viapt m={m}, mean, dropout fixed, W lr x30"]
    return 100 * float(hit[0][key]) if hit else float("nan")


panels = {f"{name} (%)": {line: [acc(rule, m, key) for m in M] for line, rule in RULES.items()}
          for name, key in (("test accuracy", "test_acc"), ("validation accuracy, last epoch", "val_acc_own"))}
fig = plot_sweep(M, panels, "m, kept principal directions (d = 192)", symlog=True)
for ax in fig.axes:
    ax.set_ylim(0, 100)
fig.suptitle("ViaPT on CIFAR-10-1k, 8 epochs, seed 0 (results/issue16/viapt.csv)", fontsize=10)
fig.tight_layout()
fig.savefig(HERE / "viapt_sweep.png", dpi=110)
