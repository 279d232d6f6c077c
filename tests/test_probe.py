"""The diagnostics on constructed cases: a generator that ignores the image, one that reads it, a latent in bits."""
import math

import pytest
import torch

from conftest import tiny_vit
from vapt_min import probe
from vapt_min.adaptive_prompt import AdaptivePrompts
from vapt_min.pca_fusion import ViaPTPrompts
from vapt_min.prompts import DeepPrompts, PromptedViT, PromptGenerator
from vapt_min.vae_prompt import VAEPrompts

C, P, D, L = 5, 4, 48, 3


class ImagePrompts(PromptGenerator):
    """A generator that is nothing but its image: P copies of the mean patch token, scaled up."""

    def forward(self, i, tokens, prompts, aux):
        return 20 * tokens[:, 1:].mean(1, keepdim=True).expand(-1, P, -1)


def batches(n=4, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, C, (b,), generator=g)) for _ in range(n)]


def model_with(gen, seed=0):
    torch.manual_seed(seed)
    model = PromptedViT(tiny_vit(), C, gen).eval()
    torch.nn.init.normal_(model.head.weight)                    # a head that reads the features
    return model


def test_a_generator_that_ignores_the_image_changes_nothing():
    r = probe.swap_test(model_with(DeepPrompts(P, D, L, 8)), batches(), torch.device("cpu"))
    assert r["changed_swapped"] == r["changed_null"] == 0.0
    assert r["acc_own"] == r["acc_swapped"] == r["acc_null"] and r["images"] == 32


def test_a_generator_that_reads_the_image_changes_predictions():
    r = probe.swap_test(model_with(ImagePrompts()), batches(), torch.device("cpu"))
    assert r["changed_swapped"] > 0.1 and r["changed_null"] > 0.1
    vapt = model_with(AdaptivePrompts(P, D, L, 8, grid=4))
    for layer in vapt.generator.layers:                         # the token maps start at zero: give them weights
        torch.nn.init.normal_(layer.token_map.weight, std=1.0)
    assert probe.swap_test(vapt, batches(), torch.device("cpu"))["changed_swapped"] > 0


def test_the_swap_feeds_another_image_and_the_null_input_is_the_same_for_all():
    x = torch.arange(3.0)[:, None, None].expand(3, 2, 4)
    assert torch.equal(probe.derangement(x)[:, 0, 0], torch.tensor([1.0, 2.0, 0.0]))  # nobody keeps their own
    assert torch.equal(probe.batch_mean(x)[:, 0, 0], torch.tensor([1.0, 1.0, 1.0]))
    class Recording(ImagePrompts):
        def forward(self, i, tokens, prompts, aux):
            self.seen = tokens
            return super().forward(i, tokens, prompts, aux)
    gen = Recording()
    with probe.fed(gen, probe.derangement):
        gen(0, x, None, {})
    assert torch.equal(gen.seen, probe.derangement(x))
    gen(0, x, None, {})
    assert torch.equal(gen.seen, x) and "forward" not in gen.__dict__          # restored after the block


def test_batches_of_one_image_are_skipped():
    r = probe.swap_test(model_with(ImagePrompts()), [(torch.randn(1, 3, 32, 32), torch.tensor([0]))], torch.device("cpu"))
    assert r["images"] == 1 and r["acc_own"] == 0.0                         # nothing counted, no division by zero


def test_latent_information_in_bits():
    model = model_with(VAEPrompts(P, 2, D, L, 8, latent_dim=4))
    with torch.no_grad():
        model.generator.to_latent.bias[:4] = 1.0                             # μ = 1 on 4 dims, σ = 1: KL = 2 nats
        model.generator.to_latent.weight.zero_()
    r = probe.latent_information(model, batches(), torch.device("cpu"))
    assert r["kl_nats"] == pytest.approx(2.0) and r["kl_bits"] == pytest.approx(2.0 / math.log(2))
    # ... but every image gets the same posterior: z says nothing about the image, whatever the KL
    assert r["mi_nats"] == pytest.approx(0.0, abs=1e-9) and r["mi_bits"] == r["mi_nats"] / math.log(2)
    assert r["collapsed"]
    with torch.no_grad():                          # μ depends on the image, σ small: z tells the images apart
        model.generator.to_latent.weight[:4].normal_(std=3.0)
        model.generator.to_latent.bias[4:] = -12.0                           # σ = e^-6
    r = probe.latent_information(model, batches(), torch.device("cpu"))
    assert r["mi_bits"] == pytest.approx(r["mi_max_bits"], abs=0.05) and not r["collapsed"]
    assert r["mi_max_bits"] == pytest.approx(math.log2(sum(len(y) for _, y in batches())))
    assert probe.latent_information(model_with(DeepPrompts(P, D, L, 8)), batches(), torch.device("cpu")) is None


