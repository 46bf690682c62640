"""The ONNX edge: a photo -> the ComNeck container, with ONNX Runtime and numpy, no PyTorch.

It runs a folder written by ``comneck export-edge`` (:mod:`comneck.edge_export`): the float
analysis (g_a, h_a) and the fixed-point parameter networks in ONNX Runtime, and between them the
coding plan CompressAI's latent codecs follow in ``compress`` (hyperprior, channel groups,
checkerboard passes), written again here in numpy, step for step, so that the symbols, the CDF
indexes and therefore CompressAI's rANS bytes (:mod:`comneck.rans_encoder`) are the torch
edge's for the same y and z. Quantisation is float32 ``round(y - mean)`` (half to even, as
torch rounds) and ``y_hat = symbol + mean``, the same IEEE operations as CompressAI's.

What the two edges share exactly is everything after the analysis transform: g_a and h_a are
float networks, and ONNX Runtime's float32 kernels sum in another order than PyTorch's, so y
differs in its last bits (about 1e-6) and a value that lies that close to a rounding boundary
can land on the other symbol (docs/edge.md measures how often). The gateway decodes either
container the same way on every machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from comneck.bitstream import Bitstream, Source
from comneck.edge_format import ANALYSIS, EDGE_FORMAT, MANIFEST, PARAMS, TABLES
from comneck.errors import ComneckInputError
from comneck.latents import EncodedLatents
from comneck.photo import ResizePolicy, pad_array
from comneck.rans_encoder import encode_with_indexes

from .encoded import EncodedImage, encode_photo


def _unembed(x: np.ndarray, parity: str) -> np.ndarray:
    """[B, C, H, W] -> [2, B, C, H, W/2]: the anchor then the non-anchor checkerboard positions,
    each row's half packed (CompressAI's ``CheckerboardLatentCodec.unembed``)."""
    first, second = (0, 1) if parity == "even" else (1, 0)
    out = np.empty((2, *x.shape[:-1], x.shape[-1] // 2), x.dtype)
    out[0, ..., 0::2, :], out[0, ..., 1::2, :] = x[..., 0::2, first::2], x[..., 1::2, second::2]
    out[1, ..., 0::2, :], out[1, ..., 1::2, :] = x[..., 0::2, second::2], x[..., 1::2, first::2]
    return out


def _embed(x: np.ndarray, parity: str) -> np.ndarray:
    """The inverse of :func:`_unembed`."""
    first, second = (0, 1) if parity == "even" else (1, 0)
    out = np.empty((*x.shape[1:-1], x.shape[-1] * 2), x.dtype)
    out[..., 0::2, first::2], out[..., 1::2, second::2] = x[0, ..., 0::2, :], x[0, ..., 1::2, :]
    out[..., 0::2, second::2], out[..., 1::2, first::2] = x[1, ..., 0::2, :], x[1, ..., 1::2, :]
    return out


def _session(path: Path, threads: int | None) -> Any:
    """An ONNX Runtime CPU session; a runtime that cannot run the graph is refused in one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep: a shared or battery-powered CPU
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, which differ between releases
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ComneckInputError(f"ONNX Runtime {ort.__version__} cannot run {path.name} ({reason}); install the version of "
                                "requirements/edge-lite.txt, or export the folder again with `comneck export-edge`") from None


