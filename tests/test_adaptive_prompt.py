"""VAPT: zero prompts at initialisation, image-dependent after one step, the layer against an independent
computation, parameter counts pinned by formula, any input size, bad input."""
import pytest
import torch
import torch.nn.functional as F

from conftest import block_inputs, tiny_vit
from vapt_min.adaptive_prompt import AdaptiveLayer, AdaptivePrompts, vapt_param_count
from vapt_min.prompts import PromptedViT
from vapt_min.vit import ViT

P, D, L = 4, 48, 3  # tiny ViT: 32 px, patch 8 -> a 4×4 grid


def vapt(grid=4, **kw):
    torch.manual_seed(1)
    model = PromptedViT(tiny_vit(), 5, AdaptivePrompts(P, D, L, 8, grid=grid, **kw))
    torch.nn.init.normal_(model.head.weight)  # the new head starts at zero: logits would all be 0
    return model


def prompts_per_block(model, x):
    return [seq[:, 1:1 + P] for seq in block_inputs(model, x)]  # (B, P, D) entering each block


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_adaptive_prompts_are_exactly_zero_at_init(mode):
    model = vapt().train(mode == "train")
    if mode == "train":
        model.prompt_dropout.p = 0.0  # dropout rescales the static layer-0 prompts; zeros stay zero either way
    x = torch.randn(3, 3, 32, 32)
    got = prompts_per_block(model, x)
    torch.testing.assert_close(got[0], model.generator.prompts.expand(3, -1, -1), rtol=0, atol=0)
    for i in range(1, L):
        assert torch.count_nonzero(got[i]) == 0, f"layer {i} prompts are not zero at init"


def test_first_step_makes_later_prompts_image_dependent():
    model = vapt().train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, _ = model(x, y)
    F.cross_entropy(logits, y).backward()
    assert model.generator.layers[0].token_map.weight.grad.abs().sum() > 0  # the zero map gets a gradient
    opt.step()
    got = prompts_per_block(model.eval(), x)
    for i in range(1, L):
        assert torch.count_nonzero(got[i]) > 0
        assert not torch.allclose(got[i][0], got[i][1]), f"layer {i}: two images gave the same prompts"


def test_layer_equals_an_independent_computation():
    torch.manual_seed(0)
    layer = AdaptiveLayer(P, D, (4, 5), kernel=2).eval()
    torch.nn.init.normal_(layer.token_map.weight), torch.nn.init.normal_(layer.token_map.bias)
    torch.nn.init.normal_(layer.norm.weight), torch.nn.init.normal_(layer.norm.bias)
    patches = torch.randn(2, 20, D)                         # (B, N, D), N = 4·5, row-major grid
    x = F.layer_norm(patches, (D,), layer.norm.weight, layer.norm.bias)
    k = layer.kernel[0, 0]                                  # (2, 2)
    grid = x.reshape(2, 4, 5, D)                            # (B, gh, gw, D)
    conv = sum(k[a, b] * grid[:, a:a + 3, b:b + 4] for a in range(2) for b in range(2))  # (B, 3, 4, D)
    cells = conv.reshape(2, 12, D)                          # (B, gh'·gw', D)
    ref = torch.einsum("pc,bcd->bpd", layer.token_map.weight, cells) + layer.token_map.bias[:, None]
    torch.testing.assert_close(layer(patches), ref)


def test_kernel_is_shared_by_all_channels_and_projector_is_residual():
    gen = AdaptivePrompts(P, D, L, 8, grid=4, kernel=3).eval()
    assert all(layer.kernel.shape == (1, 1, 3, 3) for layer in gen.layers)
    kernels = torch.cat([layer.kernel.flatten() for layer in gen.layers])
    assert kernels.abs().max() <= 1 / 3 and kernels.std() > 0.1  # uniform ±1/k, not the official N(0, 1): see the module
    t = torch.randn(2, P, D)
    ref = t + F.relu(t @ gen.projector.fc1.weight.T) @ gen.projector.fc2.weight.T
    torch.testing.assert_close(gen.projector(t), ref)
    assert gen.projector.fc1.bias is None and gen.projector.fc2.bias is None


