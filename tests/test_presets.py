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


def test_rates_and_lookups():
    assert RATE_LAMBDAS == {1: 0.004, 2: 0.008, 3: 0.016, 4: 0.032}
    assert check_rate(4) == 4
    with pytest.raises(ComneckInputError):
        check_rate(0)
    with pytest.raises(ComneckInputError, match="paper, tiny"):
        get_preset("huge")
    with pytest.raises(ValueError, match="sum to M"):
        CodecConfig(M=100)
