"""DA-VPT: Proxy-Anchor against pytorch-metric-learning and by hand, cosine k-means against sklearn, the class → prompt
map, the generator (VPT-Deep when unguided, its losses, their gradients) and DA-VPT+ bias tuning."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import block_inputs, tiny_vit
from vapt_min.metric_guidance import (ClassPromptMap, MetricGuidedPrompts, class_means, cosine_kmeans,
                                      enable_bias_tuning, mean_per_class, proxy_anchor_loss)
from vapt_min.prompts import DeepPrompts, PromptedViT
from vapt_min import train as T
from vapt_min.vit import ViT

P, D, L, C = 4, 48, 3, 6


# ---------------------------------------------------------------------------------------------------------
# Proxy-Anchor


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proxy_anchor_equals_pytorch_metric_learning(seed):
    from pytorch_metric_learning.losses import ProxyAnchorLoss
    g = torch.Generator().manual_seed(seed)
    n_cls, E = 7, 16
    emb, proxies = torch.randn(12, E, generator=g), torch.randn(n_cls, E, generator=g)
    labels = torch.randint(0, 4, (12,), generator=g) if seed == 2 else torch.randint(0, n_cls, (12,), generator=g)
    if seed == 2:
        assert labels.unique().numel() < n_cls             # classes 4..6 have no positive in this batch
    ref = ProxyAnchorLoss(n_cls, E, margin=0.1, alpha=32)
    ref.proxies.data.copy_(proxies)
    torch.testing.assert_close(proxy_anchor_loss(emb, labels, proxies), ref(emb, labels), rtol=1e-5, atol=1e-5)


def test_proxy_anchor_all_normalisation_by_hand():
    # cos(e, p): e0·(p0, p1, p2) = (1, 0, -1), e1·(...) = (0, 1, 0); labels (0, 1); α = 2, δ = 0.5.
    emb = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    proxies = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1])
    e = math.e
    pos = [math.log(1 + e**-1), math.log(1 + e**-1), 0.0]                       # proxy 2 has no positive
    neg = [math.log(1 + e), math.log(1 + e), math.log(1 + e**-1 + e)]
    got_all = proxy_anchor_loss(emb, labels, proxies, alpha=2.0, delta=0.5, normalise="all")
    got_orig = proxy_anchor_loss(emb, labels, proxies, alpha=2.0, delta=0.5, normalise="original")
    assert got_all.item() == pytest.approx(sum(pos) / 3 + sum(neg) / 3, rel=1e-6)
    assert got_orig.item() == pytest.approx(sum(pos) / 2 + sum(neg) / 3, rel=1e-6)


def test_proxy_anchor_all_normalisation_with_loops():
    g = torch.Generator().manual_seed(3)
    emb, proxies = torch.randn(9, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3, 0, 1])                  # class 2 has no positive
    a, d = 32.0, 0.1
    cos = [[F.cosine_similarity(emb[i], proxies[c], dim=0).item() for c in range(4)] for i in range(9)]
    total = 0.0
    for c in range(4):
        total += math.log(1 + sum(math.exp(-a * (cos[i][c] - d)) for i in range(9) if labels[i] == c))
        total += math.log(1 + sum(math.exp(a * (cos[i][c] + d)) for i in range(9) if labels[i] != c))
    assert proxy_anchor_loss(emb, labels, proxies, normalise="all").item() == pytest.approx(total / 4, rel=1e-5)


def test_proxy_anchor_fp32_under_autocast():
    emb, proxies, labels = torch.randn(8, 16), torch.randn(5, 16), torch.arange(8) % 5
    with torch.autocast("cpu", torch.bfloat16):
        got = proxy_anchor_loss(emb, labels, proxies)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, proxy_anchor_loss(emb, labels, proxies))


@pytest.mark.parametrize("broken, match", [
    (dict(embeddings=torch.tensor([[float("nan"), 1.0], [0.0, 1.0]])), "non-finite"),
    (dict(proxies=torch.tensor([[float("inf"), 1.0], [0.0, 1.0], [1.0, 1.0]])), "non-finite"),
    (dict(labels=torch.tensor([0, 3])), "out of range"),
    (dict(labels=torch.tensor([-1, 0])), "out of range"),
    (dict(labels=torch.tensor([0.0, 1.0])), "integer"),
    (dict(embeddings=torch.randn(2, 3)), "mismatch"),
    (dict(labels=torch.tensor([0, 1, 1])), "mismatch"),
    (dict(embeddings=torch.randn(2, 2, 1)), "expected"),
    (dict(embeddings=torch.randn(0, 2), labels=torch.zeros(0, dtype=torch.long)), "empty"),
    (dict(normalise="sum"), "normalise"),
])
def test_proxy_anchor_fails_loudly(broken, match):
    args = dict(embeddings=torch.randn(2, 2), labels=torch.tensor([0, 1]), proxies=torch.randn(3, 2), normalise="original")
    with pytest.raises(ValueError, match=match):
        proxy_anchor_loss(**{**args, **broken})


# ---------------------------------------------------------------------------------------------------------
# Cosine k-means and the class → prompt map


def blobs(k=4, per=20, E=16, seed=0, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, E, generator=g), dim=1)
    x = centres.repeat_interleave(per, 0) + spread * torch.randn(k * per, E, generator=g)
    return F.normalize(x, dim=1), torch.arange(k).repeat_interleave(per)


@pytest.mark.parametrize("seed", [0, 1])
def test_cosine_kmeans_matches_sklearn(seed):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    x, truth = blobs(seed=seed)
    assign, centroids = cosine_kmeans(x, 4, seed=seed)
    ref = KMeans(4, n_init=10, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_score(ref, assign.numpy()) == 1.0
    assert adjusted_rand_score(truth.numpy(), assign.numpy()) == 1.0
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(4))
    again, _ = cosine_kmeans(x, 4, seed=seed)
    assert torch.equal(again, assign)                                    # deterministic
    warm, _ = cosine_kmeans(x, 4, init=centroids)
    assert torch.equal(warm, assign)                                     # a warm start at the solution stays there


def test_cosine_kmeans_never_leaves_a_cluster_empty():
    x = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)                # two distinct points, three clusters
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])          # the third centroid attracts nothing
    assign, _ = cosine_kmeans(x, 3, init=init)
    assert torch.bincount(assign, minlength=3).min() >= 1
    assert torch.equal(assign, cosine_kmeans(x, 3, init=init)[0])


def test_class_prompt_map_updates_and_stays_valid():
    x, _ = blobs(k=3, per=4, E=8)                                        # 12 "class means" in 3 groups
    m = ClassPromptMap(num_classes=12, num_guided=3, dim=8)
    with pytest.raises(ValueError, match="update_map"):
        m(torch.tensor([0]))
    assert m.update(x) == 12
    first = m.assign.clone()
    assert first.shape == (12,) and set(first.tolist()) == {0, 1, 2}     # every guided prompt used
    assert all(len(set(first[4 * g:4 * g + 4].tolist())) == 1 for g in range(3))  # one prompt per group
    assert m.update(x) == 0                                              # same means: same map
    moved = x.clone()
    moved[[0, 1]] = x[[4, 5]]                                            # classes 0, 1 now look like group 1
    assert m.update(moved) == 2
    assert m.assign[0] == m.assign[1] == first[4] and torch.equal(m.assign[2:], first[2:])
    assert torch.equal(m(torch.tensor([0, 5, 11])), m.assign[[0, 5, 11]])
    perm = torch.arange(12).roll(4)                                      # every class takes another group's mean
    m.update(x[perm])
    assert torch.equal(m.assign, first[perm])                            # warm start: a prompt keeps its direction
    with pytest.raises(ValueError, match="out of range"):
        m(torch.tensor([12]))


def test_fewer_classes_than_prompts_one_prompt_per_class():
    m = ClassPromptMap(num_classes=3, num_guided=5, dim=8)
    assert m.num_proxies == 3 and torch.equal(m.assign, torch.arange(3))  # prompts 3, 4 stay unguided
    assert m.update(torch.randn(3, 8)) == 0 and torch.equal(m.assign, torch.arange(3))


def test_class_means_frozen_and_prompted():
    vit = tiny_vit()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 0])) for _ in range(2)]
    with torch.no_grad():
        feats = torch.cat([vit.forward_features(x)[:, 0] for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    want = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(class_means(vit, batches, "cpu"), want)
    torch.testing.assert_close(mean_per_class(feats, labels, 3), want)
    with pytest.raises(ValueError, match="every class"):
        class_means(vit, batches, "cpu", num_classes=4)                  # class 3 has no image
    gen = MetricGuidedPrompts(P, D, L, 8, vit.blocks, 3)
    model = PromptedViT(vit, 3, gen).train()
    gen.targets = torch.tensor([0, 1])                                   # stale labels of another batch size
    prompted = class_means(model, batches, "cpu")
    assert model.training and gen.targets is None
    with torch.no_grad():
        feats = torch.cat([model.eval().forward_features(x)[0][:, 0] for x, _ in batches])
    torch.testing.assert_close(prompted, mean_per_class(feats, labels, 3))
    assert not torch.allclose(prompted, want)                            # prompts change the CLS


# ---------------------------------------------------------------------------------------------------------
# The generator


def guided_model(seed=0, **kw):
    """A guided model in §3.2's query space unless `space` says otherwise (the tests of the query-space formulas)."""
    vit = tiny_vit(seed)
    torch.manual_seed(seed)
    gen = MetricGuidedPrompts(P, D, L, 8, vit.blocks, C, **{"space": "query", **kw})
    model = PromptedViT(vit, C, gen)
    torch.nn.init.normal_(model.head.weight)
    gen.update_map(torch.randn(C, D, generator=torch.Generator().manual_seed(seed)))
    return model, gen


