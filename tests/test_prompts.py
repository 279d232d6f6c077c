"""VPT semantics: where prompts go, what they replace, what trains, how many parameters."""
import math

import pytest
import torch

from conftest import block_inputs, tiny_vit
from vapt_min.prompts import DeepPrompts, PromptedViT, PromptGenerator, ShallowPrompts, prompt_init_bound

P, D, L = 4, 48, 3




def test_token_layout_and_no_position_embedding_on_prompts():
    vit = tiny_vit()
    model = PromptedViT(vit, 5, DeepPrompts(P, D, L, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    seq = block_inputs(model, x)[0]                                       # (B, 1+P+N, D)
    assert seq.shape == (2, 1 + P + 16, D)
    tokens = vit.embed(x)                                                 # [CLS | patches] + pos
    torch.testing.assert_close(seq[:, :1], tokens[:, :1])                 # CLS first
    torch.testing.assert_close(seq[:, 1:1 + P], model.generator.prompts[0].expand(2, -1, -1))  # raw prompts: no pos
    torch.testing.assert_close(seq[:, 1 + P:], tokens[:, 1:])            # patches last


def test_deep_prompts_replace_previous_outputs():
    model = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8)).eval()
    seqs = block_inputs(model, torch.randn(2, 3, 32, 32))
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(seq[:, 1:1 + P], model.generator.prompts[i].expand(2, -1, -1))


def test_shallow_prompts_are_carried():
    model = PromptedViT(tiny_vit(), 5, ShallowPrompts(P, D, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    seqs = block_inputs(model, x)
    out0 = model.vit.blocks[0](seqs[0])
    torch.testing.assert_close(seqs[1][:, 1:1 + P], out0[:, 1:1 + P])    # block 1 sees block 0's prompt outputs
    torch.testing.assert_close(seqs[0][:, 1:1 + P], model.generator.prompts.expand(2, -1, -1))


def test_linear_probe_equals_frozen_features():
    vit = tiny_vit()
    model = PromptedViT(vit, 5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, aux = model.forward_features(x)
        torch.testing.assert_close(feats, vit.forward_features(x))
    assert aux == {}


@pytest.mark.parametrize("method", ["shallow", "deep", "linear", "full"])
def test_parameter_counts_and_trainable_set(method):
    vit, C = tiny_vit(), 5
    gen = {"shallow": ShallowPrompts(P, D, 8), "deep": DeepPrompts(P, D, L, 8)}.get(method)
    model = PromptedViT(vit, C, gen, train_backbone=method == "full")
    backbone = sum(p.numel() for p in vit.parameters())
    prompts = {"shallow": P * D, "deep": L * P * D, "linear": 0, "full": 0}[method]
    trainable, total = model.param_counts()
    assert trainable == prompts + D * C + C + (backbone if method == "full" else 0)
    assert total == backbone + prompts + D * C + C
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if method != "full":
        assert names == {"head.weight", "head.bias"} | ({"generator.prompts"} if gen else set())
    assert model.param_summary().startswith(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: ")


def test_vit_b16_deep_prompt_count():
    assert sum(p.numel() for p in DeepPrompts(10, 768, 12, 16).parameters()) == 92_160   # L·P·D
    assert sum(p.numel() for p in ShallowPrompts(10, 768, 16).parameters()) == 7_680     # P·D


def test_init_range():
    bound = prompt_init_bound(16, 768)
    assert bound == pytest.approx(math.sqrt(6 / (3 * 16 * 16 + 768)))
    w = DeepPrompts(50, 768, 12, 16).prompts
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound  # uniform over the whole range
    assert abs(w.mean().item()) < 0.01 * bound  # centred on 0


def test_backbone_frozen_and_in_eval_mode_while_training():
    model = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8), prompt_dropout=0.5).train()
    assert model.training and model.generator.training and not model.vit.training
    assert not any(m.training for m in model.vit.modules())
    logits, _ = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert all(p.grad is None for p in model.vit.parameters())
    assert model.generator.prompts.grad is not None and model.head.weight.grad is not None
    full = PromptedViT(tiny_vit(), 5, train_backbone=True).train()
    assert full.vit.training


def test_head_starts_at_zero():
    model = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8))
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0  # loss starts at ln(classes)


def test_prompt_dropout_only_while_training():
    model = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8), prompt_dropout=0.5)
    torch.nn.init.normal_(model.head.weight)  # non-zero logits, so the eval comparison below means something
    x = torch.randn(2, 3, 32, 32)
    model.train()
    a, b = block_inputs(model, x)[0], block_inputs(model, x)[0]
    assert not torch.equal(a[:, 1:1 + P], b[:, 1:1 + P])                     # dropout masks differ
    torch.testing.assert_close(a[:, 1 + P:], b[:, 1 + P:])                   # patches untouched
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])


