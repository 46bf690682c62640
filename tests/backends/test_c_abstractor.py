"""Honeybee's C-Abstractor against a reference written from its published equations, plus its
full-size parameter count, config reading and state-dict loading."""

import math

import pytest
import torch

from comneck.backends.c_abstractor import CAbstractor, load_abstractor_state
from comneck.errors import ComneckInputError

EPS = 1e-5  # timm's LayerNormAct2d, which RegStage builds from Honeybee's LayerNorm2d
TINY = dict(encoder_width=32, hidden_size=32, grid_in=16, grid_out=12, depth=3, mlp_depth=2, llm_hidden=48)
# Different widths add a 1x1 conv + norm shortcut to the first block. Also 3 readout layers and 2 eos tokens.
WIDENING = dict(encoder_width=24, hidden_size=32, grid_in=6, grid_out=4, depth=1, mlp_depth=3, llm_hidden=40, num_eos_tokens=2)
# Honeybee-C-7B-M144: the settings of honeybee HEAD configs/model_config/c-abs.yaml, with release-era key names
M144 = {
    "projector_type": "c-abs", "hidden_size": 1024, "depth": 3, "mlp_depth": 2, "num_queries": 144, "pos_emb": True,
    "feature_layer_index": -1, "num_eos_tokens": 0, "prenorm": False, "encoder_hidden_size": 1024,
}


