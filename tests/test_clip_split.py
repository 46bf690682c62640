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
