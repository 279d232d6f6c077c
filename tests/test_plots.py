"""Plot helpers that compute something: Grad-CAM and the prompt map."""
import copy

import pytest
import torch

from conftest import tiny_vit
from vapt_min.adaptive_prompt import AdaptivePrompts
from vapt_min.plots import grad_cam, prompt_map
from vapt_min.prompts import DeepPrompts, PromptedViT


def model_with(gen):
    torch.manual_seed(3)
    model = PromptedViT(tiny_vit(), 5, gen).eval()
    torch.nn.init.normal_(model.head.weight)
    return model


def test_grad_cam_shape_scale_and_per_image():
    model = model_with(DeepPrompts(4, 48, 3, 8))
    x = torch.randn(3, 3, 32, 32)
    cam = grad_cam(model, x)
    assert cam.shape == (3, 4, 4) and (cam >= 0).all()
    torch.testing.assert_close(cam.amax((1, 2)), torch.ones(3))
    torch.testing.assert_close(grad_cam(model, x[1:2]), cam[1:2])        # each image on its own
    assert all(p.grad is None for p in model.parameters())               # it reads gradients, it leaves none behind


def test_grad_cam_equals_the_definition():
    model = model_with(AdaptivePrompts(4, 48, 3, 8, grid=4))
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
    seen = []
    hook = model.vit.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    logits, _ = model(x)
    hook.remove()
    (g,) = torch.autograd.grad(logits[[0, 1], target].sum(), seen[0])
    act, g = seen[0][:, -16:], g[:, -16:]                                 # the 16 patch tokens
    ref = torch.stack([torch.relu(act[b] @ g[b].mean(0)) for b in range(2)])
    ref = (ref / ref.amax(1, keepdim=True)).reshape(2, 4, 4)
    torch.testing.assert_close(grad_cam(model, x, target), ref.detach())


def test_prompt_map_is_a_cosine_similarity_per_patch():
    model = model_with(DeepPrompts(4, 48, 3, 8))
    for space in ("raw", "ln", "key-query"):
        m = prompt_map(model, torch.randn(2, 3, 32, 32), space=space)
        assert m.shape == (3, 2, 4, 4) and (m.abs() <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match="raw, ln, key-query"):
        prompt_map(model, torch.randn(1, 3, 32, 32), space="keys")


def test_prompt_map_spaces_equal_their_definitions():
    """Block 1's map, written out: the tokens entering it, after its norm1, then its key and query projections."""
    model = model_with(DeepPrompts(4, 48, 3, 8))
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hook = model.vit.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model.forward_features(x)
    hook.remove()
    seq, blk = seen[0], model.vit.blocks[1]                        # (B, 1+P+N, D) = (2, 1+4+16, 48)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a[:, :, None], b[:, None], dim=-1).mean(1).view(2, 4, 4)
    ln = blk.norm1(seq)
    q, k, _ = blk.attn.qkv(ln).chunk(3, dim=-1)                   # timm layout: q, k, v blocks of D
    refs = {"raw": cos(seq[:, 1:5], seq[:, 5:]), "ln": cos(ln[:, 1:5], ln[:, 5:]), "key-query": cos(k[:, 1:5], q[:, 5:])}
    for space, ref in refs.items():
        torch.testing.assert_close(prompt_map(model, x, space=space)[1], ref.detach())
    # what the block cannot see, the map cannot either: a constant added to every coordinate of the prompts
    # changes the raw map and leaves the LayerNorm-ed one as it was
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.generator.prompts.add_(3.0)
    assert not torch.allclose(prompt_map(shifted, x, space="raw")[0], prompt_map(model, x, space="raw")[0])
    torch.testing.assert_close(prompt_map(shifted, x, space="ln")[0], prompt_map(model, x, space="ln")[0])
    assert prompt_map(model, x).equal(prompt_map(model, x, space="ln"))  # the default


def test_plot_sweep_ticks_every_value_on_a_symlog_axis():
    import matplotlib
    matplotlib.use("Agg")
    from vapt_min.plots import plot_sweep
    fig = plot_sweep([0, 1, 4, 32, 192], {"test acc (%)": {"a": [80, 65, 67, 67, 71]}}, "m", symlog=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "4", "32", "192"]
    assert ax.get_xlabel() == "m" and ax.get_ylabel() == "test acc (%)"


def test_figures_a_learner_can_read():
    """Axes named in words, integer epoch ticks, colour bars on every map, rows named by their class."""
    import matplotlib
    matplotlib.use("Agg")
    from vapt_min.plots import plot_acc_vs_params, plot_curves, show_attention, show_overlays, show_prompt_maps
    rows = [{"epoch": e, "loss": 1 / e, "val_acc": 0.1 * e} for e in (1, 2, 3)]
    fig = plot_curves({"a": rows}, keys=("loss", "val_acc"))
    assert [ax.get_ylabel() for ax in fig.axes] == ["training loss (cross-entropy + weighted auxiliary terms)",
                                                    "validation accuracy"]
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())
    fig = plot_acc_vs_params([{"method": "m", "trainable_params": 10, "test_acc": 0.5}])
    assert fig.axes[0].get_ylabel() == "test accuracy (%)"
    images, maps = torch.randn(2, 3, 32, 32), {"x": torch.rand(2, 4, 4)}
    for fig in (show_prompt_maps(images, maps, labels=["cat", "dog"]), show_overlays(images, maps, colorbar=True),
                show_attention(images, [torch.rand(2, 3, 17, 17).softmax(-1)], layers=[0])):
        assert any(ax.get_label() == "<colorbar>" for ax in fig.axes), "a map without a colour bar"
    assert [ax.get_ylabel() for ax in show_prompt_maps(images, maps, labels=["cat", "dog"]).axes[0:4:2]] == ["cat", "dog"]


def test_token_sequences_draw_carry_and_replace():
    import matplotlib
    matplotlib.use("Agg")
    from vapt_min.plots import show_token_sequences
    fig = show_token_sequences(blocks=3, prompts=2, patches=3)
    texts = [t.get_text() for t in fig.axes[0].texts]
    # Shallow: the learned P only into block 1, then carried Z1, Z2; Deep: fresh P0, P1, P2
    assert texts.count("P") == 2 and texts.count("Z1") == 2 and texts.count("Z2") == 2
    assert [texts.count(f"P{b}") for b in range(3)] == [2, 2, 2]
    assert len([p for p in fig.axes[0].patches if type(p).__name__ == "Rectangle"]) == 2 * 3 * 6
    with pytest.raises(ValueError, match="shallow or deep"):
        show_token_sequences(kinds=("viapt",))
