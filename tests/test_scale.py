"""The lessons' one switch: VAPT_MIN_SCALE=paper turns a lesson's CPU budget into the papers' scale."""
import pathlib

import pytest

from vapt_min import scale
from vapt_min.train import Config

CPU = dict(n_train=200, n_val=200, epochs=4, warmup_epochs=1, lr=5e-3, img_size=112, test_cap=1000, progress=False)


def test_cpu_scale_is_the_budget_as_written(monkeypatch):
    """As written, and without the best-validation checkpoint's second test pass, which a lesson may ask back."""
    monkeypatch.delenv(scale.ENV, raising=False)
    assert scale.lesson_budget(**CPU) == {**CPU, "best_val_test": False}
    monkeypatch.setenv(scale.ENV, "cpu")
    assert scale.lesson_budget(**CPU) == {**CPU, "best_val_test": False}
    assert scale.lesson_budget(**CPU, best_val_test=True)["best_val_test"] is True
    Config(method="vpt-deep", **scale.lesson_budget(**CPU)).validate()


def test_paper_scale(monkeypatch):
    monkeypatch.setenv(scale.ENV, "paper")
    b = scale.lesson_budget(**CPU)
    assert (b["img_size"], b["epochs"], b["test_cap"], b["n_train"], b["n_val"], b["lr"]) == (224, 100, None, 800, 200, 5e-3)
    assert "best_val_test" not in b                       # the default: both test columns, as the grid reports them
    Config(method="vpt-deep", **b).validate()
    shots = scale.lesson_budget(protocol="shots", shots=10, n_val=200, epochs=10, img_size=112)
    assert (shots["shots"], shots["img_size"], "n_train" in shots) == (10, 224, False)  # few-shot keeps its shots


def test_unknown_scale_is_named(monkeypatch):
    monkeypatch.setenv(scale.ENV, "huge")
    with pytest.raises(ValueError, match="VAPT_MIN_SCALE='huge': use one of cpu, paper"):
        scale.lesson_budget(**CPU)


def test_check_band(monkeypatch):
    monkeypatch.delenv(scale.ENV, raising=False)
    scale.check_band("test accuracy", 0.80, saved=0.82, tol=0.04)
    scale.check_band("curve", [0.1, 0.2], saved=[0.12, 0.18], tol=0.05)
    with pytest.raises(AssertionError, match=r"test accuracy: 0.7 is outside the band 0.82 ± 0.04 of the saved run"):
        scale.check_band("test accuracy", 0.70, saved=0.82, tol=0.04)
    with pytest.raises(AssertionError, match=r"curve: 0.5 is outside .* \(1 of 2 values\)"):
        scale.check_band("curve", [0.1, 0.5], saved=[0.12, 0.18], tol=0.05)
    with pytest.raises(AssertionError, match="2 values, but the saved run has 3"):
        scale.check_band("curve", [0.1, 0.2], saved=[0.1, 0.2, 0.3], tol=0.05)
    with pytest.raises(AssertionError):
        scale.check_band("nan", float("nan"), saved=0.5, tol=1.0)  # a NaN is never inside a band
    monkeypatch.setenv(scale.ENV, "paper")
    scale.check_band("test accuracy", 0.10, saved=0.82, tol=0.04)  # paper scale: another budget, nothing to compare


def test_check_band_records_instead_of_stopping_when_asked(monkeypatch, tmp_path):
    """VAPT_MIN_BANDS_RECORD: one execution lists every band that moved (for re-setting them), in-band values add
    nothing, and without the variable the same value stops the lesson again."""
    monkeypatch.delenv(scale.ENV, raising=False)
    log = tmp_path / "moved.txt"
    monkeypatch.setenv(scale.RECORD, str(log))
    scale.check_band("test accuracy", 0.70, saved=0.82, tol=0.04)
    scale.check_band("curve", [0.1, 0.2], saved=[0.12, 0.18], tol=0.05)                   # inside: not recorded
    scale.check_band("curve", [0.1, 0.5], saved=[0.12, 0.18], tol=0.05)
    assert log.read_text().splitlines() == ["test accuracy: now [0.7], saved [0.82], band ± 0.04",
                                            "curve: now [0.1, 0.5], saved [0.12, 0.18], band ± 0.05"]
    monkeypatch.delenv(scale.RECORD)
    with pytest.raises(AssertionError, match="outside the band"):
        scale.check_band("test accuracy", 0.70, saved=0.82, tol=0.04)


def test_lesson_run_trains_once_per_configuration_and_package(tmp_path, monkeypatch):
    import json
    import vapt_min.train as vtrain
    calls = []

    def fake_train(cfg):
        calls.append(cfg)
        summary = {"method": cfg.method, "test_acc": 0.5, "run_dir": cfg.out}
        from pathlib import Path
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary))
        return summary
    monkeypatch.setattr(vtrain, "train", fake_train)
    monkeypatch.delenv(scale.ENV, raising=False)
    runs = tmp_path / "runs"
    first = scale.lesson_run(runs, method="linear", **CPU)
    again = scale.lesson_run(runs, method="linear", **CPU)                  # lesson 02 after lesson 01: loaded
    assert len(calls) == 1 and again == first and first["run_dir"].startswith(str(runs / "linear-"))
    scale.lesson_run(runs, method="linear", **{**CPU, "epochs": 5})          # another budget: its own run
    assert len(calls) == 2
    cut = runs / f"vpt-deep-{scale.run_key(dict(method='vpt-deep', **CPU))}"
    cut.mkdir()
    (cut / "metrics.jsonl").write_text("{}\n")                             # cut short: no summary.json
    scale.lesson_run(runs, method="vpt-deep", **CPU)
    assert len(calls) == 3 and (cut / "summary.json").is_file() and not (cut / "metrics.jsonl").exists()  # fresh
    with pytest.raises(ValueError, match="chooses the run folder"):
        scale.lesson_run(runs, method="linear", out="mine", **CPU)