def test_mutual_information_against_numerical_integration():
    # two images, 1-D posteriors N(−a, 1) and N(+a, 1): I = H(½ N(−a,1) + ½ N(a,1)) − H(N(0, 1)), integrated on a grid
    for a in (0.0, 0.5, 1.5, 4.0):
        z = torch.linspace(-30, 30, 200001, dtype=torch.float64)
        p = 0.5 * (torch.exp(-0.5 * (z + a) ** 2) + torch.exp(-0.5 * (z - a) ** 2)) / math.sqrt(2 * math.pi)
        h_mix = -float((p * torch.log(p.clamp_min(1e-300))).sum() * (z[1] - z[0]))
        exact = h_mix - 0.5 * math.log(2 * math.pi * math.e)
        mu, logvar = torch.tensor([[-a], [a]]), torch.zeros(2, 1)
        assert probe.mutual_information(mu, logvar, samples=20000) == pytest.approx(exact, abs=0.01)
    assert exact == pytest.approx(math.log(2), abs=1e-3)      # far apart: one bit, the most two images can say


def test_mutual_information_in_chunks_equals_all_at_once():
    # the chunks only bound the memory (a 10,000-image test set ran out of it at once): same draws, same value
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(37, 3, generator=g) * 2, torch.randn(37, 3, generator=g) - 1
    whole = probe.mutual_information(mu, logvar, chunk=37)
    for chunk in (1, 5, 36, 100):
        assert probe.mutual_information(mu, logvar, chunk=chunk) == pytest.approx(whole, rel=1e-12)
    z = mu.double() + torch.randn(mu.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * \
        (0.5 * logvar.double()).exp()                          # the first of the 8 draws, written out once
    logq = probe.gaussian_log_density(z, mu.double(), logvar.double())
    first = float((logq.diagonal() - (logq.logsumexp(1) - math.log(37))).mean())
    assert probe.mutual_information(mu, logvar, samples=1, chunk=5) == pytest.approx(first, rel=1e-12)


def test_inserted_scale_names_the_parts_and_they_add_up():
    x = batches(1)[0][0]
    v2 = model_with(VAEPrompts(P, 2, D, L, 8, latent_dim=4, film_init="small", encode_at=0))   # an image part in every block
    scale = probe.inserted_scale(v2, x)
    assert set(scale) == {"prompts", "instance", "instance base", "instance image part", "domain"}
    assert all(len(v) == L and all(t > 0 for t in v) for v in scale.values())
    inst = v2.generator._inst[:, 1]
    torch.testing.assert_close(v2.generator.parts(1, None, None)["instance base"] +
                               v2.generator.parts(1, None, None)["instance image part"], inst)
    gen = ViaPTPrompts(P, D, L, 8, grid=4, pca_dim=8, instance=False)
    viapt = model_with(gen).train()
    viapt(x)                                                                 # running statistics
    viapt.eval()
    scale = probe.inserted_scale(viapt, x)
    assert {"prompts", "dataset", "mean", "kept history", "learnt"} == set(scale)
    assert math.isnan(scale["mean"][0]) and not math.isnan(scale["mean"][1])  # block 0 has no history
    seen = {}
    original = gen.forward
    gen.forward = lambda i, t, p, a: seen.setdefault(i, (original(i, t, p, a), gen.parts(i, t, p)))[0]
    viapt(x)
    del gen.forward
    out, parts = seen[2]
    torch.testing.assert_close(parts["mean"] + parts["kept history"] + parts["learnt"], out)


def test_loss_balance_weights_every_term():
    rows = [{"epoch": 1, "ce": 2.0, "kl": 3.0, "loss": 2.03}, {"epoch": 2, "ce": 1.0, "kl": 5.0, "loss": 1.05}]
    assert probe.loss_balance(rows, {"kl": 0.01}) == [
        {"epoch": 1, "ce": 2.0, "kl": 3.0, "kl_weighted": 0.03}, {"epoch": 2, "ce": 1.0, "kl": 5.0, "kl_weighted": 0.05}]


def test_every_run_reports_the_swap_test_and_the_latent_in_summary_json(tmp_path, capsys):
    import json

    from PIL import Image

    from vapt_min import train as T
    for split, n in (("train", 12), ("test", 2)):
        for c in ("ant", "bee"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (20 * i, 100 if c == "ant" else 200, 30)).save(tmp_path / "imgs" / split / c / f"{i}.png")
    args = ["--dataset", f"folder:{tmp_path / 'imgs'}", "--weights", "random", "--img-size", "32", "--n-train", "12",
            "--n-val", "8", "--batch-size", "4", "--epochs", "1", "--no-progress"]
    s = T.train(T.config_from_args([*args, "--method", "v2apt", "--out", str(tmp_path / "v2")]))
    assert json.loads((tmp_path / "v2" / "summary.json").read_text())["probe"] == s["probe"]
    assert s["probe"]["swap"]["images"] == 8 and 0 <= s["probe"]["swap"]["changed_swapped"] <= 1
    assert s["probe"]["latent"]["kl_bits"] == pytest.approx(s["probe"]["latent"]["kl_nats"] / math.log(2))
    s = T.train(T.config_from_args([*args, "--method", "vpt-deep", "--out", str(tmp_path / "deep")]))
    assert s["probe"] == {}                                 # VPT-Deep's prompts read no image: no swap test to run
    assert T.train(T.config_from_args([*args, "--method", "linear", "--out", str(tmp_path / "lin")]))["probe"] == {}
    # and the command that prints every diagnostic of trained runs, on their test split
    from vapt_min.bench import main as bench_main
    capsys.readouterr()
    bench_main(["probe", str(tmp_path / "v2"), str(tmp_path / "deep"), "--csv", str(tmp_path / "probe.csv")])
    out = capsys.readouterr().out
    import csv
    rows = list(csv.DictReader(open(tmp_path / "probe.csv")))          # the same figures, one row per run
    assert [r["method"] for r in rows] == ["v2apt", "vpt-deep"] and rows[0]["images"] == "4"
    assert float(rows[1]["changed_swapped"]) == 0 and rows[1]["mi_bits"] == "" and float(rows[0]["mi_bits"]) >= 0
    assert float(rows[0]["kl_bits"]) > 0
    v2_row = next(l for l in out.splitlines() if l.startswith(f"| {tmp_path / 'v2'} "))
    deep_row = next(l for l in out.splitlines() if l.startswith(f"| {tmp_path / 'deep'} "))
    assert "| I " in v2_row and "(KL " in v2_row and "| — |" in deep_row and "| 0.0 % / 0.0 % |" in deep_row
    assert "mean norm of an inserted prompt token, per block" in out and "instance image part" in out
    # --split val: the run's 8 validation images instead of its 4 test images (random weights: the rebuilt backbone is
    # drawn anew, so its figures are not summary.json's; test_bench checks those on the real weights)
    bench_main(["probe", str(tmp_path / "v2"), "--split", "val", "--csv", str(tmp_path / "val.csv")])
    row = next(csv.DictReader(open(tmp_path / "val.csv")))
    assert row["method"] == "v2apt" and row["images"] == "8" and 0 <= float(row["changed_swapped"]) <= 1


def test_davpt_diagnostics_read_the_guided_block():
    from vapt_min.metric_guidance import MetricGuidedPrompts
    vit = tiny_vit()
    model = PromptedViT(vit, C, MetricGuidedPrompts(P, D, L, 8, vit.blocks, C)).eval()
    d = model.generator.diagnostics(model, torch.randn(6, 3, 32, 32))
    assert set(d) == {"query cos, CLS vs CLS", "query cos, CLS vs proxies", "raw cos, CLS vs CLS",
                      "raw cos, CLS vs proxies", "patch attention to prompts"}
    assert all(-1 <= v <= 1 for k, v in d.items() if "cos" in k) and 0 < d["patch attention to prompts"] < 1
    maps = model.attention_maps(torch.randn(6, 3, 32, 32))
    assert maps[-1].shape[-1] == 1 + P + 16                                  # the share read rows 1+P.. and columns 1..P


@pytest.mark.parametrize("method,extra", [(m, {}) for m in ("vpt-shallow", "vpt-deep", "v2apt", "viapt", "vapt", "davpt",
                                                                "davpt+", "full-v2apt")]
                         + [("full-v2apt", dict(vae=False, pca=False)), ("full-v2apt", dict(vae=False))])
def test_every_generator_keeps_its_reads_image_flag(method, extra):
    """reads_image False lets every run skip its swap test (probe.cheap): the flag must say whether the evaluated
    prompts depend on the image. Every parameter is randomised first, so that a zero initialisation (VAPT's token maps,
    V²APT's FiLM) cannot hide a path from the image."""
    from vapt_min.build import build_model
    from vapt_min.train import Config
    torch.manual_seed(0)
    model = build_model(Config(method=method, img_size=32, num_prompts=P, mg_prompts=2, inst_prompts=2, **extra),
                        tiny_vit(), C).eval()
    with torch.no_grad():
        for t in model.generator.parameters():
            t.normal_(0, 0.5)
        torch.nn.init.normal_(model.head.weight)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(x)[0]
        with probe.fed(model.generator, probe.derangement):
            swapped = model(x)[0]
    assert (not torch.equal(own, swapped)) == model.generator.reads_image, (method, extra)
    assert (probe.cheap(model, [(x[i], 0) for i in range(6)], torch.device("cpu"), False) == {}) \
        == (not model.generator.reads_image)
