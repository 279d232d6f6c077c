"""The README's front table, results/front/paired.csv and .md, and RESULTS.md's compute table are regenerated from the
committed per-run CSVs by results/front/make.py: each must equal what that script computes now, so every figure in them
traces to rows that hold the command that made them (issue 17). Fails when a CSV is added or changed and the tables
were not regenerated, or when a table was edited by hand."""
import csv
import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONT = REPO / "results" / "front"


def make():
    spec = importlib.util.spec_from_file_location("front_make", FRONT / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def between(text, start, end):
    a = text.index(start) + len(start)
    return text[a:text.index(end, a)].strip()


def test_front_table_paired_csv_and_compute_table_are_regenerated(tmp_path):
    m = make()
    table = m.paired_table(m.rows(), m.TASKS)
    readme = (REPO / "README.md").read_text()
    assert between(readme, m.FRONT_START, m.FRONT_END) == m.readme_table(table)
    assert (FRONT / "paired.md").read_text().strip() == m.paired_markdown(table)
    m.write_paired_csv(tmp_path / "paired.csv", table)
    assert (FRONT / "paired.csv").read_text() == (tmp_path / "paired.csv").read_text()
    with open(FRONT / "paired.csv", newline="") as f:
        assert next(csv.reader(f)) == ["task", "method", "n_seeds", "lr", "mean_acc", "mean_diff", "ci_low", "ci_high"]
    results = (REPO / "RESULTS.md").read_text()
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

    def num(x):
        return f"{float(x):+.2f}".replace("-", "−")
    assert mnist
    for r in mnist:
        assert r["n_seeds"] == "5", r["method"]
        ci = f"{num(r['mean_diff'])} [{num(r['ci_low'])}, {num(r['ci_high'])}]"
        if float(r["ci_low"]) > 0 or float(r["ci_high"]) < 0:
            ci = f"**{ci}**"
        assert sum(f"| {ci} |" in l for l in table) == 1, (r["method"], ci)
    assert len(table) == len(mnist) + 2   # and the header and VPT-Deep's row: no row without its method in paired.csv