def test_same_init_and_parameters_as_deep_prompts():
    vit = tiny_vit()
    torch.manual_seed(5)
    deep = DeepPrompts(P, D, L, 8)
    torch.manual_seed(5)
    gen = MetricGuidedPrompts(P, D, L, 8, vit.blocks, C)
    assert torch.equal(deep.prompts, gen.prompts)
    assert [n for n, _ in gen.named_parameters()] == ["prompts"] and list(gen.state_dict()) == ["prompts", "map.assign", "map.centroids"]


@pytest.mark.parametrize("weights", [dict(lambda_visual=0.0, lambda_cls=0.0), dict(lambda_visual=1.0, lambda_cls=1.0)])
def test_logits_equal_vpt_deep(weights):
    model, gen = guided_model(guided_layers=(1, 2), num_guided=3, **weights)
    deep_vit = copy.deepcopy(model.vit)
    deep = PromptedViT(deep_vit, C, DeepPrompts(P, D, L, 8))
    deep.generator.prompts.data.copy_(gen.prompts.data)
    deep.head.load_state_dict(model.head.state_dict())
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 5])
    for mode in (True, False):
        model.train(mode), deep.train(mode)
        logits, aux = model(x, y if mode else None)
        assert torch.equal(logits, deep(x)[0])
        assert set(aux) == ({"mg_visual", "mg_cls"} if mode and weights["lambda_cls"] else set())


