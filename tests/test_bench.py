"""The benchmarks run end to end on tiny configurations and print well-formed tables: speed on random weights,
infer on a real run trained for a few steps."""
import pytest

from conftest import need
from vapt_min import train as T
from vapt_min.bench import infer, main, speed
from vapt_min.data import data_root


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
    assert out.count("\n| ") == 4 and "| v2apt | 31,706 |" in out


def test_unknown_method_is_an_error():
    with pytest.raises(SystemExit):
        main(["speed", "--methods", "vpt-huge"])


def test_speed_runs_every_prompt_method():
    methods = ["vpt-deep", "vapt", "viapt", "davpt", "davpt+"]
    rows = speed(methods, "vit_tiny_patch16_32", img_size=32, batch_size=4, rounds=1, steps=1, device="cpu")
    assert [r["trainable_params"] for r in rows] == [24_970, 9_480 + 1_930, 21_540 + 1_930, 24_970, 24_970 + 4_608]
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