def test_run_key_names_the_options_and_the_package_source(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(scale, "__file__", str(tmp_path / "scale.py"))
    key = scale.run_key({"method": "linear", "epochs": 4})
    assert key == scale.run_key({"epochs": 4, "method": "linear"}) and len(key) == 12
    assert key != scale.run_key({"method": "linear", "epochs": 5})
    (tmp_path / "a.py").write_text("x = 2\n")                              # the package changed: a new run
    assert key != scale.run_key({"method": "linear", "epochs": 4})


def test_two_kernels_reaching_one_lesson_run_train_it_once(tmp_path, monkeypatch):
    """`pytest -n 2` executes two notebooks side by side, and lessons 01 and 02 train the same runs: the second kernel
    waits for the first one's training and loads it (without the lock it removes the half-trained folder and trains
    again)."""
    import json
    import threading
    import time
    import vapt_min.train as vtrain
    calls = []

    def slow_train(cfg):
        calls.append(cfg)
        from pathlib import Path
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "metrics.jsonl").write_text("{}\n")
        time.sleep(0.5)                                                     # training
        summary = {"method": cfg.method, "test_acc": 0.5, "run_dir": cfg.out}
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary))
        return summary
    monkeypatch.setattr(vtrain, "train", slow_train)
    monkeypatch.delenv(scale.ENV, raising=False)
    got = []
    kernels = [threading.Thread(target=lambda: got.append(scale.lesson_run(tmp_path, method="linear", **CPU)))
               for _ in range(2)]
    for k in kernels:
        k.start()
        time.sleep(0.05)
    for k in kernels:
        k.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] == got[1]
    assert (pathlib.Path(got[0]["run_dir"]) / "metrics.jsonl").is_file()   # the first run's folder, kept


def test_two_lessons_logging_at_once_keep_both_rows(tmp_path, monkeypatch):
    import csv
    import threading
    import time
    from vapt_min.scale import log_result, show_log
    log = tmp_path / "log.csv"
    reader = csv.DictReader

    def slow_reader(*a, **k):                                              # a slow disk: read, then a pause
        rows = list(reader(*a, **k))
        time.sleep(0.2)
        return rows
    monkeypatch.setattr(csv, "DictReader", slow_reader)
    budget = dict(n_train=400, epochs=5, img_size=112, lr=5e-3, test_cap=1000)
    s = {"method": "vpt-deep", "dataset": "cifar10", "seed": 0, "test_acc": 0.75}
    lessons = [threading.Thread(target=log_result, args=(f"0{i}", s, budget), kwargs={"path": log}) for i in range(4)]
    for t in lessons:
        t.start()
    for t in lessons:
        t.join()
    assert sorted(r["lesson"] for r in show_log(log)) == ["00", "01", "02", "03"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.csv.lock"]   # no half-written file left


def test_the_running_log_keeps_one_row_per_lesson_method_and_budget(tmp_path, capsys):
    from vapt_min.scale import log_result, show_log
    log = tmp_path / "log.csv"
    budget = dict(n_train=400, epochs=5, img_size=112, lr=5e-3, test_cap=1000)
    s = {"method": "vpt-deep", "dataset": "cifar10", "seed": 0, "test_acc": 0.7554}
    assert log_result("02", s, budget, path=log)["test_acc"] == "75.5"
    log_result("03", {**s, "test_acc": 0.76}, budget, path=log)
    log_result("02", {**s, "test_acc": 0.75}, budget, path=log)                  # the lesson re-executed: replaced
    log_result("02", {**s, "test_acc": 0.80}, {**budget, "epochs": 20}, path=log)  # another budget: a row of its own
    log_result("01", {**s, "method": "linear", "test_acc": 0.5}, {**budget, "test_cap": None}, path=log)
    log_result("04", {**s, "method": "viapt"}, budget, label="viapt m=32", path=log)
    log_result("04", {**s, "method": "viapt"}, budget, label="viapt m=0", path=log)   # a label of its own
    capsys.readouterr()
    every = show_log(log)
    assert [r["method"] for r in every if r["lesson"] == "04"] == ["viapt m=0", "viapt m=32"]
    rows = [r for r in every if r["lesson"] != "04"]
    assert [(r["lesson"], r["method"], r["epochs"], r["test_acc"]) for r in rows] == [
        ("01", "linear", "5", "50.0"), ("02", "vpt-deep", "5", "75.0"), ("02", "vpt-deep", "20", "80.0"),
        ("03", "vpt-deep", "5", "76.0")]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 + 6 and "| 01 | linear | cifar10 | 400 | 5 | 112 | 0.005 | 0 | — | 50.0 |" in printed
    assert show_log(tmp_path / "none.csv") == []
    capsys.readouterr()
    assert [r["lesson"] for r in show_log(log, upto="02")] == ["01", "02", "02"]       # what lessons 01-02 have seen
    assert len(capsys.readouterr().out.splitlines()) == 2 + 3