def test_losses_are_the_paper_terms_averaged_over_layers():
    model, gen = guided_model(guided_layers=(1, 2), num_guided=3, anchor="mean")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 5])
    seqs = block_inputs(model.train(), x)                                 # (B, 1+P+N, D) entering each block
    _, aux = model(x, y)
    ids = gen.map(y)
    vis, cls = [], []
    for i in (1, 2):
        blk = model.vit.blocks[i]
        q = lambda t: t @ blk.attn.qkv.weight[:D].T + blk.attn.qkv.bias[:D]
        proxies = q(blk.norm1(gen.prompts[i, :3]))                        # (G, D)
        vis.append(proxy_anchor_loss(seqs[i][:, 1 + P:].mean(1), ids, proxies))
        cls.append(proxy_anchor_loss(q(blk.norm1(seqs[i][:, 0])), ids, proxies))
    torch.testing.assert_close(aux["mg_visual"], (vis[0] + vis[1]) / 2)
    torch.testing.assert_close(aux["mg_cls"], (cls[0] + cls[1]) / 2)
    assert gen.loss_weights == {"mg_visual": 0.01, "mg_cls": 0.01} and model.aux_weights() == gen.loss_weights


def test_the_defaults_are_the_official_codes_raw_space_and_weights_0_01():
    """Chosen on validation (CIFAR-10-1k, 3 seeds, results/issue16/davpt.csv): raw space, β = λ = 0.01."""
    gen = MetricGuidedPrompts(P, D, L, 8, tiny_vit().blocks, C)
    assert gen.space == "raw" and gen.loss_weights == {"mg_visual": 0.01, "mg_cls": 0.01}
    cfg = T.Config(method="davpt")
    assert (cfg.mg_space, cfg.mg_visual, cfg.mg_cls) == ("raw", 0.01, 0.01)


