"""Our ViT against timm: same names, same logits, same attention; loading and its errors."""
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import need
from vapt_min.data import data_root
from vapt_min.vit import ViT, from_pretrained, parse_name

TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def tiny_pair(seed=0):
    """A random small timm ViT and ours with its weights loaded strictly."""
    torch.manual_seed(seed)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, dynamic_img_size=True).eval()
    ours = ViT(img_size=32, patch_size=8, dim=48, depth=2, num_heads=3, num_classes=7).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def test_parameter_names_equal_timm():
    ours, ref = tiny_pair()
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("size", [32, 48, 24])
def test_random_tiny_logits_equal_timm(size):
    ours, ref = tiny_pair()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def real_pair():
    folder = need(data_root() / "weights" / TINY / "model.safetensors").parent
    ours = from_pretrained(TINY, folder).eval()
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True).eval()
    ref.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return ours, ref


@pytest.mark.parametrize("size", [224, 160])
def test_real_vit_tiny_logits_equal_timm(real_pair, size):
    ours, ref = real_pair
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_real_weights_metadata(real_pair):
    ours, _ = real_pair
    assert ours.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and ours.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    assert ours.pretrained_cfg["interpolation"] == "bicubic"
    assert sum(p.numel() for p in ours.parameters()) == 5_717_416  # shared/data/README: 152 tensors, 5,717,416 params
    assert len(ours.state_dict()) == 152


def test_explicit_attention_equals_sdpa_and_returns_maps():
    ours, _ = tiny_pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = ours(x)
        maps = []
        explicit = ours(x, attn_out=maps)
        ours.set_attention("explicit")
        explicit2 = ours(x)
    torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit2, explicit)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 17, 17)  # (B, h, 1+N, 1+N)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 3, 17))
    with pytest.raises(ValueError, match="sdpa"):
        ours.set_attention("flash")


def test_pos_embed_interpolation():
    ours, _ = tiny_pair()
    assert ours.pos_embed_for(4, 4) is ours.pos_embed           # native grid: untouched
    assert ours.pos_embed_for(6, 3).shape == (1, 1 + 18, 48)
    torch.testing.assert_close(ours.pos_embed_for(6, 3)[:, 0], ours.pos_embed[:, 0])  # CLS position kept


def test_image_size_not_divisible_is_clear_error():
    ours, _ = tiny_pair()
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        ours(torch.randn(1, 3, 30, 30))


def test_load_pth_and_safetensors_and_wrapped(tmp_path):
    ref = ViT(img_size=32, patch_size=16, dim=192, depth=12, num_heads=3)
    sd = ref.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd}, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = from_pretrained("vit_tiny_patch16_32", tmp_path / f)
        torch.testing.assert_close(m.state_dict()["pos_embed"], sd["pos_embed"])


def test_weights_for_another_architecture(tmp_path):
    small = ViT(img_size=32, patch_size=16, dim=384, depth=12, num_heads=6)
    save_file(small.state_dict(), str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match="pass the model name that matches"):
        from_pretrained("vit_tiny_patch16_32", tmp_path / "small.safetensors")


def test_missing_weights_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        from_pretrained(TINY, tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="timm ViT name"):
        parse_name("resnet50")
    assert parse_name("vit_base_patch32_384.augreg") == dict(dim=768, depth=12, num_heads=12, patch_size=32, img_size=384)


def test_hub_path_uses_timm_create_model(monkeypatch):
    """Online loading goes through timm; here timm's factory is replaced by a local model to test our side."""
    torch.manual_seed(0)
    fake = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    fake.pretrained_cfg = dict(fake.pretrained_cfg, mean=(0.1, 0.2, 0.3))
    calls = []
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained: calls.append((name, pretrained)) or fake)
    m = from_pretrained(TINY, None)
    assert calls == [(TINY, True)] and m.pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    torch.testing.assert_close(m.state_dict()["blocks.3.attn.qkv.weight"], fake.state_dict()["blocks.3.attn.qkv.weight"])
