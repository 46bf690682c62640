"""Rate control (comneck_edge.rate_control, ``comneck-edge encode --max-bytes / --target-bpp``):
the highest rate point whose container fits, found with few encodes, on the bundled photos."""

import copy

import pytest
import torch

from comneck.edge_export import export_edge
from comneck.errors import ComneckInputError
from comneck.models import build_codec
from comneck.photo import sample_photo
from comneck.presets import get_preset
from comneck_edge.cli import main as edge_main
from comneck_edge.onnx_edge import OnnxEdgeEncoder
from comneck_edge.rate_control import RateLadder

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Four rate points of the tiny preset, exported for the ONNX edge: the seeded codec with g_a's
    last convolution scaled by 4**rate, so that, as a trained codec's rate points do, each spends
    more bytes than the one below it."""
    preset = get_preset("tiny")
    base, out = build_codec(preset), []
    for rate in (1, 2, 3, 4):
        codec = copy.deepcopy(base)
        last = [m for m in codec.model.g_a.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.mul_(4.0**rate)
            last.bias.mul_(4.0**rate)
        codec.update_entropy_tables()
        folder = tmp_path_factory.mktemp(f"rate{rate}") / "edge"
        export_edge(codec, preset, rate, folder, random_weights=True)
        out.append(folder)
    return out


class Counted:
    """A rate point that counts its encodes."""

    def __init__(self, point):
        self.point, self.encodes = point, 0

    def __getattr__(self, name):
        return getattr(self.point, name)

    def encode_array(self, x, source=None):
        self.encodes += 1
        return self.point.encode_array(x, source)


def test_the_highest_rate_point_that_fits_with_at_most_three_encodes(folders):
    photo = sample_photo("chicken_on_money.png")
    points = [OnnxEdgeEncoder(f) for f in folders]
    direct = [p.encode_file(photo).data for p in points]
    sizes = [len(d) for d in direct]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4, sizes  # the premise: the rate points' sizes grow
    for budget in (sizes[0], sizes[1] - 1, sizes[1], sizes[2] + 1, sizes[3] - 1, sizes[3], 10 * sizes[3]):
        counted = [Counted(p) for p in points]
        chosen = RateLadder(counted, max_bytes=budget).encode_file(photo)
        best = max(i for i, size in enumerate(sizes) if size <= budget)
        encodes = sum(c.encodes for c in counted)
        assert chosen.bitstream.rate == best + 1 and chosen.data == direct[best]
        assert encodes <= 3 and (encodes == 1) == (best == 3)
        assert chosen.rate_choice == (f"rate {best + 1}: the highest of 1, 2, 3, 4 within {budget} bytes "
                                      f"({encodes} encode{'s' if encodes > 1 else ''})")
    with pytest.raises(ComneckInputError, match=rf"smallest container of this photo is {sizes[0]} bytes \(rate 1\), above the "
                                                rf"budget of {sizes[0] - 1} bytes: allow at least {sizes[0]} bytes"):
        RateLadder(points, max_bytes=sizes[0] - 1).encode_file(photo)
    by_bpp = RateLadder(points, target_bpp=8 * sizes[2] / (256 * 256)).encode_file(photo)  # the codec sees 256 x 256
    assert by_bpp.bitstream.rate == 3 and by_bpp.data == direct[2]


def test_the_command_says_which_rate_point_it_chose(folders, tmp_path, capsys):
    photo = sample_photo("cow_beach.png")
    sizes = [len(OnnxEdgeEncoder(f).encode_file(photo).data) for f in folders]
    flags = [arg for f in folders for arg in ("--onnx", str(f))]
    out = tmp_path / "cow.cnk"
    assert edge_main(["encode", str(photo), "-o", str(out), *flags, "--max-bytes", str(sizes[2])]) == 0
    printed = capsys.readouterr().out
    assert f"rate control: rate 3: the highest of 1, 2, 3, 4 within {sizes[2]} bytes" in printed and "rate 3, fixed-point" in printed
    assert len(out.read_bytes()) == sizes[2]
    assert edge_main(["encode", str(photo), "-o", str(out), "--force", *flags, "--max-bytes", str(sizes[0] - 1)]) == 2
    assert f"allow at least {sizes[0]} bytes" in capsys.readouterr().err
    assert edge_main(["encode", str(photo), "-o", str(out), "--force", *flags]) == 2
    assert "several rate points (--onnx or --codec-weights given more than once) go with --max-bytes" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "message"), [({}, "one budget"), ({"max_bytes": 0}, "--max-bytes must be 1 or more"),
                                                 ({"target_bpp": -1.0}, "--target-bpp must be a positive")])
def test_a_bad_budget_is_refused(folders, kwargs, message):
    with pytest.raises(ComneckInputError, match=message):
        RateLadder([OnnxEdgeEncoder(folders[0])], **kwargs)


def test_two_points_of_one_rate_are_refused(folders):
    with pytest.raises(ComneckInputError, match="two rate points name the same rate"):
        RateLadder([OnnxEdgeEncoder(folders[0]), OnnxEdgeEncoder(folders[0])], max_bytes=100)