def test_attention_anchor_is_the_blocks_attention_output():
    model, gen = guided_model(guided_layers=(2,), lambda_cls=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seq = block_inputs(model.train(), x)[2]
    _, aux = model(x, y)
    blk = model.vit.blocks[2]
    anchors = blk.attn(blk.norm1(seq))[:, 1 + P:].mean(1)
    proxies = F.linear(blk.norm1(gen.prompts[2]), blk.attn.qkv.weight[:D], blk.attn.qkv.bias[:D])
    torch.testing.assert_close(aux["mg_visual"], proxy_anchor_loss(anchors, gen.map(y), proxies))
    assert "mg_cls" not in aux


@pytest.mark.parametrize("anchor", ["attn", "mean"])
def test_losses_train_the_prompts_and_vanish_at_eval(anchor):
    model, gen = guided_model(guided_layers=(1,), num_guided=2, anchor=anchor)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, aux = model.train()(x, y)
    assert set(aux) == {"mg_visual", "mg_cls"} and all(torch.isfinite(v) and v > 0 for v in aux.values())
    sum(aux.values()).backward()
    grad = gen.prompts.grad
    assert grad[1, :2].abs().sum() > 0                                   # the guided prompts (the proxies) move
    assert grad[0].abs().sum() > 0                                       # earlier prompts shape the tokens compared
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))               # later layers cannot affect the loss
    if anchor == "mean":                                                 # nothing at layer 1 reads unguided prompts
        assert torch.equal(grad[1, 2:], torch.zeros_like(grad[1, 2:]))
    assert model(x, None)[1] == {} and model.eval()(x)[1] == {}          # no labels or eval: no loss


def test_generator_fails_loudly():
    vit = tiny_vit()
    gen = MetricGuidedPrompts(P, D, L, 8, vit.blocks, C)
    model = PromptedViT(vit, C, gen).train()
    with pytest.raises(ValueError, match="update_map"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))           # map never built
    gen.update_map(torch.randn(C, D))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(2, 3, 32, 32), torch.tensor([0, C]))
    for bad in (dict(guided_layers=(L,)), dict(num_guided=P + 1), dict(anchor="cls"), dict(lambda_cls=-1.0)):
        with pytest.raises(ValueError):
            MetricGuidedPrompts(P, D, L, 8, vit.blocks, C, **bad)


# ---------------------------------------------------------------------------------------------------------
# DA-VPT+: bias tuning