def random_state(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every entry random and non-zero (LayerNorm weights and biases included), in float64."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        t = torch.randn(value.shape, generator=g, dtype=torch.float64)
        state[key] = (t + t.sign() * 0.1) * 0.5  # at least 0.05 in magnitude
    return state


def random_model(seed: int = 0, **sizes) -> CAbstractor:
    model = CAbstractor(**sizes).double().eval()
    model.load_state_dict(random_state(model, seed))
    return model


# ---- the reference: only tensor arithmetic, no torch.nn layers ----

def silu(x):
    return x * torch.sigmoid(x)


def channel_norm(x, p, name):
    """LayerNorm over channels at every pixel (x: [B, C, H, W])."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS) * p[name + ".weight"][:, None, None] + p[name + ".bias"][:, None, None]


def pointwise(x, w):
    return torch.einsum("oc,bchw->bohw", w[:, :, 0, 0], x)


def depthwise3x3(x, w):
    """Each channel convolved with its own 3x3 kernel, zero padding 1."""
    h, wd = x.shape[2:]
    padded = torch.zeros(*x.shape[:2], h + 2, wd + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    return sum(w[:, 0, i, j][:, None, None] * padded[:, :, i : i + h, j : j + wd] for i in range(3) for j in range(3))


def bottleneck(x, p):
    y = silu(channel_norm(pointwise(x, p["conv1.conv.weight"]), p, "conv1.bn"))
    y = silu(channel_norm(depthwise3x3(y, p["conv2.conv.weight"]), p, "conv2.bn"))
    s = y.mean((2, 3))  # squeeze-excite: mean pool, fc1, SiLU, fc2, sigmoid gate
    s = silu(s @ p["se.fc1.weight"][:, :, 0, 0].T + p["se.fc1.bias"]) @ p["se.fc2.weight"][:, :, 0, 0].T + p["se.fc2.bias"]
    y = y * torch.sigmoid(s)[:, :, None, None]
    y = channel_norm(pointwise(y, p["conv3.conv.weight"]), p, "conv3.bn")
    shortcut = channel_norm(pointwise(x, p["downsample.conv.weight"]), p, "downsample.bn") if "downsample.conv.weight" in p else x
    return silu(y + shortcut)


def stage(x, state, prefix):
    blocks = sorted({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}, key=lambda b: int(b[1:]))
    for block in blocks:
        x = bottleneck(x, {k[len(prefix + block) + 1 :]: v for k, v in state.items() if k.startswith(f"{prefix}{block}.")})
    return x


def adaptive_avg_pool(x, out):
    """Output cell i averages input rows floor(i*n/out) .. ceil((i+1)*n/out) - 1 (same for columns)."""
    n = x.shape[2]
    bins = [(i * n // out, math.ceil((i + 1) * n / out)) for i in range(out)]
    return torch.stack([torch.stack([x[:, :, r0:r1, c0:c1].mean((2, 3)) for c0, c1 in bins], -1) for r0, r1 in bins], -2)


def reference(features, state, grid_in, grid_out, num_eos_tokens=0):
    b, n, c = features.shape
    x = features + state["pos_emb"][:, -n:]  # the patch rows (a release-era table has one more, for CLS, first)
    x = x.permute(0, 2, 1).reshape(b, c, grid_in, grid_in)
    x = stage(adaptive_avg_pool(stage(x, state, "net.0."), grid_out), state, "net.2.")
    x = x.reshape(b, x.shape[1], grid_out * grid_out).permute(0, 2, 1)
    layers = sorted(int(k.split(".")[1]) for k in state if k.startswith("readout.") and k.endswith(".weight"))
    for i, layer in enumerate(layers):
        x = x @ state[f"readout.{layer}.weight"].T + state[f"readout.{layer}.bias"]
        x = silu(x) if i < len(layers) - 1 else x
    if num_eos_tokens:
        x = torch.cat([x, state["eos_tokens"].expand(b, -1, -1)], dim=1)
    return x


@pytest.mark.parametrize("sizes", [TINY, WIDENING], ids=["tiny", "widening"])
def test_output_equals_the_reference_from_the_equations(sizes):
    model = random_model(**sizes)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all((v != 0).all() for v in state.values())
    features = torch.randn(2, sizes["grid_in"] ** 2, sizes["encoder_width"], generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    before = features.clone()
    with torch.no_grad():
        out = model(features)
    expected = reference(features, state, sizes["grid_in"], sizes["grid_out"], sizes.get("num_eos_tokens", 0))
    assert out.shape == (2, sizes["grid_out"] ** 2 + sizes.get("num_eos_tokens", 0), sizes["llm_hidden"])
    assert (out - expected).abs().max() < 1e-5 and expected.abs().max() > 1e-2
    assert torch.equal(features, before)  # the input is not changed in place


def test_full_size_parameter_count_and_keys():
    with torch.device("meta"):
        model = CAbstractor.from_config(M144, num_query_tokens=144)
    conv_norm = lambda cin, cout, k=1, groups=1: cout * (cin // groups) * k * k + 2 * cout  # conv (no bias) + LayerNorm
    se = (256 * 1024 + 256) + (1024 * 256 + 1024)
    block = conv_norm(1024, 1024) + conv_norm(1024, 1024, 3, groups=1024) + se + conv_norm(1024, 1024)
    readout = (4096 * 1024 + 4096) + (4096 * 4096 + 4096)
    expected = 2 * 3 * block + readout + 256 * 1024
    assert expected == 37_070_336
    assert sum(p.numel() for p in model.parameters()) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 2 * 3 * 13 + 4 + 1
    assert shapes["net.2.b3.conv2.conv.weight"] == (1024, 1, 3, 3) and shapes["net.0.b1.se.fc1.weight"] == (256, 1024, 1, 1)
    assert shapes["readout.0.weight"] == (4096, 1024) and shapes["readout.2.weight"] == (4096, 4096) and shapes["pos_emb"] == (1, 256, 1024)
    with torch.device("meta"):
        old_default = CAbstractor.from_config({k: v for k, v in M144.items() if k != "num_eos_tokens"})
    assert sum(p.numel() for p in old_default.parameters()) == expected + 4096


def honeybee_state(model: CAbstractor, seed: int = 1) -> dict[str, torch.Tensor]:
    """A synthetic checkpoint: the abstractor's keys under `abstractor.`, beside other modules' keys."""
    return {"abstractor." + k: v for k, v in random_state(model, seed).items()} | {"language_model.lm_head.weight": torch.ones(3, 3)}


def test_release_era_257_row_pos_emb_loads_to_the_same_output():
    current, release = CAbstractor(**TINY).double(), CAbstractor(**TINY).double()
    state = honeybee_state(current)
    cls_row = torch.randn(1, 1, TINY["encoder_width"], dtype=torch.float64)
    old = state | {"abstractor.pos_emb": torch.cat([cls_row, state["abstractor.pos_emb"]], dim=1)}
    assert old["abstractor.pos_emb"].shape == (1, 257, 32)
    load_abstractor_state(current, state)
    load_abstractor_state(release, old)
    features = torch.randn(2, 256, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(current(features), release(features))
    assert torch.equal(release.pos_emb, state["abstractor.pos_emb"])


def test_eos_tokens_follow_the_queries():
    plain, with_eos = CAbstractor(**TINY).double(), CAbstractor(**TINY, num_eos_tokens=1).double()
    state = honeybee_state(with_eos)
    load_abstractor_state(with_eos, state)
    load_abstractor_state(plain, {k: v for k, v in state.items() if k != "abstractor.eos_tokens"})
    features = torch.randn(3, 256, 32, dtype=torch.float64)
    with torch.no_grad():
        out, base = with_eos(features), plain(features)
    assert out.shape == (3, 145, 48) and torch.equal(out[:, :144], base)
    assert torch.equal(out[:, 144], state["abstractor.eos_tokens"][0].expand(3, -1))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("abstractor.net.0.b2.se.fc1.bias"), "missing (1): abstractor.net.0.b2.se.fc1.bias"),
        (lambda s: s.pop("abstractor.pos_emb"), "missing (1): abstractor.pos_emb"),
        (lambda s: s.update({"abstractor.eos_tokens": torch.zeros(1, 1, 48)}), "unexpected (1): abstractor.eos_tokens"),
        (lambda s: s.update({"abstractor.readout.0.weight": torch.zeros(48, 48)}), "mis-shaped, file vs model (1): abstractor.readout.0.weight [48, 48] vs [48, 32]"),
        (lambda s: s.update({"abstractor.pos_emb": torch.zeros(1, 258, 32)}), "mis-shaped, file vs model (1): abstractor.pos_emb [1, 258, 32] vs [1, 256, 32]"),
        (lambda s: s.update({"abstractor.pos_emb": torch.zeros(1, 257, 16)}), "mis-shaped, file vs model (1): abstractor.pos_emb [1, 257, 16] vs [1, 256, 32]"),
    ],
    ids=["missing-se", "missing-pos", "unexpected-eos", "misshaped-readout", "misshaped-258", "misshaped-width"],
)
def test_a_bad_state_dict_is_refused_with_its_own_message(change, message):
    model = CAbstractor(**TINY)
    state = honeybee_state(model)
    change(state)
    with pytest.raises(ComneckInputError) as info:
        load_abstractor_state(model, state)
    assert info.value.code == "bad_weights" and "\n" not in str(info.value)
    assert str(info.value) == f"Honeybee C-Abstractor weights do not fit: {message}"


def test_config_sizes_and_defaults():
    model = CAbstractor.from_config({**M144, "hidden_size": 32, "encoder_hidden_size": 24, "num_queries": 4, "depth": 1, "mlp_depth": 3}, llm_hidden=40, grid_in=6)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["pos_emb"] == (1, 36, 24) and shapes["net.0.b1.downsample.conv.weight"] == (32, 24, 1, 1) and "net.0.b2.conv1.conv.weight" not in shapes
    assert shapes["readout.4.weight"] == (40, 40) and "eos_tokens" not in shapes
    assert model(torch.randn(1, 36, 24)).shape == (1, 4, 40)
    bare = CAbstractor.from_config({"projector_type": "c-abs", "depth": 1, "mlp_depth": 1}, num_query_tokens=4, llm_hidden=8, grid_in=4)
    assert bare.pos_emb is None and bare.eos_tokens.shape == (1, 1, 8)  # release-era defaults: pos_emb False, 1 eos token
    assert bare(torch.randn(2, 16, 1024)).shape == (2, 5, 8)


@pytest.mark.parametrize(
    "change, num_query_tokens, message",
    [
        ({"projector_type": "d-abs"}, None, "projector_type 'd-abs' is not 'c-abs'"),
        ({"prenorm": True}, None, "prenorm is true"),
        ({"feature_layer_index": -2}, None, "feature_layer_index -2"),
        ({"num_queries": 140}, None, "num_queries 140 is not a square number"),
        ({"num_queries": 144}, 64, "num_queries 144 differs from num_query_tokens 64"),
        ({"num_queries": None}, None, "num_queries is missing"),
        ({"depth": 0}, None, "depth must be an integer >= 1, got 0"),
        ({"num_eos_tokens": -1}, None, "num_eos_tokens must be an integer >= 0, got -1"),
        ({"hidden_size": 10.5}, None, "hidden_size must be an integer >= 1, got 10.5"),
        ({"pos_emb": "yes"}, None, "pos_emb must be true or false"),
    ],
)
def test_config_it_cannot_build_is_refused(change, num_query_tokens, message):
    config = {k: v for k, v in ({**M144, **change}).items() if v is not None}
    with pytest.raises(ComneckInputError) as info:
        CAbstractor.from_config(config, num_query_tokens=num_query_tokens)
    assert info.value.code == "bad_weights" and message in str(info.value)


def test_features_of_the_wrong_shape_are_refused():
    with pytest.raises(ComneckInputError) as info:
        CAbstractor(**TINY)(torch.zeros(1, 257, 32))
    assert info.value.code == "invalid_input" and "[B, 256, 32] (CLS dropped)" in str(info.value)
