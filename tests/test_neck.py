import pytest
import torch
import torch.nn.functional as F

from comneck.errors import ComneckInputError
from comneck.neck import TransformNeck
from comneck.presets import PRESETS, NeckConfig

# Parameter names of the official Linear_Encoder (NYCU-MAPL/BridgingCompressionMLLM).
OFFICIAL_KEYS = {
    "trans_latent_dim.weight", "trans_latent_dim.bias", "class_embedding", "positional_embedding",
    "ln_pre.weight", "ln_pre.bias",
    *(f"transformer.resblocks.0.{k}" for k in (
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
        "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias", "ln_2.weight", "ln_2.bias",
    )),
}


def reference_neck(sd: dict, y: torch.Tensor, heads: int) -> torch.Tensor:
    """The official neck written out op by op from its state dict."""
    b, c, h, w = y.shape
    x = y.view(b, c, h * w).permute(0, 2, 1) @ sd["trans_latent_dim.weight"].T + sd["trans_latent_dim.bias"]
    width = x.shape[-1]
    x = torch.cat([sd["class_embedding"].expand(b, 1, width), x], dim=1) + sd["positional_embedding"]
    x = F.layer_norm(x, (width,), sd["ln_pre.weight"], sd["ln_pre.bias"])
    p = "transformer.resblocks.0."
    hx = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    q, k, v = (hx @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    split = lambda t: t.view(b, -1, heads, width // heads).transpose(1, 2)  # noqa: E731
    attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (width // heads) ** 0.5, dim=-1) @ split(v)
    attn = attn.transpose(1, 2).reshape(b, -1, width)
    x = x + attn @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    hx = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    hx = hx @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    hx = hx * torch.sigmoid(1.702 * hx)  # QuickGELU
    return x + hx @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def test_paper_neck_has_official_parameter_count_and_keys():
    with torch.device("meta"):
        neck = TransformNeck(NeckConfig())
    assert sum(p.numel() for p in neck.parameters()) == 13_191_168
    assert set(neck.state_dict()) == OFFICIAL_KEYS


def test_paper_neck_output_shape():
    torch.manual_seed(0)
    neck = TransformNeck(NeckConfig()).eval()
    with torch.no_grad():
        assert neck(torch.randn(1, 320, 16, 16)).shape == (1, 257, 1024)


def test_grid_is_a_parameter_24x24_for_clip_336():
    neck = TransformNeck(NeckConfig(latent_channels=40, width=64, heads=4, grid=24)).eval()
    with torch.no_grad():
        assert neck(torch.randn(2, 40, 24, 24)).shape == (2, 577, 64)


def test_tiny_336_preset_neck_maps_24x24_latents_to_577_tokens():
    cfg = PRESETS["tiny-336"].neck
    neck = TransformNeck(cfg).eval()
    assert neck.positional_embedding.shape == (577, 64)
    with torch.no_grad():
        assert neck(torch.randn(2, 40, 24, 24)).shape == (2, 577, 64)
    with pytest.raises(ComneckInputError, match=r"24x24 latent grid \(384x384 codec input\), got 16x16"):
        neck(torch.randn(1, 40, 16, 16))


def test_paper_336_neck_adds_only_the_longer_positional_table():
    with torch.device("meta"):
        neck = TransformNeck(PRESETS["paper-336"].neck)
    assert neck.positional_embedding.shape == (577, 1024)
    assert sum(p.numel() for p in neck.parameters()) == 13_191_168 + (577 - 257) * 1024 == 13_518_848
    assert set(neck.state_dict()) == OFFICIAL_KEYS


def test_neck_equals_reference_computation():
    torch.manual_seed(0)
    cfg = NeckConfig(latent_channels=40, width=64, heads=4, grid=16)
    neck = TransformNeck(cfg).eval()
    y = torch.randn(2, 40, 16, 16)
    with torch.no_grad():
        ours = neck(y)
        ref = reference_neck(neck.state_dict(), y, cfg.heads)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1, 39, 16, 16), (1, 40, 8, 8), (40, 16, 16)])
def test_neck_refuses_wrong_latents(shape):
    neck = TransformNeck(NeckConfig(latent_channels=40, width=64, heads=4, grid=16))
    with pytest.raises(ComneckInputError):
        neck(torch.randn(*shape))