def test_bias_tuning_moves_k_v_never_q():
    vit = tiny_vit()
    model = PromptedViT(vit, C, DeepPrompts(P, D, L, 8))
    with pytest.raises(ValueError, match="frozen backbone"):
        enable_bias_tuning(tiny_vit())                                   # before PromptedViT froze it
    before = [b.attn.qkv.bias.detach().clone() for b in vit.blocks]
    assert enable_bias_tuning(vit) == 2 * D * L
    assert enable_bias_tuning(vit) == 0                                  # idempotent
    torch.nn.init.normal_(model.head.weight)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model.train()(x, y)[0], y).backward()
    opt.step()
    for blk, old in zip(vit.blocks, before):
        assert torch.equal(blk.attn.qkv.bias, old)                       # the fused bias (with q) is untouched
        k, v = blk.attn.kv_bias.detach()[:D], blk.attn.kv_bias.detach()[D:]
        assert (k != old[D:2 * D]).all() and (v != old[2 * D:]).all()
    # b_k adds the same q·b_k to every score of a query: the softmax cancels it, the logits do not change.
    model.eval()
    with torch.no_grad():
        ref = model(x)[0]
        vit.blocks[0].attn.kv_bias[:D] += 1.0
        torch.testing.assert_close(model(x)[0], ref)
        vit.blocks[0].attn.kv_bias[D:] += 1.0
        assert not torch.allclose(model(x)[0], ref)


def test_bias_tuning_starts_from_the_pretrained_function():
    vit = tiny_vit()
    model = PromptedViT(vit, C, DeepPrompts(P, D, L, 8)).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)[0]
    enable_bias_tuning(vit, extended=True)
    assert torch.equal(model(x)[0], ref)


@pytest.mark.parametrize("dim, depth, heads", [(D, L, 3), (192, 12, 3)])   # tiny and ViT-Ti/16 shapes
def test_bias_tuning_counts(dim, depth, heads):
    for extended, per_block in ((False, 2 * dim), (True, 6 * dim)):
        vit = ViT(img_size=32, patch_size=16, dim=dim, depth=depth, num_heads=heads, num_classes=0)
        model = PromptedViT(vit, 10, DeepPrompts(P, dim, depth, 16))
        t0, _ = model.param_counts()
        n = enable_bias_tuning(vit, extended=extended)
        assert n == per_block * depth and model.param_counts()[0] == t0 + n
    if dim == 192:
        assert 2 * dim * depth == 4_608


def test_state_dict_keys_still_timm():
    import timm
    ours = ViT(img_size=32, patch_size=16, dim=192, depth=2, num_heads=3)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    assert set(ours.state_dict()) == set(ref.state_dict())               # no kv_bias key by default
    ours.load_state_dict(ref.state_dict(), strict=True)
    PromptedViT(ours, 3)
    enable_bias_tuning(ours)
    assert {k for k in ours.state_dict() if "kv_bias" in k} == {"blocks.0.attn.kv_bias", "blocks.1.attn.kv_bias"}


def test_raw_space_compares_the_tokens_themselves():
    """space="raw" (the official code): the proxies are the guided prompt parameters, the CLS anchor the CLS token."""
    model, gen = guided_model(guided_layers=(2,), space="raw")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    seq = block_inputs(model.train(), x)[2]
    _, aux = model(x, y)
    blk, proxies = model.vit.blocks[2], gen.prompts[2, :gen.map.num_proxies]
    anchors = blk.attn(blk.norm1(seq))[:, 1 + P:].mean(1)
    torch.testing.assert_close(aux["mg_visual"], proxy_anchor_loss(anchors, gen.map(y), proxies))
    torch.testing.assert_close(aux["mg_cls"], proxy_anchor_loss(seq[:, 0], gen.map(y), proxies))
    with pytest.raises(ValueError, match="--mg-space"):
        guided_model(space="keys")
