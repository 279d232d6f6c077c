"""Plot helpers that compute something: Grad-CAM and the prompt map."""
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
    m = prompt_map(model, torch.randn(2, 3, 32, 32))
    assert m.shape == (3, 2, 4, 4) and (m.abs() <= 1 + 1e-6).all()


def test_plot_sweep_ticks_every_value_on_a_symlog_axis():
    import matplotlib
    matplotlib.use("Agg")
    from vapt_min.plots import plot_sweep
    fig = plot_sweep([0, 1, 4, 32, 192], {"test acc (%)": {"a": [80, 65, 67, 67, 71]}}, "m", symlog=True)
    ax = fig.axes[0]
    assert ax.get_xscale() == "symlog" and [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "4", "32", "192"]
    assert ax.get_xlabel() == "m" and ax.get_ylabel() == "test acc (%)"
