import pytest
import torch

from comneck.clip_split import ClipSplit, build_clip
from comneck.errors import ComneckInputError
from comneck.presets import PRESETS


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(PRESETS["tiny"].clip).eval()


@pytest.fixture(scope="module")
def tiny_clip_336():
    torch.manual_seed(0)
    return build_clip(PRESETS["tiny-336"].clip).eval()


@pytest.mark.parametrize("k", [0, 2, 3])
def test_head_then_tail_equals_encode_image_exactly(tiny_clip, k):
    x = torch.randn(2, 3, 224, 224)
    split = ClipSplit(tiny_clip.visual, k)
    with torch.no_grad():
        ours = split.tail(split.head(x)).embedding
        ref = tiny_clip.encode_image(x)
    assert torch.equal(ours, ref)


def test_hidden_taps_equal_open_clip_intermediates(tiny_clip):
    x = torch.randn(1, 3, 224, 224)
    split = ClipSplit(tiny_clip.visual, 2)
    with torch.no_grad():
        feats = split.tail(split.head(x), hidden_blocks=[3, 4])
        ref = tiny_clip.visual.forward_intermediates(x, indices=[2, 3], output_fmt="NLC", intermediates_only=True)
    for j, ref_tokens in zip([3, 4], ref["image_intermediates"]):
        assert torch.equal(feats.hidden[j][:, 1:], ref_tokens)  # open_clip drops the class token here
    assert feats.post_ln.shape == (1, 257, 64) and feats.projected.shape == (1, 257, 32)
    torch.testing.assert_close(feats.projected[:, 0], feats.embedding)  # class-token pooling


def test_paper_size_vit_l14_split_equals_encode_image():
    torch.manual_seed(0)
    clip = build_clip(PRESETS["paper"].clip).eval()
    split = ClipSplit(clip.visual, 2)
    assert split.num_blocks == 24 and split.width == 1024
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        head = split.head(x)
        feats = split.tail(head, hidden_blocks=[23, 24])
        ref = clip.encode_image(x)
    assert head.shape == (1, 257, 1024)
    assert feats.embedding.shape == (1, 768) and feats.hidden[23].shape == (1, 257, 1024)
    assert torch.equal(feats.embedding, ref)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_head_then_tail_equals_encode_image_exactly_at_336_px(tiny_clip_336, k):
    clip = tiny_clip_336
    assert clip.visual.positional_embedding.shape == (577, 64)
    x = torch.randn(2, 3, 336, 336)
    split = ClipSplit(clip.visual, k)
    with torch.no_grad():
        head = split.head(x)
        feats = split.tail(head, hidden_blocks=[4])
        ref = clip.encode_image(x)
    assert head.shape == (2, 577, 64) and feats.hidden[4].shape == (2, 577, 64)
    assert torch.equal(feats.embedding, ref)


def test_paper_336_is_vit_l14_with_577_positions():
    with torch.device("meta"):
        paper, paper_336 = (build_clip(PRESETS[name].clip) for name in ("paper", "paper-336"))
    assert PRESETS["paper-336"].clip.grid == 24 and paper_336.visual.positional_embedding.shape == (577, 1024)
    visual = sum(p.numel() for p in paper_336.visual.parameters())
    assert visual == sum(p.numel() for p in paper.visual.parameters()) + (577 - 257) * 1024 == 304_293_888
    split = ClipSplit(paper_336.visual, PRESETS["paper-336"].split_block)
    head = split.head(torch.empty(1, 3, 336, 336, device="meta"))
    assert head.shape == (1, 577, 1024) and split.tail(head).embedding.shape == (1, 768)


def test_split_and_taps_are_validated(tiny_clip):
    with pytest.raises(ComneckInputError, match="0..3"):
        ClipSplit(tiny_clip.visual, 4)
    split = ClipSplit(tiny_clip.visual, 2)
    with pytest.raises(ComneckInputError, match="not in the CLIP tail"):
        split.tail(torch.zeros(1, 257, 64), hidden_blocks=[2])