@pytest.mark.parametrize("dim,img,expected", [
    (192, 224, 27_960),   # ViT-Ti/16, 14×14 grid: 10·192 + 2·192·8 + 11·(384 + 4 + 169·10 + 10)
    (192, 112, 13_330),   # ViT-Ti/16, 7×7 grid:   10·192 + 2·192·8 + 11·(384 + 4 + 36·10 + 10)
    (768, 224, 55_608),   # ViT-B/16, 14×14 grid:  10·768 + 2·768·8 + 11·(1536 + 4 + 169·10 + 10)
    (768, 160, 45_928),   # ViT-B/16, 10×10 grid:  10·768 + 2·768·8 + 11·(1536 + 4 + 81·10 + 10)
])
def test_parameter_count_formula(dim, img, expected):
    g = img // 16
    gen = AdaptivePrompts(10, dim, 12, 16, grid=g, kernel=2, hidden=8)
    count = sum(p.numel() for p in gen.parameters())
    assert count == vapt_param_count(10, dim, 12, (g, g), 2, 8) == expected
    print(f"VAPT D={dim} {img}px: {count:,} params vs VPT-Deep {10 * dim * 12:,} ({count / (10 * dim * 12):.2f}×)")


def test_formula_follows_kernel_hidden_and_prompts():
    for P_, k, r in [(1, 1, 1), (7, 3, 16), (20, 4, 4)]:
        gen = AdaptivePrompts(P_, 48, 5, 8, grid=(6, 9), kernel=k, hidden=r)
        assert sum(p.numel() for p in gen.parameters()) == vapt_param_count(P_, 48, 5, (6, 9), k, r)


@pytest.mark.parametrize("img", [96, 160])
def test_other_input_sizes_on_vit_ti_shapes(img):
    torch.manual_seed(0)
    vit = ViT(img_size=224, patch_size=16, dim=192, depth=12, num_heads=3, num_classes=0)
    model = PromptedViT(vit, 3, AdaptivePrompts(10, 192, 12, 16, grid=img // 16)).eval()
    logits, _ = model(torch.randn(1, 3, img, img))
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_non_square_grid_and_batch_size_one():
    torch.manual_seed(0)
    model = PromptedViT(tiny_vit(), 5, AdaptivePrompts(P, D, L, 8, grid=(3, 5))).train()
    logits, _ = model(torch.randn(1, 3, 24, 40), torch.tensor([2]))
    F.cross_entropy(logits, torch.tensor([2])).backward()
    assert logits.shape == (1, 5) and all(torch.isfinite(p.grad).all() for p in model.generator.parameters() if p.grad is not None)


@pytest.mark.parametrize("kw,message", [
    (dict(kernel=5), "kernel 5 does not fit the 4×4 patch grid of 32 px inputs: use 1 <= kernel <= 4"),
    (dict(kernel=0), "kernel 0 does not fit"),
    (dict(hidden=0), "hidden"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_settings_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        AdaptivePrompts(P, D, L, 8, grid=4, **kw)


def test_no_prompts_raises():
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        AdaptivePrompts(0, D, L, 8, grid=4)


def test_wrong_input_size_names_the_grid():
    model = vapt(grid=4).eval()
    with pytest.raises(ValueError, match="built for a 4×4 patch grid .16 patches. but got 36 patches"):
        model(torch.randn(1, 3, 48, 48))


def test_composed_map_equals_the_direct_conv_path():
    """The package runs conv and token map as one (P, N) matrix (see AdaptiveLayer.forward): same function as
    conv2d on the grid, then Dropout2d, then the token map; in training each (image, channel) is dropped whole."""
    torch.manual_seed(0)
    layer = AdaptiveLayer(P, D, (5, 6), kernel=3)
    torch.nn.init.normal_(layer.token_map.weight), torch.nn.init.normal_(layer.token_map.bias)
    patches = torch.randn(4, 30, D)
    torch.testing.assert_close(layer.eval()(patches), layer.forward_direct(patches))
    layer.train()
    got, full = layer(patches), layer.eval().forward_direct(patches)
    bias = layer.token_map.bias[:, None]
    kept = (got - bias).abs().sum(1) > 0                                    # (B, D): which channels survived
    assert kept.any() and not kept.all()                                    # 4·48 draws at p = 0.1: both occur
    expected = bias + kept[:, None] * (full - bias) / (1 - layer.drop.p)   # a whole channel kept or dropped
    torch.testing.assert_close(got, expected)


def test_official_normal_kernel_is_an_option():
    torch.manual_seed(0)
    uni = AdaptivePrompts(P, D, L, 8, grid=4)
    torch.manual_seed(0)
    nor = AdaptivePrompts(P, D, L, 8, grid=4, kernel_init="normal")
    k_uni = torch.stack([l.kernel for l in uni.layers]).detach()
    k_nor = torch.stack([l.kernel for l in nor.layers]).detach()
    assert k_uni.abs().max() <= 0.5 and k_nor.abs().max() > 0.5 and 0.6 < k_nor.std() < 1.6   # ±1/k vs N(0, 1)
    with pytest.raises(ValueError, match="--vapt-kernel-init"):
        AdaptivePrompts(P, D, L, 8, grid=4, kernel_init="xavier")
