"""The ONNX edge (comneck export-edge + comneck_edge.onnx_edge): the torch edge's bytes without torch.

What is exact by construction is proven exactly: the fixed-point graphs against
comneck.fixed_point's bits, and the whole coding path (symbols, indexes, rANS) against
CompressAI's ``compress`` fed the same y. The float analysis (g_a, h_a) is compared with a
tolerance, and the containers of the bundled photos byte for byte (docs/edge.md says why a float
analysis can differ in a symbol that lies within ~1e-6 of a rounding boundary).
"""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from compressai.layers import CheckerboardMaskedConv2d
from onnx import TensorProto, helper
from torch import nn

from comneck.codec import LearnedCodec
from comneck.edge_export import export_edge
from comneck.fixed_point import FixedPointNet, fixed_point_parameters
from comneck.fixed_point_onnx import fixed_point_graph
from comneck.image import pad_to_stride, to_tensor
from comneck.latents import EncodedLatents
from comneck.models import build_codec
from comneck.photo import SAMPLE_PHOTOS, load_image, resize_for_codec, sample_photo
from comneck.presets import get_preset
from comneck_edge.cli import main as edge_main
from comneck_edge.encoder import EdgeEncoder
from comneck_edge.onnx_edge import OnnxEdgeEncoder

ort = pytest.importorskip("onnxruntime")


def run_graph(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def random_nonzero(module: nn.Module, scale: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=g) + 0.05) * scale * torch.where(torch.rand(p.shape, generator=g) < 0.5, -1, 1))
    return module


