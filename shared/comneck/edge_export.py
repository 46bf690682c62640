"""``comneck export-edge``: a codec's encoding half as files ONNX Runtime runs, for an edge
without PyTorch (``comneck_edge.onnx_edge`` reads them).

The folder holds:

* ``analysis.onnx``: g_a then h_a in float32, image [1, 3, H, W] -> (y, z), any H, W multiple of 64;
* ``params/*.onnx``: every entropy-parameter network (h_s, channel contexts, checkerboard
  contexts, parameter aggregation) in fixed point, exact (:mod:`comneck.fixed_point_onnx`);
* ``tables.npz``: the rANS tables (CompressAI's quantised CDFs, lengths and offsets) of the
  entropy bottleneck and of each Gaussian conditional, its scale table and scale bound, and the
  bottleneck's medians;
* ``edge.json``: what the edge must know to write a container the gateway accepts: format
  version, preset, codec architecture and its coding plan (channel groups, how contexts merge,
  chunk order, checkerboard parity), rate, the codec-weight fingerprint, whether the weights are
  the seeded random ones.

The ONNX edge writes only fixed-point containers: the float parameter networks could not give
the gateway's symbols on another runtime.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from compressai.latent_codecs import ChannelGroupsLatentCodec, CheckerboardLatentCodec, GaussianConditionalLatentCodec
from torch import nn

from .codec import LearnedCodec
from .edge_format import ANALYSIS, EDGE_FORMAT, MANIFEST, PARAMS, TABLES
from .fixed_point_onnx import OPSET, fixed_point_graph
from .presets import Preset
from .version import __version__
from .weights_folder import check_target


class _Analysis(nn.Module):
    """g_a then h_a: the float half of the encoder."""

    def __init__(self, codec: LearnedCodec) -> None:
        super().__init__()
        self.g_a, self.h_a = codec.model.g_a, codec.model.latent_codec["hyper"].h_a

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.g_a(x)
        return y, self.h_a(y)


def _tables(prefix: str, coder: Any) -> dict[str, np.ndarray]:
    """One entropy model's rANS tables, as CompressAI's encoder takes them."""
    return {f"{prefix}.cdf": coder._quantized_cdf.numpy().astype(np.int32), f"{prefix}.cdf_length": coder._cdf_length.numpy().astype(np.int32),
            f"{prefix}.offset": coder._offset.numpy().astype(np.int32)}


def _gaussian(prefix: str, codec: GaussianConditionalLatentCodec) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    gc = codec.gaussian_conditional
    tables = {**_tables(prefix, gc), f"{prefix}.scale_table": gc.scale_table.numpy().astype(np.float32),
              f"{prefix}.scale_bound": gc.lower_bound_scale.bound.numpy().astype(np.float32).reshape(1)}
    return {"tables": prefix, "chunks": list(codec.chunks)}, tables


def _plan(codec: LearnedCodec, nets: dict[str, nn.Module]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The coding plan of the codec's latent codec, its parameter networks named into ``nets``."""
    latent = codec.model.latent_codec
    hyper = latent["hyper"]
    bottleneck = hyper.entropy_bottleneck
    tables = {**_tables("z", bottleneck), "z.medians": bottleneck._get_medians().detach().reshape(-1).numpy().astype(np.float32)}
    nets["h_s"] = hyper.h_s
    y = latent["y"]
    if isinstance(y, GaussianConditionalLatentCodec):
        if not isinstance(y.entropy_parameters, nn.Identity):
            raise ValueError("the ONNX edge takes a hyperprior whose Gaussian reads h_s's output as it is")
        plan, more = _gaussian("y", y)
        return {"kind": "hyperprior", "y": plan}, {**tables, **more}
    if not isinstance(y, ChannelGroupsLatentCodec):
        raise ValueError(f"the ONNX edge cannot export a {type(y).__name__} latent codec")
    groups = []
    for k in range(len(y.groups)):
        board = y.latent_codec[f"y{k}"]
        if not isinstance(board, CheckerboardLatentCodec):
            raise ValueError("the ONNX edge takes channel groups coded in checkerboard passes (ELIC)")
        if k:
            nets[f"channel_context.y{k}"] = y.channel_context[f"y{k}"]
        nets[f"context_prediction.y{k}"] = board.context_prediction
        nets[f"entropy_parameters.y{k}"] = board.entropy_parameters
        plan, more = _gaussian(f"y{k}", board.latent_codec["y"])
        tables.update(more)
        groups.append({**plan, "channels": y.groups[k], "anchor_parity": board.anchor_parity,
                       "context_channels": board.context_prediction.out_channels})
    # Elic2022Chandelier patches merge_y onto the instance: the first and the latest group feed a context
    merge = "first-and-last" if "merge_y" in vars(y) else "all"
    return {"kind": "channel-groups", "merge": merge, "groups": groups}, tables


def _analysis_graph(codec: LearnedCodec, side: int) -> bytes:
    """g_a + h_a exported by torch's TorchScript-based ONNX exporter (needs only ``onnx``)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Analysis(codec).eval(), (torch.rand(1, 3, side, side),), buffer, input_names=["x"], output_names=["y", "z"],
                          dynamic_axes={"x": {2: "height", 3: "width"}, "y": {2: "h16", 3: "w16"}, "z": {2: "h64", 3: "w64"}},
                          opset_version=OPSET, dynamo=False)
    return buffer.getvalue()


def export_edge(codec: LearnedCodec, preset: Preset, rate: int, out: Path, random_weights: bool, force: bool = False) -> dict[str, Any]:
    """Write ``codec``'s encoding half into the folder ``out`` and return the manifest written to
    ``edge.json``. The files are written beside it first and replace ``out`` whole at the end
    (a non-empty ``out`` only with ``force``), so no folder ever mixes two exports."""
    check_target(out, force)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    nets: dict[str, nn.Module] = {}
    plan, tables = _plan(codec, nets)
    (staging / PARAMS).mkdir(parents=True)
    for name, module in nets.items():
        net = getattr(module, "_comneck_fixed_point", None)
        if net is None:
            raise ValueError(f"{name} has no fixed-point form: call update_entropy_tables() first")
        (staging / PARAMS / f"{name}.onnx").write_bytes(fixed_point_graph(net, name).SerializeToString())
    (staging / ANALYSIS).write_bytes(_analysis_graph(codec, max(64, preset.image_size // 64 * 64)))
    np.savez(staging / TABLES, **tables)
    manifest = {
        "format": EDGE_FORMAT, "comneck_version": __version__, "opset": OPSET,
        "preset": preset.name, "image_size": preset.image_size, "arch": codec.config.arch, "latent_channels": codec.config.M,
        "rate": rate, "fingerprint": codec.fingerprint().hex(), "random_weights": random_weights,
        "entropy_parameters": "fixed-point", "plan": plan, "params": sorted(nets),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest
