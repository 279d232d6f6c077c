"""The benchmarks run end to end on tiny configurations and print well-formed tables: speed on random weights,
infer on a real run trained for a few steps."""
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import need
from vapt_min import train as T
from vapt_min.bench import infer, main, speed
from vapt_min import grid as G
from vapt_min import runner
from vapt_min.grid import accuracy, read_results
from vapt_min.data import data_root

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real():
    need(data_root() / "cifar10" / "train")
    need(data_root() / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k" / "model.safetensors")


def test_speed_table_tiny(capsys):
    rows = speed(["vpt-deep", "v2apt", "linear"], "vit_tiny_patch16_32", img_size=32, batch_size=4, rounds=2, steps=1, device="cpu")
    assert [r["method"] for r in rows] == ["vpt-deep", "v2apt", "linear"]
    assert rows[0]["train_vs_vpt-deep"] == 1.0 and rows[0]["infer_vs_vpt-deep"] == 1.0
    assert [r["trainable_params"] for r in rows] == [23_040 + 1_930, 29_776 + 1_930, 1_930]
    assert all(r["train_step_s"] > 0 and r["infer_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert out.count("\n| ") == 4 and "| v2apt | 31,706 |" in out and "train memory (MiB)" in out


def test_speed_memory_separates_the_methods():
    rows = {r["method"]: r for r in speed(["vpt-deep", "full", "linear"], "vit_tiny_patch16_32", img_size=32, batch_size=4,
                                          rounds=1, steps=1, device="cpu")}
    full, deep, lin = rows["full"], rows["vpt-deep"], rows["linear"]
    # AdamW keeps two fp32 moments per trainable parameter; the gradients are one more copy, counted in the step
    assert full["state_mib"] == pytest.approx(2 * 4 * full["trainable_params"] / 2**20, rel=1e-4)  # + a step count each
    assert deep["state_mib"] == pytest.approx(2 * 4 * deep["trainable_params"] / 2**20, rel=1e-3)
    assert full["step_mib"] > 4 * full["trainable_params"] / 2**20 + deep["step_mib"] * 0.5  # weight gradients + activations
    assert full["memory_mib"] > deep["memory_mib"] > lin["memory_mib"] >= 0
    assert deep["memory_vs_vpt-deep"] == 1.0 and full["memory_vs_full"] == 1.0


def test_unknown_method_is_an_error():
    with pytest.raises(SystemExit):
        main(["speed", "--methods", "vpt-huge"])


def test_speed_runs_every_prompt_method():
    methods = ["vpt-deep", "vapt", "viapt", "davpt", "davpt+", "full-v2apt"]
    rows = speed(methods, "vit_tiny_patch16_32", img_size=32, batch_size=4, rounds=1, steps=1, device="cpu")
    assert [r["trainable_params"] for r in rows] == [24_970, 9_480 + 1_930, 21_540 + 1_930, 24_970, 24_970 + 4_608,
                                                     18_256 + 9_760 + 4_608 + 1_930]
    assert all(r["train_step_s"] > 0 and r["infer_s"] > 0 for r in rows)


def test_infer_reproduces_the_reported_accuracy_and_times_multi_round(real, tmp_path, capsys):
    tiny = ["--n-train", "40", "--n-val", "20", "--test-cap", "40", "--img-size", "32", "--batch-size", "8",
            "--no-progress", "--max-steps", "3", "--method", "viapt", "--pca-dim", "8"]
    s = T.train(T.config_from_args([*tiny, "--out", str(tmp_path / "v")]))
    rows = infer([tmp_path / "v"], samples=(1, 3))
    assert [r["R"] for r in rows] == [1, 3] and all(r["images"] == 40 and r["seconds"] > 0 for r in rows)
    assert rows[0]["test_acc"] == s["test_acc"]                    # R = 1 (z = μ) is what training reported
    assert infer([tmp_path / "v"], samples=(3,))[0]["test_acc"] == rows[1]["test_acc"]   # seeded: reproducible
    assert "| z = μ |" in capsys.readouterr().out


def test_infer_refuses_a_method_without_sampling(real, tmp_path):
    T.train(T.config_from_args(["--n-train", "16", "--n-val", "8", "--test-cap", "8", "--img-size", "32",
                                "--no-progress", "--max-steps", "1", "--out", str(tmp_path / "d")]))
    with pytest.raises(ValueError, match="does not sample its prompts"):
        main(["infer", str(tmp_path / "d")])
    with pytest.raises(SystemExit):
        main(["infer", str(tmp_path / "d"), "--samples", "0"])


def test_speed_follows_the_precision_and_attention_path(capsys):
    rows = speed(["vpt-deep"], "vit_tiny_patch16_32", img_size=32, batch_size=2, rounds=1, steps=1, device="cpu",
                 precision="fp32", attention="sdpa")
    assert rows[0]["train_step_s"] > 0
    assert "| fp32 | sdpa attention |" in capsys.readouterr().out
    main(["speed", "--methods", "linear", "--model", "vit_tiny_patch16_32", "--img-size", "32", "--batch-size", "2",
          "--rounds", "1", "--steps", "1", "--device", "cpu", "--attention", "explicit"])
    assert "explicit attention" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["speed", "--attention", "flash"])


# ----------------------------------------------------------------------------------------------- the accuracy grid
GRID_TINY = ["--weights", "random", "--img-size", "32", "--n-train", "20", "--n-val", "10", "--test-cap", "20",
             "--batch-size", "10", "--epochs", "2", "--warmup-epochs", "1"]


def test_accuracy_grid_runs_resumes_and_reports(real, tmp_path, capsys):
    entries = {"linear": ["--method", "linear"], "vpt-deep": ["--method", "vpt-deep"], "broken": ["--method", "vpt-deep", "--lr", "-1"]}
    tasks = {"cifar": ["--dataset", "cifar10"], "cifar-2shot": ["--dataset", "cifar10", "--protocol", "shots", "--shots", "2"]}
    kw = dict(preset="default", out=tmp_path / "res", runs=tmp_path / "runs", workers=2, extra=GRID_TINY,
              only={"broken": {"tasks": ["cifar"]}})
    with pytest.raises(RuntimeError, match="2 runs failed"):   # bad runs are reported; the others finish and are kept
        accuracy(entries, tasks, seeds=(0, 1), **kw)
    out = capsys.readouterr().out
    assert "FAILED broken | cifar | seed 0" in out and "FAILED broken | cifar | seed 1" in out
    assert "broken | cifar-2shot" not in out                  # `only`: the broken entry runs on one task
    rows = read_results(tmp_path / "res" / "results.csv")
    assert sorted((r["label"], r["task"], r["seed"]) for r in rows) == sorted(
        (l, t, s) for l in ("linear", "vpt-deep") for t in tasks for s in (0, 1))
    assert all(0 <= r["test_acc"] <= 1 and r["command"].startswith("OMP_NUM_THREADS=1 python -m vapt_min.train --preset default")
               for r in rows)
    # the probe's columns: a generator that reads the image is swap-tested on validation (test_probe_columns);
    # VPT-Deep's prompts read none and the linear probe has no generator: both columns stay empty
    assert all(r["val_acc_own"] == r["val_changed_swapped"] == r["mi_bits_val"] == "" for r in rows)
    md = (tmp_path / "res" / "results.md").read_text().splitlines()
    top = next(i for i, l in enumerate(md) if l.startswith("| method |"))
    assert md[top].startswith("| method | trainable params | trainable % | cifar | cifar-2shot |")
    lin = [r for r in rows if r["label"] == "linear" and r["task"] == "cifar"]
    mean = 100 * sum(r["test_acc"] for r in lin) / 2
    assert md[top + 2].startswith(f"| linear | 1,930 | ") and f"{mean:.1f} ± " in md[top + 2]
    assert any(l.startswith("| cifar | linear | 2 | 0.001 |") for l in md)   # the paired table, from paired.csv
    assert (tmp_path / "res" / "paired.csv").read_text().startswith("task,method,n_seeds,lr,mean_acc,mean_diff,")
    assert (tmp_path / "res" / "accuracy_vs_params.png").stat().st_size > 10_000

    # Again, without the broken entry: nothing re-runs, nothing is appended twice; a run cut before its first epoch
    # finished (a folder without train_state.pt) is started afresh.
    cut = tmp_path / "runs" / "vpt-deep" / "cifar" / "seed1"
    for f in cut.iterdir():
        f.unlink()
    (cut / "config.json").write_text("{}")
    before = {(r["label"], r["task"], r["seed"]): r["test_acc"] for r in rows}
    accuracy({k: v for k, v in entries.items() if k != "broken"}, tasks, seeds=(0, 1), **kw)
    again = read_results(tmp_path / "res" / "results.csv")
    assert len(again) == len(rows) and {(r["label"], r["task"], r["seed"]): r["test_acc"] for r in again} == before
    assert (cut / "summary.json").is_file()
    assert json.loads((cut / "summary.json").read_text())["test_acc"] == before[("vpt-deep", "cifar", 1)]  # same seed, same result


def test_results_md_rows_reproduce(real, tmp_path):
    """RESULTS.md's figures come from results/cpu/results.csv: re-running its quickest row with the printed command
    (same thread count) gives the same numbers under the torch version the grid ran with (results.md's header names
    it) and the same precision (the row says: bf16 autocast where the CPU has bf16 instructions, else fp32). Under
    another torch or precision the kernels round differently: then the test and validation accuracy must agree within
    1 point (10 of the 1,000 test images), which a broken method or a changed split would not."""
    rows = read_results(need(REPO / "results" / "cpu" / "results.csv"))
    grid_torch = re.search(r"torch (\S+);", (REPO / "results" / "cpu" / "results.md").read_text())[1]
    # the quickest kind of run: the linear probe on 100 images (wall times of resumed runs count only their second part)
    row = min(rows, key=lambda r: (r["task"] != "cifar10-10shot", r["label"] != "linear", r["seed"]))
    command = shlex.split(row["command"])
    env = dict(os.environ, **dict(a.split("=", 1) for a in command if "=" in a and not a.startswith("-")))
    args = [a for a in command if not ("=" in a and not a.startswith("-"))]
    out = args.index("--out")
    args[out + 1] = str(tmp_path / "again")
    r = subprocess.run([sys.executable, *args[1:], "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "again" / "summary.json").read_text())
    got, want = (s["test_acc"], s["best_val_acc"]), (row["test_acc"], float(row["best_val_acc"]))
    if torch.__version__ == grid_torch and s["precision"] == row["precision"]:
        assert got == want, row["command"]
    else:
        assert all(abs(g - w) <= 0.01 for g, w in zip(got, want)), (got, want, torch.__version__, grid_torch)


def test_probe_columns():
    """summary.json's probe → the grid's columns: filled for a generator that read the image, empty otherwise."""
    from vapt_min.grid import PROBE_FIELDS, probe_columns
    swap = {"acc_own": 0.8, "acc_swapped": 0.7, "acc_null": 0.6, "changed_swapped": 0.2, "changed_null": 0.3, "images": 9}
    assert probe_columns({"probe": {"swap": swap, "latent": {"mi_bits": 1.5}}}) == {
        "val_acc_own": 0.8, "val_acc_swapped": 0.7, "val_acc_null": 0.6, "val_changed_swapped": 0.2, "mi_bits_val": 1.5}
    assert probe_columns({"probe": {"swap": swap}})["mi_bits_val"] == ""
    assert probe_columns({"probe": {}}) == probe_columns({}) == dict.fromkeys(PROBE_FIELDS, "")


def test_a_results_csv_from_before_the_probe_columns_keeps_its_header(tmp_path):
    from vapt_min.grid import CSV_FIELDS, csv_header
    (tmp_path / "results.csv").write_text(",".join(CSV_FIELDS) + "\n")
    assert csv_header(tmp_path / "results.csv") == CSV_FIELDS and csv_header(tmp_path / "none.csv") is None


def test_grid_rows_of_your_own(capsys, tmp_path):
    main(["accuracy", "--entry", "viapt, dropout on all: --method viapt --prompt-dropout-on all", "--entry",
          "vapt lr 3e-4: --method vapt --lr 3e-4", "--tasks", "cifar10-1k", "--seeds", "0", "1", "--extra",
          "--test-cap 2000", "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs"), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("accuracy grid: 2 entries, 1 tasks, seeds 0, 1: 4 runs")
    assert lines[1:] == [f"  {label} | cifar10-1k | seed {s}" for s in (0, 1)
                         for label in ("viapt, dropout on all", "vapt lr 3e-4")]
    with pytest.raises(SystemExit):
        main(["accuracy", "--entry", "no options", "--dry-run"])


def test_ablation_labels_take_an_ascii_hyphen(capsys, tmp_path):
    """lesson 07's exercise types `full-v2apt -pca -guide` in a shell: the label's minus signs need not be typed."""
    main(["accuracy", "--methods", "full-v2apt -pca -guide", "vpt-deep", "--tasks", "mnist-1k", "--seeds", "0",
          "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs"), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines[1:]) == ["  full-v2apt −pca −guide | mnist-1k | seed 0", "  vpt-deep | mnist-1k | seed 0"]
    with pytest.raises(SystemExit):
        main(["accuracy", "--methods", "full-v2apt -pca -nothing", "--dry-run"])


def test_curves_write_a_figure_and_a_csv_and_name_a_missing_key(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        rows = [{"epoch": e, "ce": scale / e, "mg_cls": 10 - e, "val_acc": 0.1 * e} for e in (1, 2, 3)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--keys", "ce", "mg_cls", "--labels", "A", "B",
          "--png", str(tmp_path / "c.png"), "--csv", str(tmp_path / "c.csv")])
    assert capsys.readouterr().out.splitlines() == ["A: ce 1 → 0.333 | mg_cls 9 → 7", "B: ce 2 → 0.667 | mg_cls 9 → 7"]
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert lines[0] == "run,epoch,ce,mg_cls" and lines[1] == "A,1,1.0,9" and lines[6] == "B,3,0.6666666666666666,7"
    assert (tmp_path / "c.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as e:                          # a key nobody logged: named, with what was logged
        main(["curves", str(tmp_path / "a"), "--keys", "kl"])
    assert e.value.code == 2 and "--keys kl: no run logged it; metrics.jsonl has ce, epoch, mg_cls, val_acc" in \
        capsys.readouterr().err


# ----------------------------------------------------------------- issue 17: selection, pairing, the second column
TINY_RUN = ["--weights", "random", "--img-size", "32", "--n-train", "20", "--n-val", "10", "--test-cap", "20",
            "--batch-size", "10", "--epochs", "2", "--warmup-epochs", "1", "--no-progress"]


def refuse(key):
    raise RuntimeError(f"test image {key!r} was read")


def trap_test_split(monkeypatch):
    """Every split's test images raise when read: any evaluation on test (or a look at one image) fails."""
    from vapt_min import data as D
    make_splits = D.make_splits

    def trapped(*a, **k):
        splits = make_splits(*a, **k)
        splits["test"] = D.Samples(splits["test"].items, refuse)
        return splits
    monkeypatch.setattr(D, "make_splits", trapped)


def test_no_eval_test_never_reads_the_test_split(real, tmp_path, monkeypatch):
    trap_test_split(monkeypatch)
    with pytest.raises(RuntimeError, match="test image"):   # the trap works: an ordinary run reads the test split
        T.train(T.config_from_args([*TINY_RUN, "--out", str(tmp_path / "a")]))
    s = T.train(T.config_from_args([*TINY_RUN, "--no-eval-test", "--out", str(tmp_path / "b")]))
    assert s["test_acc"] is None and s["best_val_test_acc"] is None and 0 <= s["last_val_acc"] <= 1
    assert s["lr"] == 1e-3
    assert not any("test_acc" in json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())


def test_the_second_column_is_the_best_validation_checkpoint_on_test(real, tmp_path):
    from vapt_min.build import build_data, build_loaders, use_bf16
    out = tmp_path / "r"
    # the real weights: load_run rebuilds the backbone from them (random ones would be drawn anew)
    s = T.train(T.config_from_args([*TINY_RUN, "--weights", "auto", "--epochs", "3", "--out", str(out)]))
    assert s["best_epoch"] < 3, "the best-validation checkpoint must be an earlier epoch's for this test to bite"
    for which, key in (("best", "best_val_test_acc"), ("last", "test_acc")):
        model, cfg = T.load_run(out, which)
        _, splits = build_data(cfg, model.vit.pretrained_cfg)
        dev = torch.device("cpu")
        assert T.evaluate(model, build_loaders(cfg, splits)[2], dev, use_bf16(cfg, dev)) == s[key], which


def test_the_second_test_pass_gives_the_last_epoch_back_to_the_end_of_run_probe(real, tmp_path):
    """The best-validation test pass loads best.safetensors into the model, then must restore the last epoch: the
    probe that follows (summary.json, the grid's val_* columns) describes the last model, with or without that pass.
    On the CPU the saved state shared the parameters' storage, so the restore put the best epoch back (2026-12-01 to
    2026-12-06)."""
    from vapt_min.bench import main as bench_main
    # the real weights: load_run rebuilds the backbone from them (random ones would be drawn anew)
    runs = {flag: T.train(T.config_from_args([*TINY_RUN, "--weights", "auto", "--seed", "1", "--method", "v2apt",
                                              "--epochs", "3", flag, "--out", str(tmp_path / flag)]))
            for flag in ("--best-val-test", "--no-best-val-test")}
    on, off = runs["--best-val-test"], runs["--no-best-val-test"]
    assert on["best_epoch"] < 3, "the best-validation epoch must be an earlier one for this test to bite"
    assert on["probe"]["latent"]["mi_nats"] > 0 and on["probe"] == off["probe"]
    # `bench probe --split val` reads last.safetensors and the validation split: its own-input accuracy is the last
    # epoch's validation accuracy (its swap pairs images in another shuffle than summary.json's: it draws a batch first)
    bench_main(["probe", str(tmp_path / "--best-val-test"), "--split", "val", "--csv", str(tmp_path / "val.csv")])
    with open(tmp_path / "val.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["images"] == "10" and float(row["acc_own"]) == on["last_val_acc"] == on["probe"]["swap"]["acc_own"]


def test_no_best_val_test_skips_the_second_test_pass(real, tmp_path, monkeypatch):
    """--no-best-val-test (the lessons' CPU budget): the last epoch's test accuracy only, one pass over the test split."""
    passes = []
    evaluate = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda model, loader, *a: passes.append(len(loader.dataset)) or
                        evaluate(model, loader, *a))
    runs = {}
    for flag in ("--best-val-test", "--no-best-val-test"):
        passes.clear()
        runs[flag] = T.train(T.config_from_args([*TINY_RUN, "--epochs", "3", flag, "--out", str(tmp_path / flag)]))
        runs[flag]["passes"] = list(passes)
    on, off = runs["--best-val-test"], runs["--no-best-val-test"]
    assert on["best_epoch"] < 3, "the best-validation epoch must be an earlier one for this test to bite"
    assert on["passes"] == [10, 10, 10, 20, 20] and off["passes"] == [10, 10, 10, 20]   # val per epoch, then test
    assert off["best_val_test_acc"] is None and off["test_acc"] == on["test_acc"] and on["best_val_test_acc"] is not None


def test_a_seed_fixes_split_and_batch_order_for_every_method(real, tmp_path, monkeypatch):
    """The pairing's premise: the same seed gives every method the same training and validation images and the same
    batches in the same order, whatever the method draws from the global RNG (V²APT's samples, DA-VPT's hook); and a
    larger --n-val (the selection's) keeps the training images and extends the validation set."""
    from vapt_min.build import build_data
    batches = []
    step = T.train_step

    def spy(net, opt, x, y, *a, **k):
        batches[-1].append((y.tolist(), x.double().sum().item()))
        return step(net, opt, x, y, *a, **k)
    monkeypatch.setattr(T, "train_step", spy)

    def run(method, seed):
        batches.append([])
        T.train(T.config_from_args([*TINY_RUN, "--method", method, "--seed", str(seed),
                                    "--out", str(tmp_path / f"{method}-{seed}")]))
        return batches[-1]
    deep = run("vpt-deep", 0)
    assert len(deep) == 4 and all(run(m, 0) == deep for m in ("linear", "v2apt", "davpt", "full"))
    assert run("vpt-deep", 1) != deep
    norm = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    items = lambda *o: {k: v.items for k, v in build_data(T.config_from_args([*TINY_RUN, *o]), norm)[1].items()}
    a, b, big = items("--method", "vpt-deep"), items("--method", "vapt"), items("--n-val", "30", "--no-eval-test")
    assert a == b and big["train"] == a["train"] and big["val"][:10] == a["val"] and len(big["val"]) == 30
    assert "test" not in big


TRAP = '''import os, sys
from vapt_min import data, train

def refuse(key):
    raise RuntimeError(f"a selection run read test image {key!r}")

make_splits = data.make_splits

def trapped(*a, **k):
    splits = make_splits(*a, **k)
    splits["test"] = data.Samples(splits["test"].items, refuse)
    return splits

if os.environ["TRAP_UNDER"] in " ".join(sys.argv):      # a selection run: no test image may be read
    data.make_splits = trapped
    with open(os.environ["TRAP_LOG"], "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
train.main(sys.argv[1:])
'''


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_selects_each_lr_off_test_then_pairs_and_resumes_after_a_kill(real, tmp_path, monkeypatch, capsys):
    """--select-lr end to end: the selection runs start through a wrapper that makes the test split raise (so the
    grid fails if a selection run reads it); the choice is the best last-epoch validation accuracy; the finals run at
    it and paired.csv carries it. Then the states a kill leaves (a finished run not yet in the CSV, a run cut before
    its first epoch, the summary files not yet written): the rerun redoes no finished run and changes no figure.
    Two candidate rates per method, not LR_GRID's three (test_evidence pins those): the same logic, two runs fewer."""
    monkeypatch.setattr(G, "LR_GRID", {**G.LR_GRID, "linear": (1e-3, 3e-3), "vpt-deep": (3e-4, 3e-3)})
    (tmp_path / "trap.py").write_text(TRAP)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("TRAP_UNDER", str(tmp_path / "runs" / "select-val30"))
    monkeypatch.setenv("TRAP_LOG", str(tmp_path / "trapped.txt"))
    monkeypatch.setattr(runner, "TRAIN", [sys.executable, str(tmp_path / "trap.py")])
    entries = {"linear": ["--method", "linear"], "vpt-deep": ["--method", "vpt-deep"]}
    res = tmp_path / "res"
    kw = dict(preset="default", out=res, runs=tmp_path / "runs", workers=2, extra=GRID_TINY,
              select=G.Selection(seeds=(100,), n_val=30))
    accuracy(entries, {"cifar": ["--dataset", "cifar10"]}, seeds=(0, 1), **kw)
    assert len((tmp_path / "trapped.txt").read_text().splitlines()) == 4     # every selection run ran trapped
    runs = read_csv(res / "selection_runs.csv")
    assert sorted((r["label"], float(r["lr"])) for r in runs) == sorted(
        (l, lr) for l in entries for lr in G.LR_GRID[l])
    assert all("--no-eval-test" in r["command"] and "--n-val 30" in r["command"] and r["seed"] == "100" for r in runs)
    for d in (tmp_path / "runs" / "select-val30").rglob("summary.json"):
        assert json.loads(d.read_text())["test_acc"] is None
    chosen = {}
    for label in entries:   # the choice, recomputed from the per-run rows: best last-epoch val, ties to the smaller lr
        val = {float(r["lr"]): float(r["last_val_acc"]) for r in runs if r["label"] == label}
        chosen[label] = min(lr for lr in val if val[lr] == max(val.values()))
    table = read_csv(res / "selection.csv")
    assert {r["method"]: float(r["lr"]) for r in table if r["chosen"] == "1"} == chosen and len(table) == 4
    finals = read_results(res / "results.csv")
    assert sorted((r["label"], r["seed"]) for r in finals) == [(l, s) for l in sorted(entries) for s in (0, 1)]
    for r in finals:
        assert r["lr"] == chosen[r["label"]] and f"--lr {chosen[r['label']]:g} --seed {r['seed']}" in r["command"]
        assert 0 <= r["best_val_test_acc"] <= 1 and f"lr{chosen[r['label']]:g}" in r["command"]
    paired = read_csv(res / "paired.csv")
    assert list(paired[0]) == ["task", "method", "n_seeds", "lr", "mean_acc", "mean_diff", "ci_low", "ci_high"]
    assert {r["method"]: float(r["lr"]) for r in paired} == chosen
    assert paired[0]["method"] == "vpt-deep" and paired[0]["mean_diff"] == paired[0]["ci_low"] == "0.0000"
    assert "selected on held-out training images" in (res / "results.md").read_text()

    # the states a kill leaves behind
    summaries = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("summary.json")}
    before = {f: (res / f).read_text() for f in ("selection.csv", "paired.csv")}
    lines = (res / "selection_runs.csv").read_text().splitlines(keepends=True)
    (res / "selection_runs.csv").write_text("".join(lines[:-1]))          # finished, but not yet in the CSV
    cut = tmp_path / "runs" / "select-val30" / "vpt-deep" / "cifar" / "lr0.003" / "seed100"
    for f in cut.iterdir():                                                # cut before its first epoch ended
        f.unlink()
    (cut / "config.json").write_text("{}")
    for f in ("selection.csv", "paired.csv"):                              # killed before the summaries
        (res / f).unlink()
    capsys.readouterr()
    accuracy(entries, {"cifar": ["--dataset", "cifar10"]}, seeds=(0, 1), **kw)
    redone = [p for p, t in summaries.items() if p.stat().st_mtime_ns != t]
    assert redone == [cut / "summary.json"]                                # only the cut run ran again
    key = lambda r: (r["label"], r["task"], r["lr"], r["seed"], r["last_val_acc"])
    assert sorted(map(key, read_csv(res / "selection_runs.csv"))) == sorted(map(key, runs))   # each run once
    assert {f: (res / f).read_text() for f in before} == before
    assert [(r["label"], r["seed"], r["test_acc"]) for r in read_results(res / "results.csv")] == [
        (r["label"], r["seed"], r["test_acc"]) for r in finals]


def test_grid_killed_mid_selection_resumes_without_redoing_finished_runs(real, tmp_path):
    """A real kill: the grid (selection, then finals) is SIGKILLed, process group and all, once its first selection
    run has finished; the same command again finishes the rest and leaves that run alone."""
    res, runs = tmp_path / "res", tmp_path / "runs"
    cmd = [sys.executable, "-m", "vapt_min.bench", "accuracy", "--select-lr", "--methods", "vpt-deep", "--tasks",
           "cifar10-1k", "--select-seeds", "100", "--select-n-val", "30", "--seeds", "0", "--preset", "default",
           "--workers", "1", "--out", str(res), "--runs", str(runs), "--extra", " ".join(GRID_TINY)]
    first = runs / "select-val30" / "vpt-deep" / "cifar10-1k" / "lr0.0003" / "seed100" / "summary.json"
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not first.is_file() and p.poll() is None:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert first.is_file() and not (res / "results.csv").exists(), "killed too late: the finals had begun"
    stamp = first.stat().st_mtime_ns
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert first.stat().st_mtime_ns == stamp
    sel = read_csv(res / "selection_runs.csv")
    assert sorted(float(r["lr"]) for r in sel) == sorted(G.LR_GRID["vpt-deep"])    # each once
    (final,) = read_results(res / "results.csv")
    chosen = next(float(r["lr"]) for r in read_csv(res / "selection.csv") if r["chosen"] == "1")
    assert final["lr"] == chosen and (res / "paired.csv").is_file()


def test_a_run_cut_after_its_last_epoch_is_started_again_not_resumed(tmp_path, monkeypatch):
    """Killed while scoring test or writing summary.json: every epoch is checkpointed, but --resume refuses a finished
    run, so the runner starts it afresh; a run cut after an earlier epoch is resumed."""
    from vapt_min import runner
    seen = tmp_path / "argv.json"
    monkeypatch.setattr(runner, "TRAIN", [sys.executable, "-c", "import json, os, sys; "
                                          "open(os.environ['ARGV_OUT'], 'w').write(json.dumps(sys.argv[1:]))"])
    monkeypatch.setenv("ARGV_OUT", str(seen))
    for done_epochs, resumed in ((2, False), (1, True)):
        run = tmp_path / f"cut{done_epochs}" / "seed0"
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"epochs": 2, "max_steps": None}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "step": 5 * e}) + "\n"
                                                   for e in range(1, done_epochs + 1)))
        (run / "train_state.pt").write_bytes(b"state")
        assert runner.trained_to_the_end(run) is not resumed
        runner.run_one(run, ["--method", "linear"], threads=1)
        argv = json.loads(seen.read_text())
        assert (argv[:2] == ["--resume", str(run)]) is resumed
        assert resumed or (argv[:2] == ["--method", "linear"] and not run.exists())  # afresh: the old folder is gone


def test_one_seed_gets_no_standard_deviation():
    from vapt_min.grid import results_markdown
    row = {"label": "vpt-deep", "task": "t", "seed": 0, "test_acc": 0.5, "trainable_params": 10, "trainable_pct": 0.1}
    md = results_markdown([row], ["t"])
    assert "50.0 (one seed)" in md and "±" not in md
    md = results_markdown([row, {**row, "seed": 1, "test_acc": 0.6}], ["t"])
    assert "55.0 ± 7.1" in md


def test_a_finished_folder_of_another_v2apt_recipe_is_refused(tmp_path):
    """The runner reuses a finished run by its folder name: a run of the paper's letter (or of a config from before
    the options existed) must not pass for today's default V²APT, which encodes block 6 with free bits."""
    from dataclasses import asdict
    from vapt_min.runner import check_reuse
    letter = ["--method", "v2apt", "--encode-at", "0", "--film-init", "small", "--free-bits", "0",
              "--network-lr-scale", "1"]
    run = tmp_path / "v2apt" / "cifar10-1k" / "seed0"
    run.mkdir(parents=True)
    saved = asdict(T.config_from_args([*letter, "--out", str(run)]))
    (run / "config.json").write_text(json.dumps(saved))
    check_reuse(run, letter)                                          # the same recipe: reused
    with pytest.raises(ValueError, match="another label"):
        check_reuse(run, ["--method", "v2apt"])                       # the default now: refused
    for k in ("encode_at", "film_init", "free_bits", "network_lr_scale"):
        saved.pop(k)                                                  # a folder from before the options existed
    (run / "config.json").write_text(json.dumps(saved))
    check_reuse(run, letter)
    with pytest.raises(ValueError, match="encode_at"):
        check_reuse(run, ["--method", "v2apt"])
    deep = tmp_path / "vpt-deep"
    deep.mkdir()
    (deep / "config.json").write_text(json.dumps({**saved, "method": "vpt-deep"}))
    check_reuse(deep, ["--method", "vpt-deep"])                       # no VAE: nothing changed for it
    with pytest.raises(ValueError, match="vpt-deep"):
        check_reuse(deep, ["--method", "vpt-shallow"])
    check_reuse(tmp_path / "never-ran", ["--method", "v2apt"])        # no folder: nothing to check


# --------------------------------------------------------------------------------------- rescore: the whole test set
def test_rescore_gives_what_the_run_would_have_scored_on_the_whole_test_set(real, tmp_path, capsys):
    """bench rescore scores a run trained with --test-cap 20 on the whole test set from its checkpoints: what the same
    run trained with --test-cap none reports (the cap never touches training), for the last and the best-validation
    checkpoint; each score is first checked against what the run recorded on its own 20 images."""
    from vapt_min.rescore import rescore
    # the real weights: load_run rebuilds the backbone from them (random ones would be drawn anew)
    # MNIST's 10,000 test images, no JPEG to decode; the linear probe, the cheapest model to score them with
    args = [*TINY_RUN, "--weights", "auto", "--epochs", "3", "--dataset", "mnist", "--method", "linear"]
    capped = T.train(T.config_from_args([*args, "--out", str(tmp_path / "capped")]))
    whole = T.train(T.config_from_args([*args, "--test-cap", "none", "--out", str(tmp_path / "whole")]))
    assert capped["best_epoch"] < 3, "the best-validation checkpoint must be an earlier epoch's for this test to bite"
    assert whole["test_acc"] != capped["test_acc"]   # 20 images against 10,000: the check below can fail

    def results(path, test_acc=capped["test_acc"], folder="capped"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["label", "task", "seed", "test_acc", "best_val_test_acc", "wall_time_s", "command"])
            w.writeheader()
            w.writerow({"label": "linear", "task": "mnist", "seed": 0, "test_acc": test_acc,
                        "best_val_test_acc": capped["best_val_test_acc"], "wall_time_s": 1.0,
                        "command": "python -m vapt_min.train " + " ".join(args) + f" --out {tmp_path / folder}"})
        return path

    rows = rescore(results(tmp_path / "runs.csv"), tmp_path / "whole.csv")
    assert len(rows) == 1
    with open(tmp_path / "whole.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["test_acc"]) == whole["test_acc"] and float(row["best_val_test_acc"]) == whole["best_val_test_acc"]
    assert row["test_images"] == "10000" and row["recorded_test_images"] == "20"
    assert float(row["recorded_test_acc"]) == capped["test_acc"] and row["wall_time_s"] == "1.0"   # the run's own
    assert row["command"].endswith(f"--out {tmp_path / 'capped'}") and "bench rescore" not in row["command"]
    assert "on 20 images → " in capsys.readouterr().out
    assert rescore(tmp_path / "runs.csv", tmp_path / "whole.csv") == []   # resumes: nothing scored twice

    # a record the checkpoint does not reproduce (one image off) is refused, and nothing is written for it
    off = capped["test_acc"] + (0.05 if capped["test_acc"] < 1 else -0.05)
    with pytest.raises(ValueError, match="does not score as the run did"):
        rescore(results(tmp_path / "off.csv", test_acc=off), tmp_path / "off_whole.csv")
    assert not (tmp_path / "off_whole.csv").exists()
    # a run whose folder is gone: an error naming the fix, before any run is scored
    with pytest.raises(ValueError, match="has no checkpoint .* train it again with --test-cap none"):
        rescore(results(tmp_path / "gone.csv", folder="gone"), tmp_path / "gone_whole.csv")
    for bad in ([str(tmp_path / "runs.csv")], [str(tmp_path / "runs.csv"), "--out", str(tmp_path / "runs.csv")],
                [str(tmp_path / "none.csv"), "--out", str(tmp_path / "x.csv")]):
        with pytest.raises(SystemExit) as e:
            main(["rescore", *bad])
        assert e.value.code == 2
