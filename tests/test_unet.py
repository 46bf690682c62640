import torch

from comneck.complexity import PAPER_TABLE3
from comneck.unet import UNet


def test_unet_has_the_classic_parameter_count():
    with torch.device("meta"):
        unet = UNet()
    params = sum(p.numel() for p in unet.parameters())
    assert params == 31_037_763
    assert abs(params / 1e6 - PAPER_TABLE3["unet"][0]) / PAPER_TABLE3["unet"][0] < 0.005


def test_unet_keeps_any_image_size_and_starts_as_a_residual():
    unet = UNet(base=8).eval()
    x = torch.rand(2, 3, 70, 45)
    with torch.no_grad():
        out = unet(x)
        assert out.shape == x.shape
        torch.nn.init.zeros_(unet.outc.weight)
        torch.nn.init.zeros_(unet.outc.bias)
        assert torch.equal(unet(x), x)
