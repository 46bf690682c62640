"""Do the ONNX edge and the torch edge write the same containers? Random crops of the shared
photos, every rate point, the tiny and paper presets.

For each crop both edges encode it (``EdgeEncoder.encode_tensor`` and
``OnnxEdgeEncoder.encode_array``, the crop as it is, padded to 64). Two things are counted:

* **containers equal**: the ONNX edge's whole container, float analysis included, is the torch
  edge's byte for byte;
* **coding equal**: the ONNX edge's coding path fed the torch edge's own y and z writes the torch
  edge's streams. This part is exact by construction and must hold for every crop.

A container can differ only where ONNX Runtime's float32 g_a/h_a (last-bit differences, about
1e-6) put a latent on the other side of a rounding boundary; the script prints, for each one that
does, the largest analysis difference and how close the torch edge's nearest latent came to a
boundary. The gateway decodes every container of both edges (checked).

Without ``--codec-weights`` the rate points are synthetic, and say so: the preset's seeded codec
with g_a's last convolution scaled by 2**rate, so the latents spread over more symbols as a
higher rate's do (seeded weights alone put nearly every symbol at 0).

    .venv/bin/python benchmarks/check_edge_bytes.py [--presets tiny paper] [--crops 200] [--rates 1 2 3 4]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from comneck.codec import LearnedCodec
from comneck.edge_export import export_edge
from comneck.fixed_point import fixed_point_parameters
from comneck.image import pad_to_stride, to_tensor
from comneck.latents import EncodedLatents
from comneck.models import build_codec
from comneck.photo import SAMPLE_PHOTOS, load_image, sample_photo
from comneck.presets import get_preset
from comneck_edge.onnx_edge import OnnxEdgeEncoder

ROOT = Path(__file__).resolve().parents[1]
SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "photos"


def photos() -> list[Image.Image]:
    found = sorted(SHARED_PHOTOS.glob("*.png")) + sorted(SHARED_PHOTOS.glob("*.jpg")) if SHARED_PHOTOS.is_dir() else []
    return [load_image(p) for p in (found or [sample_photo(n) for n in SAMPLE_PHOTOS])]


def crops(count: int, seed: int) -> list[torch.Tensor]:
    """``count`` random crops (sides 32..320, anywhere) of the photos, flipped at random."""
    rng = np.random.default_rng(seed)
    pool, out = photos(), []
    for _ in range(count):
        img = pool[rng.integers(len(pool))]
        w, h = (int(rng.integers(32, min(320, img.width) + 1)), int(rng.integers(32, min(320, img.height) + 1)))
        left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        piece = img.crop((left, top, left + w, top + h))
        out.append(to_tensor(piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else piece))
    return out


def synthetic_rate(codec: LearnedCodec, rate: int) -> LearnedCodec:
    """The seeded codec with g_a's last convolution scaled by 2**rate (see the module docstring)."""
    scaled = copy.deepcopy(codec)
    last = [m for m in scaled.model.g_a.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(2.0**rate)
        if last.bias is not None:
            last.bias.mul_(2.0**rate)
    scaled.update_entropy_tables()
    return scaled


def nearest_boundary(codec: LearnedCodec, x: torch.Tensor) -> float:
    """How close the torch edge's latents came to a rounding boundary: y_hat = round(y - mean) +
    mean, so y - mean lies 0.5 - |y - y_hat| from the nearest half-integer (z likewise)."""
    with torch.inference_mode(), fixed_point_parameters(True):
        y = codec.model.g_a(x)
        y_hat = codec.model.latent_codec.compress(y)["y_hat"]
        z = codec.model.latent_codec["hyper"].h_a(y)
        medians = codec.model.latent_codec["hyper"].entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    z_hat = torch.round(z - medians) + medians
    return float(min(0.5 - (y - y_hat).abs().max(), 0.5 - (z - z_hat).abs().max()))


def check(preset_name: str, rate: int, codec: LearnedCodec, label: str, samples: list[torch.Tensor]) -> dict[str, object]:
    preset = get_preset(preset_name)
    with tempfile.TemporaryDirectory() as folder:
        export_edge(codec, preset, rate, Path(folder), random_weights=label != "weights")
        edge = OnnxEdgeEncoder(folder)
        equal = coded = 0
        sizes, differing = [], []
        start = time.perf_counter()
        for i, x in enumerate(samples):
            padded, _ = pad_to_stride(x)
            reference, _ = codec.analyze(padded)
            torch_streams = [s[0] for s in reference.strings]
            ours = edge.encode_array(x.numpy())
            with torch.inference_mode():
                y = codec.model.g_a(padded)
                z = codec.model.latent_codec["hyper"].h_a(y)
            coded += edge.code_latents(y.numpy(), z.numpy())[0] == torch_streams
            onnx_streams = [s[0] for s in ours.bitstream.latents.strings]
            for streams in (torch_streams, onnx_streams):  # the gateway decodes both
                codec.entropy_decode(EncodedLatents([[s] for s in streams], reference.padded_size, True))
            sizes.append(8 * len(ours.data) / (x.shape[-2] * x.shape[-1]))
            if onnx_streams == torch_streams:
                equal += 1
            else:
                y_onnx, _ = edge.session("analysis.onnx").run(None, {"x": padded.numpy()})
                differing.append((i, float(np.abs(y_onnx - y.numpy()).max()), nearest_boundary(codec, padded)))
        seconds = time.perf_counter() - start
    return {"preset": preset_name, "rate": rate, "weights": label, "crops": len(samples), "containers_equal": equal,
            "coding_equal": coded, "median_bpp": float(np.median(sizes)), "seconds": seconds, "differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "paper"])
    parser.add_argument("--rates", nargs="+", type=int, default=[1, 2, 3, 4])
    parser.add_argument("--crops", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec-weights", nargs="+", help="one weight file per rate (in --rates order) instead of synthetic rate points")
    args = parser.parse_args()
    samples = crops(args.crops, args.seed)
    print(f"{len(samples)} crops of {len(photos())} photos; torch {torch.__version__}")
    failures = 0
    for preset_name in args.presets:
        for i, rate in enumerate(args.rates):
            if args.codec_weights:
                codec, label = build_codec(get_preset(preset_name), args.codec_weights[i]), "weights"
            else:
                codec, label = synthetic_rate(build_codec(get_preset(preset_name)), rate), f"seeded, g_a out x{2**rate}"
            r = check(preset_name, rate, codec, label, samples)
            failures += r["coding_equal"] != r["crops"]
            print(f"{r['preset']:>6} rate {r['rate']} ({r['weights']}): containers equal {r['containers_equal']}/{r['crops']}, "
                  f"coding equal {r['coding_equal']}/{r['crops']}, median {r['median_bpp']:.3f} bpp, {r['seconds']:.0f} s")
            for index, dy, boundary in r["differing"]:
                print(f"    crop {index}: analyses differ by up to {dy:.2g}; the torch edge's nearest latent lay {boundary:.2g} from a rounding boundary")
    if failures:
        raise SystemExit(f"{failures} preset/rate runs where the coding path did not write the torch edge's streams")


if __name__ == "__main__":
    main()
