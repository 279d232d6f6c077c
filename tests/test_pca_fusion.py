"""ViaPT: the two corner cases (m = 0 is VPT-Deep, m = d is VPT-Shallow), PCA against scikit-learn, the running
estimate, determinism, degenerate inputs, parameter counts as a function of m, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from conftest import tiny_vit
from vapt_min.pca_fusion import RunningPCA, ViaPTPrompts, pca_reconstruct, principal_basis, viapt_param_count
from vapt_min.prompts import DeepPrompts, PromptedViT, ShallowPrompts

P, D, L, G = 4, 48, 3, 4  # tiny ViT: 32 px, patch 8 -> 4×4 grid


def build(gen, seed=1):
    torch.manual_seed(seed)
    model = PromptedViT(tiny_vit(), 5, gen, prompt_dropout=0.3)
    torch.nn.init.normal_(model.head.weight)  # the new head starts at zero: logits would all be 0
    return model


def viapt(m, **kw):
    torch.manual_seed(2)
    return ViaPTPrompts(P, D, L, 8, grid=G, pca_dim=m, **kw)


def same_logits(a, b, x, train):
    a.train(train), b.train(train)
    torch.manual_seed(5)
    la, _ = a(x)
    torch.manual_seed(5)
    lb, _ = b(x)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_m0_is_vpt_deep(train):
    via = build(viapt(0, instance=False))
    deep = build(DeepPrompts(P, D, L, 8))
    with torch.no_grad():
        deep.generator.prompts[0] = via.generator.prompts[0]
        for i in range(1, L):
            deep.generator.prompts[i] = via.generator.new[i - 1]
    deep.head.load_state_dict(via.head.state_dict())
    same_logits(via, deep, torch.randn(3, 3, 32, 32), train)


@pytest.mark.parametrize("train", [False, True])
def test_md_is_vpt_shallow(train):
    via = build(viapt(D, instance=False))
    shallow = build(ShallowPrompts(P, D, 8))
    with torch.no_grad():
        shallow.generator.prompts.copy_(via.generator.prompts)
    shallow.head.load_state_dict(via.head.state_dict())
    same_logits(via, shallow, torch.randn(3, 3, 32, 32), train)


@pytest.mark.parametrize("m,ref", [(0, "deep"), (D, "shallow")])
def test_corners_hold_with_the_instance_branch_at_initialisation(m, ref):
    via = build(viapt(m)).eval()                         # z = μ = 0 at init: the instance prompts are exactly zero
    other = build(DeepPrompts(P, D, L, 8) if ref == "deep" else ShallowPrompts(P, D, 8)).eval()
    with torch.no_grad():
        if ref == "deep":
            other.generator.prompts[0] = via.generator.prompts[0]
            for i in range(1, L):
                other.generator.prompts[i] = via.generator.new[i - 1]
        else:
            other.generator.prompts.copy_(via.generator.prompts)
    other.head.load_state_dict(via.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(via(x)[0], other(x)[0], rtol=0, atol=0)


def test_full_basis_projection_is_the_identity_and_m_in_between_mixes():
    pca = RunningPCA(D, refresh=1)
    pca.update(torch.randn(64, D) * torch.linspace(3, 0.1, D))
    z = torch.randn(5, D)
    torch.testing.assert_close(pca.project(z, D), z, rtol=1e-5, atol=1e-5)
    assert pca.project(z, 0).abs().max() == 0
    for m in (1, 10, 30):
        part, rest = pca.project(z, m), z - pca.project(z, m)
        torch.testing.assert_close((part * rest).sum(-1), torch.zeros(5), atol=1e-4, rtol=0)  # orthogonal split


@pytest.mark.parametrize("m", [1, 3, 8, 20])
def test_reconstruction_equals_scikit_learn(m):
    torch.manual_seed(0)
    x = torch.randn(60, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)  # correlated features
    ours = pca_reconstruct(x, m)
    sk = PCA(n_components=m).fit(x.numpy())
    ref = torch.from_numpy(sk.inverse_transform(sk.transform(x.numpy())))
    torch.testing.assert_close(ours, ref)
    V = principal_basis(torch.cov(x.T))[:, :m]                       # directions equal up to sign
    torch.testing.assert_close((V.T @ torch.from_numpy(sk.components_).T).abs(), torch.eye(m, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_running_estimate_converges_to_the_data_basis_and_refreshes():
    torch.manual_seed(0)
    x = torch.randn(200, 12) * torch.linspace(4, 0.5, 12) @ torch.linalg.qr(torch.randn(12, 12))[0]
    pca = RunningPCA(12, momentum=0.5, refresh=3)
    pca.update(x), pca.update(x)
    assert torch.equal(pca.basis, torch.eye(12))                     # not refreshed yet
    for _ in range(40):
        pca.update(x)
    target = principal_basis(torch.cov(x.T))
    torch.testing.assert_close(pca.basis.abs(), target.abs(), atol=1e-4, rtol=0)
    pca.update(x * 2 + 1)
    pca.eval()                                                        # evaluation refreshes from the latest statistics
    torch.testing.assert_close(pca.basis, principal_basis(pca.cov))


def test_eval_is_deterministic_batch_independent_and_works_with_batch_size_1():
    model = build(viapt(16))
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):                                                # move μ and the running bases off their init
        F.cross_entropy(model.train()(x, torch.arange(4))[0], torch.arange(4)).backward()
        opt.step(), opt.zero_grad()
    model.eval()
    with torch.no_grad():
        full, again = model(x)[0], model(x)[0]
        alone = torch.cat([model(x[j:j + 1])[0] for j in range(4)])
    assert torch.equal(full, again)
    torch.testing.assert_close(alone, full, rtol=1e-5, atol=1e-5)
    logits, _ = model.train()(x[:1], torch.tensor([0]))               # training with batch size 1
    assert logits.shape == (1, 5)


@pytest.mark.parametrize("inputs", ["identical images", "constant tokens"])
def test_gradients_stay_finite_on_degenerate_inputs(inputs):
    model = build(viapt(16, refresh=1)).train()                       # refresh every step: eigh of degenerate covariances
    x = torch.randn(1, 3, 32, 32).expand(6, -1, -1, -1) if inputs == "identical images" else torch.zeros(6, 3, 32, 32)
    if inputs == "constant tokens":
        model.vit.pos_embed.data.zero_()                              # all patch tokens equal: the patch bias
    for _ in range(2):
        logits, _ = model(x, torch.zeros(6, dtype=torch.long))
        model.zero_grad()
        F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(pca.basis).all() for pca in model.generator.pcas)


def test_multi_round_inference_averages_samples_and_fixed_sampling_is_mu():
    model = build(viapt(16)).eval()
    with torch.no_grad():
        model.generator.encoder.to_slots.bias[:P] = 0.5               # μ ≠ 0 so the instance branch matters
    x = torch.randn(2, 3, 32, 32)
    fixed = model(x)[0]                                               # R = 1: z = μ, deterministic
    torch.testing.assert_close(fixed, model(x)[0], rtol=0, atol=0)
    model.generator.eval_samples = 5
    torch.manual_seed(0)
    multi = model(x)[0]
    torch.manual_seed(0)
    runs = [model.head(model.forward_features(x)[0][:, 0]) for _ in range(5)]   # the same five samples, one by one
    torch.testing.assert_close(multi, torch.stack(runs).mean(0))
    assert not torch.allclose(multi, fixed)


@pytest.mark.parametrize("m,instance,expected", [
    (0, False, 23_040),     # = VPT-Deep: 12·10·192
    (192, False, 1_920),    # = VPT-Shallow: 10·192
    (0, True, 25_960),      # + encoder 10·192 + 2·10·49 + 2·10 = 2,920 (7×7 grid, 112 px)
    (32, True, 22_440),     # 1,920 + 11·10·160 + 2,920
    (96, True, 15_400),     # 1,920 + 11·10·96 + 2,920
    (192, True, 4_840),
])
def test_parameter_count_as_a_function_of_m(m, instance, expected):
    gen = ViaPTPrompts(10, 192, 12, 16, grid=7, pca_dim=m, instance=instance)
    n = sum(p.numel() for p in gen.parameters())
    assert n == viapt_param_count(10, 192, 12, (7, 7), m, instance) == expected


@pytest.mark.parametrize("kw,message", [
    (dict(pca_dim=-1), r"pca_dim m must be in \[0, 48\]"),
    (dict(pca_dim=49), r"pca_dim m must be in \[0, 48\] \(0 = VPT-Deep, 48 = VPT-Shallow\)"),
    (dict(pca_dim=8, eval_samples=0), "eval_samples R must be >= 1"),
    (dict(pca_dim=8, inst_pca_dim=0), "inst_pca_dim must be in"),
])
def test_bad_settings_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        ViaPTPrompts(P, D, L, 8, grid=G, **kw)


def test_wrong_input_size_names_the_grid():
    model = build(viapt(8)).eval()
    with pytest.raises(ValueError, match="built for a 4×4 patch grid"):
        model(torch.randn(1, 3, 48, 48))


def test_a_refresh_carries_the_learnt_coordinates_into_the_new_basis():
    """W_i are coordinates in C_m. A refresh that only rotates the complement (the same subspace, another basis: what
    near-equal low variances do) must leave W_i C_mᵀ unchanged; in general it becomes its projection on the new C_m."""
    m = 8
    gen = viapt(m, instance=False, refresh=1)
    pca, W = gen.pcas[0], gen.new[0]
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(D, D))[0]                          # the old basis, (D, D) orthonormal
    R = torch.linalg.qr(torch.randn(D - m, D - m))[0]                  # a rotation inside the complement
    new_vecs = torch.cat([Q[:, :m], Q[:, m:] @ R], 1)                  # same top-m space, complement rotated
    variances = torch.cat([torch.linspace(20, 10, m), torch.linspace(1, 0.5, D - m)])
    with torch.no_grad():
        pca.basis.copy_(Q)
        pca.cov.copy_(new_vecs @ torch.diag(variances) @ new_vecs.T)
        pca.stale.fill_(1)
    learnt_before, W_before = W.detach() @ Q[:, m:].T, W.detach().clone()
    gen.eval()                                                         # the refresh before evaluation
    torch.testing.assert_close(W.detach() @ pca.basis[:, m:].T, learnt_before, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(W.detach(), W_before, atol=1e-3)         # the coordinates did change: the basis rotated

    # a refresh inside training, on real data: the learnt part becomes its projection on the new complement
    gen.train()
    old = pca.basis.clone()
    learnt_before = W.detach() @ old[:, m:].T
    gen(1, torch.randn(3, 1 + G * G, D), torch.randn(3, P, D) * 3, {})  # refresh=1: this update recomputes
    C = pca.basis[:, m:]
    assert not torch.allclose(C, old[:, m:], atol=1e-3)
    torch.testing.assert_close(W.detach() @ C.T, learnt_before @ C @ C.T, atol=1e-5, rtol=1e-4)


DDP_PCA = r"""
import os, sys, torch, torch.distributed as dist
from vapt_min.pca_fusion import RunningPCA
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(10 + rank)                             # each rank sees other data
pca = RunningPCA(6, refresh=2)
for _ in range(4):
    pca.update(torch.randn(20, 6) * torch.arange(1.0, 7.0) + rank)
