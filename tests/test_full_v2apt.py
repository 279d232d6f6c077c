"""The full V²APT: every switch off gives back the method its part came from, with identical logits and losses."""
import copy

import pytest
import torch

import vapt_min.train as T
from vapt_min.full_v2apt import FullV2APTPrompts
from vapt_min.prompts import PromptedViT
from vapt_min.vit import ViT

from conftest import tiny_vit

# A ViT-Ti/16 on 48 px inputs (a 3×3 grid): the real shapes of the CLI's models, random weights, fast.
BASE = dict(weights="random", img_size=48, num_prompts=6, inst_prompts=2, pca_dim=8, pca_refresh=2, mg_prompts=3)
# full-v2apt switches → the source method (and its options) that must come out, exactly
REDUCTIONS = [
    (dict(vae=False, pca=False, guide=False, kv_bias=False), dict(method="vpt-deep")),
    (dict(vae=True, pca=False, guide=False, kv_bias=False), dict(method="v2apt")),
    (dict(vae=False, pca=True, guide=False, kv_bias=False), dict(method="viapt", viapt_instance=False)),
    (dict(vae=False, pca=True, guide=False, kv_bias=False, viapt_history="centred"),   # ViaPT's rule passes through
     dict(method="viapt", viapt_instance=False, viapt_history="centred")),
    (dict(vae=False, pca=False, guide=True, kv_bias=False), dict(method="davpt")),
    (dict(vae=False, pca=False, guide=True, kv_bias=True), dict(method="davpt+")),
]
C = 5


def build(vit, **kw):
    cfg = T.Config(**{**BASE, **kw}).validate()
    model = T.build_model(cfg, copy.deepcopy(vit), C)
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero head, so the logits depend on everything before it
        model.head.weight.normal_(), model.head.bias.normal_()
    return model


def source_name(full_key: str, src_keys) -> str:
    """The source method's name for a full-v2apt tensor: the parts keep their modules, under vae. / domain."""
    for cand in (full_key, full_key.replace("generator.vae.", "generator."), full_key.replace("generator.domain.", "generator."),
                 full_key.replace("generator.guidance.", "generator."),
                 "generator.domain" if full_key == "generator.domain.prompts" else None):
        if cand in src_keys:
            return cand
    raise KeyError(full_key)


def share_parameters(full, src):
    """Load the source model's tensors into the full model (every tensor of each must have its counterpart)."""
    src_sd, full_sd = src.state_dict(), full.state_dict()
    names = {k: source_name(k, src_sd) for k in full_sd}
    assert sorted(names.values()) == sorted(src_sd), "the two models must hold the same tensors"
    full.load_state_dict({k: src_sd[v] for k, v in names.items()})


def run(model, x, y, seed):
    torch.manual_seed(seed)  # dropout and the VAE's sampling draw the same numbers in both models
    logits, aux = model(x, y)
    return logits, {k: v.detach() for k, v in aux.items()}


@pytest.mark.parametrize("switches,source", REDUCTIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_switch_off_reduces_to_its_source_method(switches, source):
    torch.manual_seed(0)
    vit = ViT(img_size=48, patch_size=16, dim=192, depth=12, num_heads=3, num_classes=0)
    full, src = build(vit, method="full-v2apt", **switches), build(vit, **source)
    share_parameters(full, src)
    assert full.param_counts() == src.param_counts()
    x, y = torch.randn(6, 3, 48, 48), torch.tensor([0, 1, 2, 3, 4, 0])
    if hasattr(src.generator, "update_map"):
        means = torch.randn(C, 192)
        assert full.generator.update_map(means) == src.generator.update_map(means)
    for step in range(3):  # training mode (dropout, sampling, running PCA and its refresh every 2 steps), then eval
        full.train(), src.train()
        (lf, af), (ls, as_) = run(full, x, y, step), run(src, x, y, step)
        assert torch.equal(lf, ls)
        assert af.keys() == as_.keys() and all(torch.equal(af[k], as_[k]) for k in af)
        (lf.sum() + sum(af.values())).backward(), (ls.sum() + sum(as_.values())).backward()
    grads = {n: p.grad for n, p in src.named_parameters() if p.requires_grad}
    src_keys = dict(src.named_parameters())
    for n, p in full.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[source_name(n, src_keys)], rtol=0, atol=0)
    full.eval(), src.eval()
    assert torch.equal(run(full, x, None, 9)[0], run(src, x, None, 9)[0])


