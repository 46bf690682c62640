"""The learned image codec (ELIC, or a second CompressAI codec), split the way ComNeck uses it.

* :meth:`LearnedCodec.analyze` (edge): g_a, h_a, quantisation and rANS entropy coding -> strings.
* :meth:`LearnedCodec.entropy_decode` (cloud): strings -> y_hat, *without* the synthesis g_s.
* :meth:`LearnedCodec.synthesize`: g_s, only for people who want to look at the image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from compressai.latent_codecs import GaussianConditionalLatentCodec, HyperLatentCodec, HyperpriorLatentCodec
from compressai.layers import MaskedConv2d
from compressai.models import Elic2022Chandelier, Elic2022Official, MeanScaleHyperprior
from compressai.models.base import SimpleVAECompressionModel
from torch import nn

from .cut_tables import install as install_cut_tables
from .errors import ComneckInputError, ErrorCode
from .fixed_point import fixed_point_parameters
from .fixed_point import install as install_fixed_point
from .image import CODEC_STRIDE, check_image_tensor
from .latents import EncodedLatents
from .presets import CodecConfig
from .provenance import WeightsInfo
from .safe_decoding import checked_streams
from .safe_decoding import install as install_checking_coders



class MeanScaleHyperpriorLatents(SimpleVAECompressionModel):
    """CompressAI's mbt2018-mean (``MeanScaleHyperprior``: Minnen et al. 2018 without the
    autoregressive context) with its entropy model written as CompressAI latent codecs, the form
    ELIC has: ``latent_codec.decompress`` gives y_hat without g_s, and the fixed-point and checked
    decoders find its parameter network (h_s) and coders the same way. Same layers, same
    computation; the zoo's keys map one to one (comneck.importers.mbt2018)."""

    def __init__(self, N: int = 128, M: int = 192) -> None:
        super().__init__()
        base = MeanScaleHyperprior(N, M)  # the published layers, taken over as they are
        self.g_a, self.g_s = base.g_a, base.g_s
        hyper = HyperLatentCodec(entropy_bottleneck=base.entropy_bottleneck, h_a=base.h_a, h_s=base.h_s)
        # h_s's output splits into scales then means, as MeanScaleHyperprior's chunk(2, 1) does
        self.latent_codec = HyperpriorLatentCodec(latent_codec={"y": GaussianConditionalLatentCodec(chunks=("scales", "means")),
                                                                "hyper": hyper})


def _elic(arch: type[nn.Module]) -> "Callable[[CodecConfig], nn.Module]":
    return lambda cfg: arch(N=cfg.N, M=cfg.M, groups=list(cfg.groups))


#: The codec registry: architecture name (comneck.presets.CODEC_ARCHS) -> CompressAI model builder.
_ARCHS: dict[str, Callable[[CodecConfig], nn.Module]] = {
    "elic2022-chandelier": _elic(Elic2022Chandelier),  # the official ComNeck code's ELIC_LLM architecture
    "elic2022-official": _elic(Elic2022Official),
    "mbt2018-mean": lambda cfg: MeanScaleHyperpriorLatents(N=cfg.N, M=cfg.M),
}

def _gaussian_compress(self: GaussianConditionalLatentCodec, y: torch.Tensor, ctx_params: torch.Tensor) -> dict[str, Any]:
    """CompressAI's ``GaussianConditionalLatentCodec.compress`` without decoding its own strings
    again for y_hat: rANS is lossless (out-of-range symbols go through its bypass), so the decoded
    y_hat is round(y - mean) + mean, computed here directly. Same strings, same y_hat."""
    scales_hat, means_hat = self._chunk(self.entropy_parameters(ctx_params))
    indexes = self.gaussian_conditional.build_indexes(scales_hat)
    y_strings = self.gaussian_conditional.compress(y, indexes, means_hat)
    y_hat = self.gaussian_conditional.quantize(y, "dequantize", means_hat)
    return {"strings": [y_strings], "shape": y.shape[2:4], "y_hat": y_hat}


def _hyper_compress(self: HyperLatentCodec, y: torch.Tensor) -> dict[str, Any]:
    """CompressAI's ``HyperLatentCodec.compress`` without decoding z's strings again: z_hat is
    round(z - median) + median, as the entropy bottleneck's decoder gives it."""
    z = self.h_a(y)
    bottleneck = self.entropy_bottleneck
    z_strings = bottleneck.compress(z)
    medians = bottleneck._extend_ndims(bottleneck._get_medians().detach(), z.dim() - 2)
    z_hat = bottleneck.quantize(z, "dequantize", medians.expand(z.size(0), *([-1] * (z.dim() - 1))))
    return {"strings": [z_strings], "shape": z.size()[-2:], "params": self.h_s(z_hat)}


def skip_redecoding(model: nn.Module) -> None:
    """Let ``model``'s latent codecs compress without entropy-decoding what they just encoded
    (CompressAI's ``compress`` does, for y_hat and z_hat: wasted work on the edge)."""
    for module in model.modules():
        if isinstance(module, GaussianConditionalLatentCodec):
            module.compress = MethodType(_gaussian_compress, module)
        elif isinstance(module, HyperLatentCodec):
            module.compress = MethodType(_hyper_compress, module)


#: g_a downsamples by 16: y has H/16 x W/16 positions; z (after h_a) H/64 x W/64.
LATENT_STRIDE = 16