@pytest.mark.parametrize("seed", [0, 1])
def test_a_fixed_point_graph_gives_the_torch_bits(seed):
    """Every layer kind the parameter networks use, with inputs up to the activation limit, so the
    sums come close to the 2**52 bound the integer weights were scaled for."""
    masked = CheckerboardMaskedConv2d(5, 6, kernel_size=5, padding=2)
    net = random_nonzero(nn.Sequential(
        nn.Conv2d(4, 5, 5, padding=2), nn.LeakyReLU(0.01), masked, nn.ReLU(),
        nn.ConvTranspose2d(6, 7, 5, stride=2, padding=2, output_padding=1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(7, 5, 3, stride=1, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 1),
    ), scale=3.0, seed=seed)
    with torch.no_grad():
        masked.weight.mul_(masked.mask)
    fixed = FixedPointNet(net)
    g = torch.Generator().manual_seed(seed + 10)
    for shape, spread in (((1, 4, 6, 10), 8000.0), ((1, 4, 4, 4), 2.0)):
        x = (torch.rand(shape, generator=g) * 2 - 1) * spread
        expected = fixed(x).numpy()
        assert np.array_equal(run_graph(fixed_point_graph(fixed, "net"), x.numpy()), expected)
    assert np.abs(expected).max() > 0


def tiny_codec(arch: str = "elic2022-chandelier") -> tuple[LearnedCodec, object]:
    preset = get_preset("tiny-mbt2018-mean" if arch == "mbt2018-mean" else "tiny")
    if arch == "elic2022-official":
        torch.manual_seed(3)
        codec = LearnedCodec(replace(preset.codec, arch=arch))
        codec.apply_context_masks()
        codec.update_entropy_tables()
        return codec, preset
    return build_codec(preset), preset


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported folder per codec architecture: {arch: (codec, folder)}."""
    out = {}
    for arch in ("elic2022-chandelier", "elic2022-official", "mbt2018-mean"):
        codec, preset = tiny_codec(arch)
        folder = tmp_path_factory.mktemp(arch) / "edge"
        export_edge(codec, preset, 1, folder, random_weights=True)
        out[arch] = (codec, folder)
    return out


@pytest.mark.parametrize("arch", ["elic2022-chandelier", "elic2022-official", "mbt2018-mean"])
def test_the_coding_path_writes_compressais_strings_for_the_same_latents(exported, arch):
    """Given the same y, the ONNX edge's symbols, CDF indexes and rANS bytes are CompressAI's
    (fixed-point ``compress``), including symbols far outside the tables (bypass coding), and the
    gateway's decoder reads back the y_hat the edge computed."""
    codec, folder = exported[arch]
    edge = OnnxEdgeEncoder(folder)
    g = torch.Generator().manual_seed(7)
    for spread, (h, w) in ((0.5, (4, 8)), (6.0, (8, 4)), (400.0, (4, 4))):
        y = torch.randn((1, codec.config.M, h, w), generator=g) * spread
        with torch.inference_mode(), fixed_point_parameters(True):
            reference = codec.model.latent_codec.compress(y)
            z = codec.model.latent_codec["hyper"].h_a(y)
        strings, y_hat = edge.code_latents(y.numpy(), z.numpy())
        assert strings == [s[0] for s in reference["strings"]], f"spread {spread}"
        assert np.array_equal(y_hat, reference["y_hat"].numpy())
        decoded = codec.entropy_decode(EncodedLatents([[s] for s in strings], (h * 16, w * 16), True))
        assert np.array_equal(decoded.numpy(), y_hat)


@pytest.mark.parametrize("arch", ["elic2022-chandelier", "mbt2018-mean"])
def test_the_onnx_edge_writes_the_torch_edges_containers(exported, arch):
    """The bundled photos: the float analysis agrees to float32 rounding, and the containers
    (header, fingerprint, photo size, streams) are the torch edge's byte for byte."""
    codec, folder = exported[arch]
    edge = OnnxEdgeEncoder(folder)
    torch_edge = EdgeEncoder(get_preset(edge.preset_name))
    for name in SAMPLE_PHOTOS:
        x = to_tensor(resize_for_codec(load_image(sample_photo(name)), "paper", 256))
        padded, _ = pad_to_stride(x)
        with torch.inference_mode():
            y = codec.model.g_a(padded)
        y_onnx, _ = edge.session("analysis.onnx").run(None, {"x": padded.numpy()})
        assert np.abs(y_onnx - y.numpy()).max() < 1e-4
        ours, theirs = edge.encode_file(sample_photo(name)), torch_edge.encode_file(sample_photo(name))
        assert ours.data == theirs.data, (f"{name}: the float analyses differ by {np.abs(y_onnx - y.numpy()).max():.2g}, and a "
                                          "latent this close to a rounding boundary takes the other symbol (docs/edge.md)")
        assert ours.bitstream.source == theirs.bitstream.source and ours.entropy_params == "fixed-point"



@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """``comneck export-edge -o FOLDER``: the tiny preset's seeded codec."""
    from comneck.cli import main as comneck_main

    folder = tmp_path_factory.mktemp("cli") / "edge"
    assert comneck_main(["export-edge", "-o", str(folder)]) == 0
    assert json.loads((folder / "edge.json").read_text())["random_weights"] is True
    return folder


def test_comneck_edge_encodes_with_the_onnx_folder_and_no_torch_at_all(tiny_folder, tmp_path):
    """An install without torch, CompressAI or transformers (each import fails): ``comneck-edge
    encode`` writes the torch edge's container and says the weights are random."""
    out = tmp_path / "cow.cnk"
    code = (
        "import sys\n"
        "for name in ('torch', 'torchvision', 'compressai', 'torch_geometric', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "from comneck_edge.cli import main\n"
        f"status = main(['encode', {str(sample_photo())!r}, '-o', {str(out)!r}, '--onnx', {str(tiny_folder)!r}])\n"
        "assert not [m for m in ('torch', 'compressai') if sys.modules.get(m)]\n"
        "no_folder = main(['encode', " + repr(str(sample_photo())) + ", '-o', " + repr(str(tmp_path / "b.cnk")) + "])\n"
        "sys.exit(status or (no_folder != 2))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "preset tiny, rate 1, fixed-point entropy parameters" in done.stdout and "RANDOM WEIGHTS" in done.stdout
    assert "PyTorch is not installed: encode with the ONNX edge, --onnx FOLDER" in done.stderr
    assert out.read_bytes() == EdgeEncoder("tiny").encode_file(sample_photo()).data


def _double_conv_graph() -> onnx.ModelProto:
    """A graph with an operator ONNX Runtime's CPU provider lacks (float64 Conv)."""
    w = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1)), "w")
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE), helper.make_node("Conv", ["d", "w"], ["c"]),
                               helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _broken(folder: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    copy = tmp_path / how
    shutil.copytree(folder, copy)
    if how == "format":
        manifest = json.loads((copy / "edge.json").read_text())
        (copy / "edge.json").write_text(json.dumps({**manifest, "format": 99}))
    else:
        (copy / "params" / "h_s.onnx").write_bytes(_double_conv_graph().SerializeToString())
    return copy


@pytest.mark.parametrize(("flags", "message"), [
    (["--preset", "tiny-mbt2018-mean"], "was exported for preset tiny, not tiny-mbt2018-mean: export the folder for tiny-mbt2018-mean"),
    (["--rate", "2"], "was exported for rate 1, not 2"),
    (["--entropy-params", "float"], "the ONNX edge writes fixed-point entropy parameters only"),
    (["--runtime", "torch"], "--onnx FOLDER is for the ONNX runtime"),
    ("format", "holds ONNX edge format 99; this edge reads format 1"),
    ("operators", "cannot run h_s.onnx"),
    ("missing", "is not an ONNX edge folder (no edge.json)"),
    ("not-an-image", "is not a readable image"),
])
def test_the_onnx_edge_refuses_in_one_line(tiny_folder, tmp_path, capsys, flags, message):
    photo, folder = str(sample_photo()), tiny_folder
    if flags == "not-an-image":
        photo = tmp_path / "notes.jpg"
        photo.write_text("not a photo")
    elif flags == "missing":
        folder = tmp_path / "nothing"
    elif isinstance(flags, str):
        folder = _broken(tiny_folder, tmp_path, flags)
    extra = flags if isinstance(flags, list) else []
    status = edge_main(["encode", str(photo), "-o", str(tmp_path / "out.cnk"), "--onnx", str(folder), *extra])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out.cnk").exists()


def test_runtime_onnx_needs_a_folder(capsys, monkeypatch):
    monkeypatch.delenv("COMNECK_EDGE_ONNX", raising=False)
    assert edge_main(["encode", str(sample_photo()), "--runtime", "onnx"]) == 2
    assert "--runtime onnx needs --onnx FOLDER" in capsys.readouterr().err


def test_a_folder_of_other_weights_is_refused_by_fingerprint(tiny_folder, tmp_path, capsys):
    """--codec-weights names the weights the gateway serves: a folder exported from others is refused."""
    from comneck.checkpoints import save_state_dict

    codec = build_codec(get_preset("tiny"))
    with torch.no_grad():
        next(codec.model.g_a.parameters()).add_(0.01)  # other weights, same shapes
    weights = tmp_path / "codec.safetensors"
    save_state_dict(codec.model, weights)
    status = edge_main(["encode", str(sample_photo()), "-o", str(tmp_path / "out.cnk"), "--onnx", str(tiny_folder),
                        "--codec-weights", str(weights)])
    err = capsys.readouterr().err
    assert status == 2 and f"holds codec weights {json.loads((tiny_folder / 'edge.json').read_text())['fingerprint']}" in err, err
    assert "export these weights with `comneck export-edge`" in err