class OnnxEdgeEncoder:
    """Encodes photos with an exported edge folder (``comneck export-edge``)."""

    def __init__(self, folder: str | Path, resize: ResizePolicy = "paper", threads: int | None = None) -> None:
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except FileNotFoundError:
            raise ComneckInputError(f"{self.folder} is not an ONNX edge folder (no {MANIFEST}): write one with "
                                    "`comneck export-edge WEIGHTS -o FOLDER`") from None
        except (OSError, ValueError) as exc:
            raise ComneckInputError(f"cannot read {self.folder / MANIFEST}: {exc}") from None
        if manifest.get("format") != EDGE_FORMAT:
            raise ComneckInputError(f"{self.folder} holds ONNX edge format {manifest.get('format')}; this edge reads format "
                                    f"{EDGE_FORMAT}: export it again with this version's `comneck export-edge`")
        self.manifest = manifest
        self.resize = resize
        self.preset_name = manifest["preset"]
        self.image_size = int(manifest["image_size"])
        self.arch = manifest["arch"]
        self.rate = int(manifest["rate"])
        self.fingerprint = bytes.fromhex(manifest["fingerprint"])
        self.random_weights = bool(manifest["random_weights"])
        self.plan = manifest["plan"]
        self.fixed_point = True
        with np.load(self.folder / TABLES) as tables:
            self._tables = {name: tables[name] for name in tables.files}
        for name, table in self._tables.items():
            if name.endswith(".scale_table") and not np.all(np.diff(table) > 0):
                raise ComneckInputError(f"{self.folder / TABLES}: {name} does not ascend; export the folder again")
        self._threads = threads
        self._sessions: dict[str, Any] = {}

    def check(self, preset: str | None = None, rate: int | None = None, fingerprint: bytes | None = None) -> None:
        """Refuse a folder exported for another preset, rate point or codec weights than asked for."""
        if preset is not None and preset != self.preset_name:
            raise ComneckInputError(f"{self.folder} was exported for preset {self.preset_name}, not {preset}: export the folder "
                                    f"for {preset} (`comneck export-edge --preset {preset}`) or drop --preset")
        if rate is not None and rate != self.rate:
            raise ComneckInputError(f"{self.folder} was exported for rate {self.rate}, not {rate}: export that rate point's weights")
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ComneckInputError(f"{self.folder} holds codec weights {self.fingerprint.hex()}, the given weights are "
                                    f"{fingerprint.hex()}: export these weights with `comneck export-edge`")

    def encode_file(self, source: str | Path | bytes) -> EncodedImage:
        """Decode a photo, apply the resize policy, encode (as :meth:`EdgeEncoder.encode_file`)."""
        return encode_photo(self, source)

    def encode_array(self, x: np.ndarray, source: Source | None = None) -> EncodedImage:
        """Encode one image [1, 3, H, W] float32 in [0, 1]; it is padded to multiples of 64 first."""
        if x.ndim != 4 or x.shape[:2] != (1, 3) or 0 in x.shape:
            raise ComneckInputError(f"expected one RGB image [1, 3, H, W], got shape {list(x.shape)}")
        start = time.perf_counter()
        padded, _ = pad_array(np.ascontiguousarray(x, dtype=np.float32))
        y, z = self.session(ANALYSIS).run(None, {"x": padded})
        strings, _ = self.code_latents(y, z)
        latents = EncodedLatents([[s] for s in strings], (padded.shape[-2], padded.shape[-1]), True)
        stream = Bitstream(self.arch, self.rate, self.fingerprint, (x.shape[-2], x.shape[-1]), latents, source)
        data = stream.to_bytes()
        return EncodedImage(stream, data, {"analysis_entropy_coding": (time.perf_counter() - start) * 1e3})

    def code_latents(self, y: np.ndarray, z: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """The analysis outputs y [1, M, h, w] and z -> (the container's rANS streams, in its order:
        y's (per channel group: anchor, non-anchor), then z's; y_hat as a decoder reads it)."""
        medians = self._tables["z.medians"].reshape(1, -1, 1, 1)
        z_symbols = np.round(z - medians)
        z_indexes = np.broadcast_to(np.arange(z.shape[1], dtype=np.int32).reshape(1, -1, 1, 1), z.shape)
        z_string = self._rans("z", z_symbols, z_indexes)
        side = self._net("h_s", z_symbols + medians)
        if self.plan["kind"] == "hyperprior":
            string, y_hat = self._gaussian(self.plan["y"], y, side)
            return [string, z_string], y_hat
        strings, y_hats, start = [], [], 0
        for k, group in enumerate(self.plan["groups"]):
            y_k = y[:, start : start + group["channels"]]
            start += group["channels"]
            params = side
            if k:
                merge_first_and_last = self.plan["merge"] == "first-and-last" and k > 1
                seen = np.concatenate([y_hats[0], y_hats[-1]] if merge_first_and_last else y_hats, axis=1)
                params = np.concatenate([self._net(f"channel_context.y{k}", seen), side], axis=1)
            group_strings, y_hat = self._checkerboard(k, group, y_k, params)
            strings += group_strings
            y_hats.append(y_hat)
        return [*strings, z_string], np.concatenate(y_hats, axis=1)

    def _checkerboard(self, k: int, group: dict[str, Any], y: np.ndarray, side: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """CompressAI's ``CheckerboardLatentCodec.compress``: the anchors with no spatial context,
        then the non-anchors with the context of the decoded anchors."""
        parity = group["anchor_parity"]
        y_, side_ = _unembed(y, parity), _unembed(side, parity)
        y_hat_ = np.zeros_like(y_)
        strings = []
        for i in range(2):
            if i == 0:  # CompressAI computes this context and then zeroes it: the anchors see none
                context = np.zeros((*y_.shape[1:2], group["context_channels"], *y_.shape[3:]), np.float32)
            else:
                context = _unembed(self._net(f"context_prediction.y{k}", _embed(y_hat_, parity)), parity)[i]
            params = self._net(f"entropy_parameters.y{k}", np.concatenate([context, side_[i]], axis=1))
            string, y_hat_[i] = self._gaussian(group, y_[i], params)
            strings.append(string)
        return strings, _embed(y_hat_, parity)

    def _gaussian(self, plan: dict[str, Any], y: np.ndarray, params: np.ndarray) -> tuple[bytes, np.ndarray]:
        """CompressAI's ``GaussianConditionalLatentCodec.compress``: -> (string, y_hat)."""
        first, second = np.split(params, 2, axis=1)
        means, scales = (first, second) if plan["chunks"] == ["means", "scales"] else (second, first)
        prefix = plan["tables"]
        table = self._tables[f"{prefix}.scale_table"]
        bounded = np.maximum(scales, self._tables[f"{prefix}.scale_bound"][0])
        # GaussianConditional.build_indexes counts the table's entries (but the last) below each
        # scale; the table ascends, so that count is a sorted search with exact float32 comparisons
        indexes = np.searchsorted(table[:-1], bounded, side="left").astype(np.int32)
        symbols = np.round(y - means)
        return self._rans(prefix, symbols, indexes), symbols + means

    def _rans(self, prefix: str, symbols: np.ndarray, indexes: np.ndarray) -> bytes:
        t = self._tables
        return encode_with_indexes(symbols.astype(np.int32).ravel(), np.ascontiguousarray(indexes).ravel(), t[f"{prefix}.cdf"],
                                   t[f"{prefix}.cdf_length"], t[f"{prefix}.offset"])

    def _net(self, name: str, x: np.ndarray) -> np.ndarray:
        return self.session(f"{PARAMS}/{name}.onnx").run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def session(self, file: str) -> Any:
        """The ONNX Runtime session of one of the folder's graphs, made on first use. The parameter
        networks are small: one thread each, and no thread spins waiting for work."""
        if file not in self._sessions:
            self._sessions[file] = _session(self.folder / file, self._threads if file == ANALYSIS else 1)
        return self._sessions[file]