class LearnedCodec(nn.Module):
    """A codec of the registry with the encoder, entropy decoder and synthesis exposed separately."""

    def __init__(self, config: CodecConfig | None = None) -> None:
        super().__init__()
        self.config = config or CodecConfig()
        cfg = self.config
        self.model = _ARCHS[cfg.arch](cfg)
        skip_redecoding(self.model)
        install_cut_tables(self.model)
        self.weights_info: WeightsInfo | None = None  # set by build_codec when weights are loaded

    @property
    def trained_rate(self) -> int | None:
        """The rate index the loaded weights were trained for; None when unknown or seeded."""
        return self.weights_info.rate if self.weights_info else None

    @property
    def latent_channels(self) -> int:
        return self.config.M

    @property
    def checkerboard(self) -> bool:
        """ELIC codes each channel group in two checkerboard passes; mbt2018-mean codes y in one."""
        return self.config.arch != "mbt2018-mean"

    @property
    def num_streams(self) -> int:
        return (2 if self.checkerboard else 1) * len(self.config.groups) + 1

    def fingerprint(self, size: int = 8) -> bytes:
        """First ``size`` bytes of a SHA-256 over every weight and entropy table (names, dtypes,
        shapes, values): equal only for codecs that code the same bitstreams."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.digest()[:size]

    def apply_context_masks(self) -> None:
        """Zero the masked taps of the context models' masked convolutions now, as their first
        forward would, so the weights (and the fingerprint) are the same before and after use."""
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, MaskedConv2d):
                    module.weight.mul_(module.mask)

    def update_entropy_tables(self) -> None:
        """Rebuild the rANS CDF tables and the fixed-point parameter networks from the current
        weights (after init, loading or training)."""
        self.model.update(force=True)
        install_fixed_point(self.model)

    @torch.inference_mode()
    def analyze(self, x: torch.Tensor, fixed_point: bool = True) -> tuple[EncodedLatents, torch.Tensor]:
        """Encode a padded batch [B, 3, H, W] (H, W multiples of 64) -> (strings, y_hat as coded).

        ``fixed_point`` (the default) evaluates the entropy parameters in fixed point, so every
        decoder machine reads the same symbols; False gives CompressAI's own float bitstreams."""
        check_image_tensor(x)
        h, w = x.shape[-2:]
        if h % CODEC_STRIDE or w % CODEC_STRIDE:
            raise ComneckInputError(f"codec input must be padded to multiples of {CODEC_STRIDE}, got {h}x{w}")
        with fixed_point_parameters(fixed_point):
            out = self.model.compress(x)
        return EncodedLatents(out["strings"], (int(h), int(w)), fixed_point), out["y_hat"]

    def stream_symbols(self, padded_size: tuple[int, int]) -> list[int]:
        """How many symbols each stream of one image holds, in stream order: per channel group an
        anchor and a non-anchor checkerboard pass over half the positions each (ELIC) or one pass
        over all of them (mbt2018-mean), then z."""
        h, w = padded_size
        positions = (h // LATENT_STRIDE) * (w // LATENT_STRIDE)
        z = self.model.latent_codec["hyper"].entropy_bottleneck.channels * (h // CODEC_STRIDE) * (w // CODEC_STRIDE)
        if not self.checkerboard:
            return [self.config.M * positions, z]
        return [c * positions // 2 for c in self.config.groups for _ in range(2)] + [z]

    def latent_shape(self, padded_size: tuple[int, int]) -> dict[str, object]:
        """The ``shape`` argument of CompressAI's ``latent_codec.decompress`` for one padded size."""
        h, w = padded_size
        yh, yw = h // LATENT_STRIDE, w // LATENT_STRIDE
        y: object = [(c, yh, yw) for c in self.config.groups] if self.checkerboard else (yh, yw)
        return {"y": y, "hyper": (h // CODEC_STRIDE, w // CODEC_STRIDE)}

    @torch.inference_mode()
    def entropy_decode(self, latents: EncodedLatents) -> torch.Tensor:
        """Strings -> y_hat [B, M, H/16, W/16], with the entropy parameters evaluated the way the
        encoder did (``latents.fixed_point``); g_s is never run here. Untrusted strings are safe:
        :mod:`comneck.safe_decoding` keeps the decoder inside its buffers and refuses streams that
        do not hold exactly the grid's symbols (``corrupt_bitstream``)."""
        if len(latents.strings) != self.num_streams:
            raise ComneckInputError(f"expected {self.num_streams} entropy-coded streams, got {len(latents.strings)}",
                                    ErrorCode.CORRUPT_BITSTREAM)
        shape = self.latent_shape(latents.padded_size)
        install_checking_coders(self.model)  # again: copies of an entropy model come with a plain coder
        symbols = self.stream_symbols(latents.padded_size)
        with checked_streams(latents.strings, symbols) as padded, fixed_point_parameters(latents.fixed_point):
            y_hat = self.model.latent_codec.decompress(padded, shape)["y_hat"]
        if not bool(torch.isfinite(y_hat).all()):
            raise ComneckInputError("the entropy-coded streams decode to latents that are not finite", ErrorCode.CORRUPT_BITSTREAM)
        return y_hat

    @torch.inference_mode()
    def synthesize(self, y_hat: torch.Tensor) -> torch.Tensor:
        """g_s: y_hat -> reconstructed image in [0, 1] (padded size)."""
        return self.model.g_s(y_hat).clamp_(0, 1)