def _official_visual(sd: dict, x: torch.Tensor, start_layer: int, heads: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's ``VisionTransformer.forward`` (NYCU-MAPL/BridgingCompressionMLLM,
    examples/CLIP_modify/clip/model.py) written out as equations on a state dict in float64:
    embeddings only when ``start_layer == 0``, blocks ``start_layer ..``, then ``ln_post`` twice,
    ``@ proj``; returns (class token, all tokens) as it does."""
    def ln(v, name):
        mean, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mean) / torch.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]

    def linear(v, name):
        return v @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    if start_layer == 0:
        x = torch.nn.functional.conv2d(x, sd["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
        cls = sd["class_embedding"].expand(x.shape[0], 1, -1)
        x = ln(torch.cat([cls, x], dim=1) + sd["positional_embedding"], "ln_pre")
    layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    for i in range(start_layer, layers):
        p = f"transformer.resblocks.{i}"
        h = ln(x, f"{p}.ln_1")
        q, k, v = (h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731  [B, heads, T, d]
        q, k, v = split(q), split(k), split(v)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        x = x + linear(attn.transpose(1, 2).flatten(2), f"{p}.attn.out_proj")
        h = linear(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")
        x = x + linear(h * torch.sigmoid(1.702 * h), f"{p}.mlp.c_proj")  # QuickGELU
    x = ln(x, "ln_post")
    x = ln(x, "ln_post")  # the official forward's second ln_post
    x = x @ sd["proj"]
    return x[:, 0, :], x


@pytest.fixture(scope="module")
def random_tiny_clip():
    """The tiny CLIP with every parameter random and non-zero (a LayerNorm of weight 1 and bias 0 is
    nearly idempotent, which would hide a missing second ln_post), in float64."""
    torch.manual_seed(1)
    clip = build_clip(PRESETS["tiny"].clip).double().eval()
    with torch.no_grad():
        for p in clip.visual.parameters():
            p.add_(torch.randn_like(p) * 0.5).add_(0.1 * torch.sign(torch.randn_like(p)))
    assert all(bool((p != 0).all()) for p in clip.visual.parameters())
    return clip


@pytest.mark.parametrize("start_layer", [0, 2])
def test_final_norm_twice_equals_the_official_clip_equation_by_equation(random_tiny_clip, start_layer):
    visual = random_tiny_clip.visual
    sd = {k: v for k, v in visual.state_dict().items()}
    heads = visual.transformer.resblocks[0].attn.num_heads
    twice, once = ClipSplit(visual, 2, "twice"), ClipSplit(visual, 2, "once")
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        # start_layer 0: the teacher (pixels); 2: the student, whose neck tokens enter block 3
        tokens = images if start_layer == 0 else twice.head(images) + 0.3 * torch.randn(2, 257, 64, dtype=torch.float64)
        ref_cls, ref_all = _official_visual(sd, tokens, start_layer, heads, patch=14)
        feats = twice(tokens) if start_layer == 0 else twice.tail(tokens, hidden_blocks=[3, 4])
        plain = once(tokens) if start_layer == 0 else once.tail(tokens, hidden_blocks=[3, 4])
    torch.testing.assert_close(feats.embedding, ref_cls, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(feats.projected, ref_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(feats.post_ln @ visual.proj, ref_all, rtol=1e-12, atol=1e-12)
    assert (feats.embedding - plain.embedding).abs().max() > 1e-2  # once is another CLIP: the test tells them apart
    assert feats.hidden.keys() == plain.hidden.keys() and all(torch.equal(feats.hidden[j], plain.hidden[j]) for j in feats.hidden)


def test_final_norm_is_validated(tiny_clip):
    with pytest.raises(ComneckInputError, match="'thrice' is no CLIP final-norm setting; use once"):
        ClipSplit(tiny_clip.visual, 2, "thrice")
