import open_clip
import pytest

from comneck.errors import ComneckInputError
from comneck.presets import PRESETS, RATE_LAMBDAS, CodecConfig, check_rate, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_widths_agree(name):
    p = PRESETS[name]
    assert p.neck.latent_channels == p.codec.M
    assert p.neck.width == p.clip.width
    assert p.neck.grid == p.image_size // 16 == p.clip.grid
    assert 0 <= p.split_block < p.clip.layers


@pytest.mark.parametrize("name", ["paper", "paper-336"])
def test_paper_clip_configs_are_open_clips_own(name):
    clip = PRESETS[name].clip
    assert clip.model_cfg == open_clip.get_model_config(clip.name)


@pytest.mark.parametrize("name", ["paper-336", "tiny-336"])
def test_336_presets_have_llava_15_geometry(name):
    p, base = PRESETS[name], PRESETS[name.removesuffix("-336")]
    assert (p.image_size, p.neck.grid, p.clip.image_size, p.clip.grid) == (384, 24, 336, 24)
    assert p.split_block == base.split_block == 2
    assert p.codec == base.codec  # the same codec: its weights and bitstreams serve both geometries


def test_rates_and_lookups():
    assert RATE_LAMBDAS == {1: 0.004, 2: 0.008, 3: 0.016, 4: 0.032}
    assert check_rate(4) == 4
    with pytest.raises(ComneckInputError):
        check_rate(0)
    with pytest.raises(ComneckInputError, match="paper, tiny"):
        get_preset("huge")
    with pytest.raises(ValueError, match="sum to M"):
        CodecConfig(M=100)
