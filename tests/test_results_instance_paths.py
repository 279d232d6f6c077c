"""What RESULTS.md says the instance-aware methods do after their fixes (issue 16's Must show), held to the committed
per-run CSVs those tables were made from: each test reads the rows and fails when a CSV changes under a claim, or
when a claim is written that its rows do not carry. No training here: the runs' commands are in the CSVs."""
import csv
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def rows(name):
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


def test_v2apt_uses_its_latent_on_the_test_split_of_three_seeds_per_task():
    """At the default recipe, on the test split, per task and seed: ≥ 1 bit, ≥ 5 % of the predictions change under the
    swap, and another image's latent costs accuracy. CIFAR-10-1k: the fp32 runs probed on 2,000 test images (seeds
    1-2 re-trained on 2026-12-06, 3-4 of 2026-12-01); MNIST-1k: seeds 0-2 on all 10,000 (the 2,000-image probe of seed 3,
    4.85 % changed, stays in RESULTS.md as the one run under 5 %)."""
    probes = {
        "cifar10-1k": [r for r in rows("issue16/v2apt_probe_test.csv") + rows("issue16/v2apt_probe_test_cifar.csv")
                       if r["method"] == "v2apt" and "/cifar10-1k/" in r["run"]],
        "mnist-1k": rows("issue16/v2apt_probe_test_mnist10k.csv"),
    }
    for task, rs in probes.items():
        seeds = {r["run"].rsplit("seed", 1)[1] for r in rs}
        assert len(seeds) >= 3, task
        for r in rs:
            assert float(r["mi_bits"]) >= 1 and float(r["changed_swapped"]) >= 0.05, r["run"]
            assert float(r["acc_swapped"]) < float(r["acc_own"]), r["run"]


def gap_and_std(table, reference, method, task):
    ref = {r["seed"]: float(r["test_acc"]) for r in table if r["label"] == reference and r["task"] == task}
    mine = {r["seed"]: float(r["test_acc"]) for r in table if r["label"] == method and r["task"] == task}
    seeds = sorted(ref.keys() & mine.keys())
    a, b = [100 * mine[s] for s in seeds], [100 * ref[s] for s in seeds]
    return len(seeds), statistics.mean(a) - statistics.mean(b), statistics.mean(b), statistics.stdev(b)


def assert_mnist_bar_missed_as_written(table, n_seeds):
    """V²APT below VPT-Deep on MNIST-1k by more than VPT-Deep's seed std, on n_seeds paired seeds, and RESULTS.md
    stating that with these figures."""
    n, gap, ref, std = gap_and_std(table, "vpt-deep", "v2apt", "mnist-1k")
    assert n == n_seeds and gap < -std
    text = (RESULTS.parent / "RESULTS.md").read_text()
    assert f"VPT-Deep {ref:.2f} ± {std:.2f} %" in text and f"({-gap:.2f} against {std:.2f})" in text


def test_v2apt_accuracy_bar_is_met_on_cifar_and_missed_on_mnist_as_the_docs_say():
    """The bar: no lower than VPT-Deep by more than VPT-Deep's seed std. Met on CIFAR-10-1k (five seeds); missed on
    MNIST-1k's whole test set (three seeds), which RESULTS.md, the README and lesson 03 state with these figures."""
    n, gap, _, std = gap_and_std(rows("issue16/v2apt_finals.csv"), "vpt-deep", "v2apt, path open", "cifar10-1k")
    assert n == 5 and gap >= -std
    assert_mnist_bar_missed_as_written(rows("issue17/mnist1k_fulltest.csv"), 3)


def test_v2apt_accuracy_bar_still_missed_on_mnist_at_five_seeds_beside_linear_and_full():
    """Seeds 3-4 (2026-12-07) in the resumed grid's file: its seeds 0-2 are mnist1k_fulltest.csv's rows, unchanged; over
    five seeds V²APT is still lower than VPT-Deep by more than VPT-Deep's seed std, as RESULTS.md says with these
    figures; the linear probe and full fine-tuning ran beside them (mnist1k_full.csv), five paired seeds each."""
    grid = rows("issue17/mnist1k_vptdeep_v2apt_linear.csv")
    first = {(r["label"], r["seed"]): r for r in rows("issue17/mnist1k_fulltest.csv")}
    assert first and all(r == first[(r["label"], r["seed"])] for r in grid if (r["label"], r["seed"]) in first)
    assert_mnist_bar_missed_as_written(grid, 5)
    for table, method in ((grid, "linear"), (rows("issue17/mnist1k_full.csv"), "full")):
        assert sorted(r["seed"] for r in table if r["label"] == method and r["task"] == "mnist-1k") == list("01234")


def test_viapt_m_1_no_longer_far_below_m_0():
    acc = {r["label"]: float(r["test_acc"]) for r in rows("issue16/viapt.csv")}
    assert acc["viapt m=0, before"] - acc["viapt m=1, before"] > 0.10                    # before: 15.8 points
    assert abs(acc["viapt m=0, centred"] - acc["viapt m=1, mean, dropout fixed, W lr x30"]) < 0.01   # after: level


def test_davpt_metric_losses_fall_after_the_fix():
    curve = [r for r in rows("issue16/davpt_metric_losses.csv") if r["run"] == "raw, 0.01 (after)"]
    assert len(curve) == 20
    for loss in ("mg_visual", "mg_cls"):
        assert float(curve[-1][loss]) < float(curve[0][loss]), loss


def test_vapt_seed_spread_before_and_after_at_8_and_20_epochs():
    def spread(table, label):
        acc = [100 * float(r["test_acc"]) for r in table if r["label"] == label]
        assert len(acc) == 3, label
        return statistics.stdev(acc)
    e8, e20 = rows("issue16/vapt_8epochs.csv"), rows("issue16/vapt_20epochs.csv")
    assert spread(e8, "vapt, before") > 10 and spread(e8, "vapt, after") > 10      # one seed collapses either way
    assert spread(e8, "vapt, after, network lr x0.2") < 2 and spread(e20, "vapt, after") < 1


def test_full_v2apt_before_after_and_its_ablation_keeps_the_vae_slots():
    table = rows("issue16/full_v2apt.csv")
    acc = {(r["label"], r["seed"]): float(r["test_acc"]) for r in table}
    for seed in ("0", "1"):
        assert acc[("full-v2apt, after", seed)] > acc[("full-v2apt, before", seed)] + 0.04, seed   # +7.2 and +5.0
    for part in ("vae", "pca", "guide", "bias"):
        assert {s for (label, s) in acc if label == f"after −{part}"} == {"0", "1"}, part
    no_vae = next(r for r in table if r["label"] == "after −vae")
    assert "--no-vae-slots static" in no_vae["command"]     # the slots stay, as static prompts: no other count moves