torch.save({k: v for k, v in pca.state_dict().items()}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_ranks_share_one_running_estimate_under_ddp(tmp_path):
    script = tmp_path / "pca_ddp.py"
    script.write_text(DDP_PCA)
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert r.returncode == 0, r.stderr
    a, b = (torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1))
    for key in ("mean", "cov", "basis"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)  # bit for bit: one basis, so W_i stay in sync
    ref = RunningPCA(6, refresh=2)                            # one process, the two ranks' batch statistics averaged
    gens = [torch.Generator().manual_seed(10 + k) for k in (0, 1)]
    with torch.no_grad():
        for _ in range(4):
            xs = [torch.randn(20, 6, generator=g) * torch.arange(1.0, 7.0) + k for k, g in enumerate(gens)]
            mus = [x.mean(0) for x in xs]
            covs = [(x - mu).T @ (x - mu) / 19 for x, mu in zip(xs, mus)]
            ref.mean.lerp_(sum(mus) / 2, ref.momentum), ref.cov.lerp_(sum(covs) / 2, ref.momentum)
    torch.testing.assert_close(a["cov"], ref.cov), torch.testing.assert_close(a["mean"], ref.mean)


@pytest.mark.parametrize("m", [1, 8, 30])
def test_history_is_pca_reconstruction_with_the_mean(m):
    """Our choice for 1 <= m < d: the carried part is PCA's reconstruction z̄ + (Z − z̄) V_m V_mᵀ, mean included
    (without the mean, training stalled: see the module). With the statistics fitted on Z alone and W_i = 0 it must
    equal scikit-learn's reconstruction of the same rows."""
    gen = viapt(m, instance=False, refresh=1).train()
    gen.pcas[0].momentum = 1.0                                       # the running statistics are this batch's
    with torch.no_grad():
        gen.new[0].zero_()
    torch.manual_seed(3)
    Z = (torch.randn(16, P, D) @ torch.randn(D, D) * 0.3 + 2.0)      # correlated, with a large common offset
    got = gen(1, torch.randn(16, 1 + G * G, D), Z, {})               # refresh=1: fitted on Z, then applied
    sk = PCA(n_components=m).fit(Z.reshape(-1, D).double().numpy())
    ref = torch.from_numpy(sk.inverse_transform(sk.transform(Z.reshape(-1, D).double().numpy()))).float()
    torch.testing.assert_close(got.reshape(-1, D), ref, atol=1e-3, rtol=1e-3)
    assert (got.mean((0, 1)) - 2.0).abs().mean() < 0.2               # the offset survives, whatever m


def test_centred_history_is_the_kept_part_alone():
    """history="centred": (Z − z̄) V_m V_mᵀ + W_i C_mᵀ, no running mean added back (the summary's literal reading)."""
    x = torch.randn(4, 3, 32, 32)
    a, b = viapt(8, instance=False), viapt(8, instance=False, history="centred")
    for g in (a, b):
        model = build(g).train()
        model(x)                                                            # the same running statistics
        model.eval()
    Z = torch.randn(2, P, D)
    mean_a, kept_a, learnt_a = a.history(1, Z)
    mean_b, kept_b, learnt_b = b.history(1, Z)
    torch.testing.assert_close(mean_a, a.pcas[0].mean.expand_as(Z))
    assert torch.equal(mean_b, torch.zeros_like(Z)) and torch.equal(kept_a, kept_b) and torch.equal(learnt_a, learnt_b)
    torch.testing.assert_close(b(1, torch.randn(2, 1 + 16, D), Z, {}), kept_b + learnt_b)
    with pytest.raises(ValueError, match="--viapt-history"):
        viapt(8, history="none")
