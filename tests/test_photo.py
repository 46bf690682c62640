"""comneck.photo: the torch-free photo path gives what torchvision and CompressAI give."""

import subprocess
import sys

import numpy as np
import pytest
from compressai.ops import compute_padding
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from comneck.image import to_tensor
from comneck.photo import pad_array, padding_of, resize_for_codec, to_array


def photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize(("width", "height", "size"), [(640, 480, 256), (480, 640, 256), (257, 1000, 256), (1000, 257, 256),
                                                        (256, 256, 256), (300, 301, 224), (99, 37, 384), (383, 385, 384)])
def test_the_paper_policy_is_torchvisions_resize_and_centre_crop(width, height, size):
    img = photo(width, height, width * height)
    reference = TF.center_crop(TF.resize(img, size, interpolation=InterpolationMode.BICUBIC), size)
    ours = resize_for_codec(img, "paper", size)
    assert ours.size == (size, size)
    assert np.array_equal(np.asarray(ours), np.asarray(reference))


@pytest.mark.parametrize(("height", "width"), [(1, 1), (64, 64), (65, 129), (256, 200), (383, 511)])
def test_padding_is_compressais(height, width):
    (left, right, top, bottom), _ = compute_padding(height, width, min_div=64)
    p = padding_of(height, width)
    assert (p.left, p.right, p.top, p.bottom) == (left, right, top, bottom)
    padded, _ = pad_array(np.ones((1, 3, height, width), np.float32))
    assert padded.shape[-2:] == p.padded_size(height, width) and padded.sum() == 3 * height * width


def test_the_array_is_the_tensor():
    img = photo(33, 17, 0)
    assert np.array_equal(to_array(img), to_tensor(img).numpy())


def test_the_container_side_imports_no_torch():
    code = ("import sys; import comneck.photo, comneck.bitstream, comneck.latents; "
            "bad = [m for m in ('torch', 'compressai', 'torchvision') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
