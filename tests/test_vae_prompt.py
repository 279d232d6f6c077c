"""V²APT: token counts, shapes, the KL against torch.distributions, determinism, gradients, parameter budget."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from conftest import block_inputs, tiny_vit
from vapt_min.prompts import DeepPrompts, PromptedViT
from vapt_min.vae_prompt import VAEPrompts, kl_per_dim, kl_standard_normal

P, P_INST, D, L, K = 6, 4, 48, 3, 5
# The paper's letter: the encoder reads the input embeddings, a small random FiLM (so that images differ from the
# start), the plain KL. The mechanism tests use it; test_the_defaults_are_the_open_path_levers checks the default.
LETTER = dict(encode_at=0, film_init="small", free_bits=0.0)


def v2apt(**kw):
    torch.manual_seed(1)
    model = PromptedViT(tiny_vit(), 5, VAEPrompts(P, P_INST, D, L, 8, latent_dim=K, **{**LETTER, **kw}))
    torch.nn.init.normal_(model.head.weight)  # the new head starts at zero: logits would all be 0 and compare equal
    return model



def test_token_count_per_layer_equals_vpt_deep():
    x = torch.randn(2, 3, 32, 32)
    deep = PromptedViT(tiny_vit(), 5, DeepPrompts(P, D, L, 8)).eval()
    ours = v2apt().eval()
    assert [s.shape for s in block_inputs(ours, x)] == [s.shape for s in block_inputs(deep, x)] == [(2, 1 + P + 16, D)] * L


def test_intermediate_shapes_and_composition():
    model = v2apt().eval()
    gen = model.generator
    x = torch.randn(3, 3, 32, 32)
    tokens = model.vit.embed(x)                          # (B, 1+N, D)
    mu, logvar = gen.encode(tokens[:, 1:])
    assert mu.shape == logvar.shape == (3, K)
    inst = gen.decode(mu)
    assert inst.shape == (3, L, P_INST, D)
    assert gen.domain.shape == (L, P - P_INST, D) and gen.base.shape == (L, P_INST, D)
    for i, seq in enumerate(block_inputs(model, x)):     # P̂_i = [P_i^inst, P_i^dom] after CLS
        torch.testing.assert_close(seq[:, 1:1 + P_INST], inst[:, i])
        torch.testing.assert_close(seq[:, 1 + P_INST:1 + P], gen.domain[i].expand(3, -1, -1))


def test_kl_equals_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(7, K) * 2, torch.randn(7, K)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1).mean()
    torch.testing.assert_close(kl_standard_normal(mu, logvar), ref)
    assert kl_standard_normal(torch.zeros(3, K), torch.zeros(3, K)).item() == 0.0


def test_kl_reaches_aux_with_its_weight():
    model = v2apt(beta=0.3).train()
    _, aux = model(torch.randn(2, 3, 32, 32))
    assert set(aux) == {"kl"} and aux["kl"].item() > 0 and model.aux_weights() == {"kl": 0.3}


def test_mu_policy_is_deterministic_and_batch_independent():
    model = v2apt().eval()
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    a, _ = model(x)
    b, _ = model(x)
    assert torch.equal(a, b)
    alone = torch.cat([model(x[i:i + 1])[0] for i in range(4)])      # batch size 1 works
    torch.testing.assert_close(alone, a, atol=1e-5, rtol=1e-5)
    mixed, _ = model(torch.cat([x[:2], torch.randn(3, 3, 32, 32)]))  # other images in the batch change nothing
    torch.testing.assert_close(mixed[:2], a[:2], atol=1e-5, rtol=1e-5)


def test_training_samples_and_eval_samples_average():
    model = v2apt(eval_samples=3)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])                  # z is sampled while training
    model.eval()
    torch.manual_seed(5)
    avg, _ = model(x)
    torch.manual_seed(5)
    runs = [model.head(model.forward_features(x)[0][:, 0]) for _ in range(3)]
    torch.testing.assert_close(avg, torch.stack(runs).mean(0))


def test_different_images_differ_same_image_same():
    model = v2apt().eval()
    gen = model.generator
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    x = torch.cat([x, x[:1]])                                        # images 0 and 2 are the same
    inst = gen.decode(gen.encode(model.vit.embed(x)[:, 1:])[0])
    assert not torch.allclose(inst[0], inst[1])
    assert torch.equal(inst[0], inst[2])


def test_gradients_reach_encoder_decoder_domain_not_backbone():
    model = v2apt().train()
    logits, aux = model(torch.randn(3, 3, 32, 32))
    (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])) + aux["kl"]).backward()
    gen = model.generator
    for name in ("query", "to_latent.weight", "base", "film.weight", "domain"):
        g = gen.get_parameter(name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vit.parameters())


@pytest.mark.parametrize("dim,depth", [(192, 12), (768, 12)])  # ViT-Ti/16 and ViT-B/16 shapes
def test_parameter_budget(dim, depth):
    v2 = sum(p.numel() for p in VAEPrompts(10, 5, dim, depth, 16, latent_dim=8).parameters())
    deep = sum(p.numel() for p in DeepPrompts(10, dim, depth, 16).parameters())
    # domain L·P_dom·D + base L·P_inst·D + query D + (D·2K + 2K) + (K·2D + 2D)
    assert v2 == depth * 10 * dim + dim + dim * 16 + 16 + 8 * 2 * dim + 2 * dim
    assert v2 <= 1.5 * deep
    print(f"D={dim}: V²APT {v2:,} vs VPT-Deep {deep:,} trainable (head excluded): {v2 / deep:.2f}x")


@pytest.mark.parametrize("kw,message", [
    (dict(inst_prompts=11), "prompt split does not add up"),
    (dict(inst_prompts=0), "prompt split does not add up"),
    (dict(latent_dim=0), "latent_dim K must be >= 1"),
    (dict(beta=-0.1), "beta"),
    (dict(eval_samples=0), "eval_samples R must be >= 1"),
    (dict(free_bits=-0.5), "--free-bits: the KL floor per latent dimension must be >= 0 nats, got -0.5"),
])
def test_bad_input(kw, message):
    args = dict(num_prompts=10, inst_prompts=5, dim=D, depth=L, patch_size=8) | kw
    with pytest.raises(ValueError, match=message):
        VAEPrompts(**args)


def test_levers_that_open_the_instance_path():
    """film_init="zero": the instance prompts start as their bases for every z; logvar_init sets σ at the start;
    encode_at=j: the encoder reads the patch tokens entering block j, blocks before j get the prompts of z = 0."""
    x = torch.randn(3, 3, 32, 32)
    zero = v2apt(film_init="zero").eval()
    gen = zero.generator
    torch.testing.assert_close(gen.decode(torch.randn(3, K)), gen.base.expand(3, -1, -1, -1), rtol=0, atol=0)
    small_sigma = v2apt(logvar_init=-4.0).generator
    assert torch.equal(small_sigma.to_latent.bias[K:], torch.full((K,), -4.0))
    _, logvar = small_sigma.encode(torch.randn(3, 16, D))
    assert abs((0.5 * logvar).exp().mean().item() - 0.1353) < 0.02          # σ ≈ e^-2, give or take the small weights
    deep = v2apt(encode_at=2).eval()
    seen = []
    hook = deep.vit.blocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    logits, aux = deep(x)
    hook.remove()
    inputs = block_inputs(deep, x)
    g = deep.generator
    mu, logvar = g.encode(torch.cat([seen[0][:, :1], seen[0][:, 1 + P:]], 1)[:, 1:])  # the patches entering block 2
    torch.testing.assert_close(aux["kl"], kl_standard_normal(mu, logvar))
    torch.testing.assert_close(inputs[2][:, 1:1 + P_INST], g.decode(mu)[:, 2])
    for i in (0, 1):
        torch.testing.assert_close(inputs[i][:, 1:1 + P_INST], g.decode(torch.zeros(3, K))[:, i])
    with pytest.raises(ValueError, match="--encode-at: encode_at must be a block index in \\[0, 2\\], got 3"):
        v2apt(encode_at=3)
    with pytest.raises(ValueError, match="--film-init"):
        v2apt(film_init="large")


def test_free_bits_floor_each_dimension_and_leave_the_logged_kl_true():
    """loss = CE + β·(KL + kl_floor) = CE + β·Σ_k max(KL_k, λ): no gradient towards the prior for a dimension under
    the floor, the usual one above it; aux["kl"] stays the true KL."""
    model = v2apt(beta=0.5, free_bits=0.3).train()
    assert model.aux_weights() == {"kl": 0.5, "kl_floor": 0.5}
    gen = model.generator
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, K) * torch.tensor([0.0, 0.1, 2.0, 0.0, 3.0]), torch.zeros(6, K)
    mu.requires_grad_(True)
    kl_k = kl_per_dim(mu, logvar)
    torch.testing.assert_close(kl_k.sum(), kl_standard_normal(mu, logvar))
    below = kl_k < 0.3
    assert below.tolist() == [True, True, False, True, False]
    from vapt_min.vae_prompt import kl_below_floor
    objective = kl_standard_normal(mu, logvar) + kl_below_floor(kl_k, 0.3)
    torch.testing.assert_close(objective, torch.maximum(kl_k, torch.tensor(0.3)).sum())
    objective.backward()
    assert (mu.grad[:, below] == 0).all() and (mu.grad[:, ~below] != 0).any()
    _, aux = model(torch.randn(2, 3, 32, 32))
    assert set(aux) == {"kl", "kl_floor"} and aux["kl_floor"].item() >= 0
    torch.testing.assert_close(aux["kl"], kl_standard_normal(*gen.posterior))
    torch.testing.assert_close(aux["kl_floor"], torch.relu(0.3 - kl_per_dim(*gen.posterior)).sum())
    assert set(v2apt(free_bits=0.0)(torch.randn(2, 3, 32, 32))[1]) == {"kl"}   # 0: the plain KL of Eq. 1


def test_the_defaults_are_the_open_path_levers():
    """Issue 16: the default V²APT encodes the tokens entering the middle block, starts its instance prompts as their
    bases (zero FiLM) and floors the KL at 0.5 nats per dimension; the letter is the options above."""
    torch.manual_seed(1)
    gen = VAEPrompts(P, P_INST, D, 4, 8, latent_dim=K)
    assert gen.encode_at == 2 and gen.free_bits == 0.5 and gen.loss_weights == {"kl": 0.01, "kl_floor": 0.01}
    assert VAEPrompts(10, 5, 192, 12, 16).encode_at == 6                     # ViT-Ti/16: block 6 of 12
    assert gen.film.weight.abs().sum() == 0
    z = torch.randn(3, K)
    torch.testing.assert_close(gen.decode(z), gen.base.expand(3, -1, -1, -1))   # every image: its bases, exactly
    model = PromptedViT(tiny_vit(depth=4), 5, gen).eval()
    x = torch.randn(2, 3, 32, 32)
    seq = block_inputs(model, x)
    mu, logvar = gen.encode(seq[2][:, 1 + P:])                              # the patch tokens entering block 2
    model(x)
    torch.testing.assert_close(gen.posterior[0], mu)
    torch.testing.assert_close(gen.posterior[1], logvar)