def test_the_full_model_composes_every_part():
    torch.manual_seed(0)
    vit = ViT(img_size=48, patch_size=16, dim=192, depth=12, num_heads=3, num_classes=0)
    full = build(vit, method="full-v2apt")
    gen = full.generator
    assert gen.vae is not None and gen.domain.m == 8 and gen.guidance is not None
    assert full.vit.blocks[0].attn.kv_bias.requires_grad                   # DA-VPT+'s biases train
    gen.update_map(torch.randn(C, 192))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape)) for b in full.vit.blocks]
    full.train()
    logits, aux = full(torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3]))
    for h in hooks:
        h.remove()
    assert all(s == (4, 1 + 6 + 9, 192) for s in seen)                     # VPT-Deep's token count in every block
    assert set(aux) == {"kl", "kl_floor", "mg_visual", "mg_cls"}             # the VAE's free bits by default
    assert full.aux_weights() == {"kl": 0.01, "kl_floor": 0.01, "mg_visual": 0.01, "mg_cls": 0.01}
    T.total_loss(logits, torch.tensor([0, 1, 2, 3]), aux, full.aux_weights())[0].backward()
    for name in ("generator.vae.film.weight", "generator.vae.base", "generator.domain.prompts", "generator.domain.new.0",
                 "vit.blocks.11.attn.kv_bias"):
        g = dict(full.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name
    full.eval()                                                             # z = μ: deterministic
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(full(x)[0], full(x)[0])


def test_history_uses_the_domain_outputs_only():
    # With the VAE on, ViaPT's history must see block i-1's domain outputs, not its instance outputs.
    vit = tiny_vit()
    gen = FullV2APTPrompts(5, 48, 3, 8, grid=4, vae=True, inst_prompts=2, pca_dim=4)
    gen.train()
    tokens, prompts = torch.randn(2, 17, 48), torch.randn(2, 5, 48)
    seen = []
    gen.domain.register_forward_pre_hook(lambda m, a: seen.append(a[2]))
    gen(0, tokens, None, {})                                                # encodes the image, block 0's prompts
    out = gen(1, tokens, prompts, {})
    assert out.shape == (2, 5, 48) and seen[0] is None and torch.equal(seen[1], prompts[:, 2:])


def test_guidance_proxies_with_pca_are_the_batch_mean_of_the_domain_prompts():
    vit = tiny_vit()
    guide = dict(blocks=vit.blocks, num_classes=4, guided_layers=(2,), num_guided=2)
    gen = FullV2APTPrompts(5, 48, 3, 8, grid=4, vae=False, pca_dim=4, guide=guide)
    gen.update_map(torch.randn(4, 48))
    gen.train()
    gen.targets = torch.tensor([0, 1, 2])
    got = {}
    gen.guidance.guide = lambda i, tokens, aux, prompts, proxy_prompts: got.update(prompts=prompts, proxies=proxy_prompts)
    out = gen(2, torch.randn(3, 17, 48), torch.randn(3, 5, 48), {})
    assert torch.equal(got["prompts"], out) and torch.equal(got["proxies"], out[:, :2].mean(0))


@pytest.mark.parametrize("args,message", [
    (["--method", "full-v2apt", "--inst-prompts", "10"], "no domain prompts left"),
    (["--method", "full-v2apt", "--mg-prompts", "6"], "must be in [1, 5] (num_guided, of the prompts it can guide"),
    (["--method", "full-v2apt", "--pca-dim", "0"], "--no-pca"),
    (["--method", "full-v2apt", "--no-vae", "--eval-samples", "3"], "full-v2apt --no-vae"),
    (["--method", "full-v2apt", "--no-kv-bias", "--bias-extended"], "--bias-extended"),
    (["--method", "full-v2apt", "--no-vae-slots", "static"], "--no-vae-slots static says who takes the VAE's slots"),
    (["--method", "full-v2apt", "--no-vae", "--no-vae-slots", "pca"], "--no-vae-slots: unknown 'pca'"),
])
def test_bad_full_options_are_named(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        T.config_from_args(args + ["--weights", "random"])


def test_no_vae_has_no_latent_to_sample():
    gen = FullV2APTPrompts(5, 48, 3, 8, grid=4, vae=False)
    assert gen.eval_samples == 1
    with pytest.raises(ValueError, match="--no-vae"):
        gen.eval_samples = 3


def test_the_ablation_without_the_vae_keeps_every_other_part_s_prompt_count():
    """--no-vae --no-vae-slots static: the instance slots stay, as static prompts; the PCA-carried, guided domain
    prompts are as many as in the full model (removing the VAE does not also double them, as --no-vae alone does)."""
    vit = ViT(img_size=48, patch_size=16, dim=192, depth=12, num_heads=3, num_classes=0)
    full = build(vit, method="full-v2apt")
    ablated = build(vit, method="full-v2apt", vae=False, no_vae_slots="static")
    folded = build(vit, method="full-v2apt", vae=False)
    assert ablated.generator.n_inst == full.generator.n_inst == BASE["inst_prompts"]
    n_dom = lambda m: m.generator.domain.prompts.shape[1]
    assert n_dom(ablated) == n_dom(full) == 6 - 2
    assert folded.generator.n_inst == 0 and n_dom(folded) == 6                             # the confounded reading
    assert ablated.generator.guidance.map.num_proxies == full.generator.guidance.map.num_proxies
    x = torch.randn(2, 3, 48, 48)
    seen = []
    hook = ablated.vit.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    ablated.eval()(x)
    hook.remove()
    assert seen[0].shape[1] == 1 + 6 + 9                                                   # VPT-Deep's token count
    torch.testing.assert_close(seen[0][:, 1:3], ablated.generator.static.prompts[1].expand(2, -1, -1))  # block 1
    from vapt_min.probe import inserted_scale
    scale = inserted_scale(ablated, x)["static"]                                          # the diagnostics name them
    assert len(scale) == 12 and all(v > 0 for v in scale)


def test_static_slots_with_every_other_part_off_is_vpt_deep():
    vit = ViT(img_size=48, patch_size=16, dim=192, depth=12, num_heads=3, num_classes=0)
    off = dict(vae=False, pca=False, guide=False, kv_bias=False, no_vae_slots="static")
    full, deep = build(vit, method="full-v2apt", **off), build(vit, method="vpt-deep")
    with torch.no_grad():
        full.generator.static.prompts.copy_(deep.generator.prompts[:, :2])
        full.generator.domain.prompts.copy_(deep.generator.prompts[:, 2:])
        full.head.load_state_dict(deep.head.state_dict())
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(full.eval()(x)[0], deep.eval()(x)[0], rtol=0, atol=0)