def test_attention_maps_include_prompts():
    model = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8)).eval()
    maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    assert len(maps) == L and maps[0].shape == (2, 3, 1 + P + 16, 1 + P + 16)


def test_bad_input():
    with pytest.raises(ValueError, match="num_prompts"):
        DeepPrompts(0, D, L, 8)
    with pytest.raises(ValueError, match="num_classes"):
        PromptedViT(tiny_vit(), 0)
    with pytest.raises(ValueError, match="full fine-tuning"):
        PromptedViT(tiny_vit(), 5, ShallowPrompts(P, D, 8), train_backbone=True)


def returned_and_entered(model, x):
    """Per block: the prompts the generator returned, and the prompt slots of the sequence that entered the block."""
    returned, original = {}, model.generator.forward
    model.generator.forward = lambda i, t, p, a: returned.setdefault(i, original(i, t, p, a))
    entered = block_inputs(model, x)
    del model.generator.forward
    P = next(v for v in returned.values() if v is not None).shape[1]
    return returned, [e[:, 1:1 + P] for e in entered]


@pytest.mark.parametrize("dropout_on", ["learnable", "all"])
def test_prompt_dropout_acts_on_learnable_prompts_only(dropout_on):
    """As the official VPT and VAPT codes: VAPT's generated prompts and ViaPT's carried history enter their blocks as
    the generator made them; the learnable prompt tensors are dropped. dropout_on="all" (the earlier rule) drops all."""
    from vapt_min.adaptive_prompt import AdaptivePrompts
    from vapt_min.pca_fusion import ViaPTPrompts
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    vapt = PromptedViT(tiny_vit(), 5, AdaptivePrompts(P, D, L, 8, grid=4), prompt_dropout=0.9, dropout_on=dropout_on)
    for layer in vapt.generator.layers:
        torch.nn.init.normal_(layer.token_map.weight)
    returned, entered = returned_and_entered(vapt.train(), x)
    assert (entered[0] == 0).float().mean() > 0.5                       # block 0: learnable static prompts, dropped
    generated_kept = all(torch.equal(entered[i], returned[i]) for i in range(1, L))
    assert generated_kept == (dropout_on == "learnable")
    gen = ViaPTPrompts(P, D, L, 8, grid=4, pca_dim=4, instance=False)
    viapt = PromptedViT(tiny_vit(), 5, gen, prompt_dropout=0.9, dropout_on=dropout_on).train()
    viapt(x)                                                            # running statistics
    seen = []
    gen.drop = lambda t: seen.append(t) or PromptGenerator.drop(gen, t)
    returned, entered = returned_and_entered(viapt, x)
    del gen.drop
    learnt = [gen.new[i - 1] @ gen.pcas[i - 1].basis[:, 4:].T for i in range(1, L)]
    assert all(torch.equal(s, l.expand_as(s)) for s, l in zip(seen[1:], learnt))  # only W_i C_mᵀ passes through drop
    assert all(torch.equal(entered[i], returned[i]) for i in range(1, L)) == (dropout_on == "learnable")


def test_unknown_dropout_rule_is_named():
    with pytest.raises(ValueError, match="--prompt-dropout-on: unknown 'some'"):
        PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8), dropout_on="some")


def test_head_starts_at_zero_by_default_and_at_timm_or_the_official_vpt_init_on_request():
    """zero: every logit 0 and, through the head, no gradient for the prompts at the first step (the plateau at chance
    the structured tasks showed); vpt: He-normal weights over fan_out (std √(2/classes)), the bias at nn.Linear's;
    timm: std 0.02, bias 0."""
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    zero = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8)).eval()
    logits, _ = zero(x)
    assert torch.equal(logits, torch.zeros(4, 5))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert torch.equal(zero.generator.prompts.grad, torch.zeros_like(zero.generator.prompts))
    torch.manual_seed(0)
    big = PromptedViT(tiny_vit(), 500, DeepPrompts(P, D, L, 8), head_init="vpt").eval()
    assert big.head.weight.std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.05)
    assert big.head.weight.mean().abs().item() < 0.01 and big.head.bias.abs().max().item() <= 1 / math.sqrt(D)
    assert big.head.bias.abs().sum().item() > 0
    vpt = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8), head_init="vpt").eval()
    logits, _ = vpt(x)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert vpt.generator.prompts.grad.abs().sum().item() > 0
    torch.manual_seed(0)
    timm = PromptedViT(tiny_vit(), 500, DeepPrompts(P, D, L, 8), head_init="timm").eval()
    assert timm.head.weight.std().item() == pytest.approx(0.02, rel=0.05)  # cut at ±2 absolute, as timm's: 100 std
    assert timm.head.weight.abs().max().item() <= 2 and torch.equal(timm.head.bias, torch.zeros(500))
    with pytest.raises(ValueError, match="--head-init: unknown 'ones'"):
        PromptedViT(tiny_vit(), 5, head_init="ones")
