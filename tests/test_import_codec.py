"""Importing published codec and neck weights: synthetic checkpoints in the official layouts
(tests/official_layouts.py) load, code real bitstreams, and decode to the latents the official
forward computes from the same tensors; each kind of bad checkpoint is refused on one line."""

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from compressai.models import Elic2022Official

from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck.importers.reading import read_weights
from comneck.importers.sources import release_name
from comneck.models import WeightFiles, build_cloud_models, build_codec
from comneck.neck import TransformNeck
from comneck.presets import PRESETS
from comneck_edge import EdgeEncoder
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings
from official_layouts import elic_llm_checkpoint

TINY = PRESETS["tiny"]


def release_file(folder: Path, name: str, model: torch.nn.Module, neck: torch.nn.Module) -> Path:
    """A release checkpoint as the official train.py saves it (DDP-prefixed codec keys, a
    MultiStepLR state whose milestones are a collections.Counter)."""
    optim = torch.optim.Adam(neck.parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optim, milestones=[20], gamma=0.1)
    assert isinstance(scheduler.state_dict()["milestones"], Counter)
    path = folder / name
    torch.save({"epoch": 59, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "adapter": neck.state_dict(), "optimizer": optim.state_dict(), "lr_scheduler": scheduler.state_dict()}, path)
    return path


def reference_neck(state: dict[str, torch.Tensor], y_hat: torch.Tensor, heads: int) -> torch.Tensor:
    """The official Linear_Encoder's forward on its own tensors: per-position linear, class token,
    positions, ln_pre, one pre-LN residual attention block with QuickGELU."""
    width = state["class_embedding"].shape[0]
    ln = lambda x, name: torch.nn.functional.layer_norm(x, (width,), state[f"{name}.weight"], state[f"{name}.bias"])  # noqa: E731
    x = torch.nn.functional.linear(y_hat.flatten(2).transpose(1, 2), state["trans_latent_dim.weight"], state["trans_latent_dim.bias"])
    x = torch.cat([state["class_embedding"].expand(x.shape[0], 1, -1), x], 1) + state["positional_embedding"]
    x = ln(x, "ln_pre").transpose(0, 1)  # sequence first, as nn.MultiheadAttention there
    b = "transformer.resblocks.0."
    h = ln(x, b + "ln_1")
    attn = torch.nn.functional.multi_head_attention_forward(
        h, h, h, width, heads, state[b + "attn.in_proj_weight"], state[b + "attn.in_proj_bias"], None, None, False, 0.0,
        state[b + "attn.out_proj.weight"], state[b + "attn.out_proj.bias"], need_weights=False)[0]
    x = x + attn
    h = torch.nn.functional.linear(ln(x, b + "ln_2"), state[b + "mlp.c_fc.weight"], state[b + "mlp.c_fc.bias"])
    x = x + torch.nn.functional.linear(h * torch.sigmoid(1.702 * h), state[b + "mlp.c_proj.weight"], state[b + "mlp.c_proj.bias"])
    return x.transpose(0, 1)


def image(side: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


def check_latents_match(codec, official, x: torch.Tensor) -> None:
    reference = official.y_hat(x)
    latents, y_coded = codec.analyze(x, fixed_point=False)
    y_decoded = codec.entropy_decode(latents)
    assert torch.equal(y_decoded, y_coded)  # the rANS round trip is exact
    assert (y_decoded - reference).abs().max() < 1e-5  # same symbols; means agree to float rounding (a step is 1)
    assert (reference.round() != 0).float().mean() > 0.2  # and the latents are not trivially zero
    check_fixed_point_close(codec, x, reference)


def check_fixed_point_close(codec, x: torch.Tensor, reference: torch.Tensor) -> None:
    """Fixed point: an exact round trip, means within the grid's rounding of the float ones; where
    y - mean sits on a rounding boundary, the symbol may be the neighbouring one."""
    latents, y_coded = codec.analyze(x)
    assert latents.fixed_point and torch.equal(codec.entropy_decode(latents), y_coded)
    off = (y_coded - reference).abs()
    assert ((off - off.round()).abs() < 0.01).all() and (off > 0.01).float().mean() < 0.01


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("release")
    official = elic_llm_checkpoint(TINY.codec.N, TINY.codec.M, TINY.codec.groups)
    torch.manual_seed(5)
    neck = TransformNeck(TINY.neck).eval()
    return release_file(folder, "d2_3.pth.tar", official, neck), official, neck


def test_release_names_give_scenario_and_rate():
    assert release_name("ckpt/d1_1.pth.tar") == ("d1", 1)
    assert release_name("d3_4.pth.tar") == ("d3", 4)
    assert release_name("elic_0.032.pth.tar") == (None, None)
    assert release_name("d4_1.pth.tar") == (None, None) and release_name("d1_5.pth.tar") == (None, None)


def test_tiny_release_checkpoint_decodes_to_the_official_latents_and_neck(tiny_release):
    path, official, neck = tiny_release
    codec = build_codec(TINY, path)
    assert (codec.weights_info.layout, codec.weights_info.scenario, codec.weights_info.rate) == ("release", "d2", 3)
    check_latents_match(codec, official, image())
    models = build_cloud_models(TINY, WeightFiles.bundle(path))
    assert models.random_parts == ("clip",)
    y_hat = official.y_hat(image(256))
    with torch.no_grad():
        ours = models.neck(y_hat)
    assert torch.allclose(ours, reference_neck(neck.state_dict(), y_hat, TINY.neck.heads), atol=1e-5)


def test_full_size_elic_checkpoint_in_the_reimplementation_layout(tmp_path):
    paper = PRESETS["paper"]
    official = elic_llm_checkpoint(paper.codec.N, paper.codec.M, paper.codec.groups, seed=3)
    state = official.state_dict()
    eb = "entropy_bottleneck."  # a newer CompressAI names the bottleneck's parameters matrices.0 ...
    for old, new in (("_matrix", "matrices."), ("_bias", "biases."), ("_factor", "factors.")):
        for key in [k for k in state if k.startswith(eb + old)]:
            state[key.replace(old, new)] = state.pop(key)
    torch.save(state, tmp_path / "ELIC_0032_ft.pth.tar")  # a flat state dict, as updata.py writes
    codec = build_codec(paper, tmp_path / "ELIC_0032_ft.pth.tar", rate=4)
    assert (codec.weights_info.layout, codec.weights_info.rate, codec.weights_info.scenario) == ("elic-llm", 4, None)
    check_latents_match(codec, official, image(64, seed=2))


def test_compressai_official_state_dicts_and_the_pre_1_2_7_refusal(tmp_path):
    cfg = TINY.codec
    torch.manual_seed(0)
    net = Elic2022Official(N=cfg.N, M=cfg.M, groups=list(cfg.groups))
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "official.pth.tar")
    codec = build_codec(TINY, tmp_path / "official.pth.tar")
    assert codec.config.arch == "elic2022-official" and codec.weights_info.layout == "compressai"
    x = image()
    net.update(force=True)
    with torch.no_grad():
        assert torch.equal(codec.entropy_decode(codec.analyze(x, fixed_point=False)[0]), net.compress(x)["y_hat"])
        check_fixed_point_close(codec, x, net.compress(x)["y_hat"])
    old = net.state_dict()  # CompressAI < 1.2.7: channel context was a ramp to max(N, ...) channels
    for k in range(1, len(cfg.groups)):
        p = f"latent_codec.y.channel_context.y{k}."
        cin, cout = sum(cfg.groups[:k]), 2 * cfg.groups[k]
        old[p + "0.weight"], old[p + "0.bias"] = torch.zeros(cfg.N, cin, 5, 5), torch.zeros(cfg.N)
        old[p + "2.weight"], old[p + "2.bias"] = torch.zeros(cfg.N, cfg.N, 5, 5), torch.zeros(cfg.N)
        old[p + "4.weight"] = torch.zeros(cout, cfg.N, 5, 5)
    torch.save(old, tmp_path / "old.pth.tar")
    with pytest.raises(ComneckInputError, match=r"CompressAI < 1\.2\.7.*cannot be mapped"):
        build_codec(TINY, tmp_path / "old.pth.tar")


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert exc.value.code == "bad_weights" and "\n" not in str(exc.value)
    return str(exc.value)


class Trap:
    """Pickling this object records a call; a safe loader never runs it."""

    ran = False

    def __reduce__(self):
        return (Trap._spring, ())

    @staticmethod
    def _spring():
        Trap.ran = True
        return {}


def test_each_broken_checkpoint_is_refused_with_its_own_message(tiny_release, tmp_path):
    path, official, neck = tiny_release
    state = official.state_dict()

    def refused(obj, name="ckpt.pth.tar", load=lambda p: build_codec(TINY, p)) -> str:
        torch.save(obj, tmp_path / name)
        with pytest.raises(ComneckInputError) as exc:
            load(tmp_path / name)
        return one_line(exc)

    assert re.search(r"keys no mapping knows \(1\): extra\.weight", refused({**state, "extra.weight": torch.zeros(1)}))
    missing = {k: v for k, v in state.items() if k != "ParamAggregation.2.0.weight"}
    assert "missing (1): latent_codec.y.latent_codec.y2.entropy_parameters.0.weight" in refused(missing)
    assert re.search(r"mis-shaped, file vs model \(\d+\): g_a\.0\.weight \[", refused({**state, "g_a.0.weight": torch.zeros(8, 3, 5, 5)}))
    assert "entries that are not tensors: epoch" in refused({**state, "epoch": 4})
    assert "neither an ELIC_LLM" in refused(neck.state_dict())
    assert "no 'adapter' entry" in refused({"state_dict": state}, load=lambda p: build_cloud_models(TINY, WeightFiles(neck=p)))
    with pytest.raises(ComneckInputError) as exc:
        build_codec(PRESETS["paper"], path)
    assert "do not fit preset 'paper'" in one_line(exc)
    (tmp_path / "cut.pth.tar").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ComneckInputError) as exc:
        build_codec(TINY, tmp_path / "cut.pth.tar")
    assert "not a safetensors, torch.save or TorchScript file" in one_line(exc)
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(ComneckInputError) as exc:
        build_codec(TINY, tmp_path / "text.pth")
    assert "not a safetensors" in one_line(exc)
    assert "never unpickles" in refused({"state_dict": state, "trap": Trap()}) and not Trap.ran


def test_convert_writes_a_folder_that_server_and_edge_load(tiny_release, tmp_path, capsys):
    from comneck.cli import main

    path, official, _ = tiny_release
    out = tmp_path / "d2_3"
    assert main(["convert", str(path), "-o", str(out), "--preset", "tiny"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "final norm" in line]
    assert len(said) == 1 and said[0].startswith("clip final norm: twice (the neck was trained through the official code's CLIP")
    manifest = json.loads((out / "comneck.json").read_text())
    assert manifest["clip_final_norm"] == "twice"
    assert sorted(p.name for p in out.iterdir()) == ["codec.safetensors", "comneck.json", "neck.safetensors"]
    assert (manifest["scenario"], manifest["rate"], manifest["lmbda"], manifest["layout"]) == ("d2", 3, 0.016, "release")
    direct = build_codec(TINY, path)
    assert manifest["codec_fingerprint"] == direct.fingerprint().hex() == build_codec(TINY, out).fingerprint().hex()
    encoder = EdgeEncoder("tiny", codec_weights=out)
    assert encoder.rate == 3 and encoder.fingerprint == direct.fingerprint()
    with pytest.raises(ComneckInputError, match="rate 1 given, but the codec weights"):
        EdgeEncoder("tiny", rate=1, codec_weights=out)
    assert main(["convert", str(path), "-o", str(out), "--preset", "tiny"]) == 2  # refuses to overwrite
    assert "refuses" not in (out / "comneck.json").read_text() and (out / "codec.safetensors").is_file()
    gateway = Gateway.load(ServerSettings(weights=out))
    assert gateway.models.random_parts == ("clip",) and gateway.describe()["codec"]["weights"] == {"layout": "comneck", "scenario": "d2", "rate": 3}
    described = gateway.describe()["clip"]
    assert (described["final_norm"], described["final_norm_recorded"], gateway.models.clip.final_norm) == ("twice", "twice", "twice")
    result = gateway.infer(encoder.encode_file(sample_photo()).data, "Labels: cow, beach")
    assert result.text in ("cow", "beach")
    from_release = Gateway.load(ServerSettings(weights=path))  # the release file itself, converted in memory
    assert from_release.models.codec_fingerprint == gateway.models.codec_fingerprint
    assert from_release.models.clip_final_norm == "twice"


def test_an_operator_may_override_the_recorded_final_norm_and_the_log_says_so(tiny_release, tmp_path, caplog):
    import logging

    from fastapi.testclient import TestClient

    from comneck.convert import convert
    from comneck.pipeline import Pipeline
    from comneck_server.app import create_app

    out = tmp_path / "converted"
    convert(tiny_release[0], out, TINY)
    assert Pipeline.from_pretrained(out, preset="tiny").models.clip_final_norm == "twice"
    assert Pipeline.from_pretrained(out, preset="tiny", clip_final_norm="once").models.clip_final_norm == "once"
    assert Pipeline.from_pretrained(preset="tiny").models.clip_final_norm == "once"  # random neck: the preset's
    caplog.set_level(logging.INFO)
    with TestClient(create_app(ServerSettings(weights=out, clip_final_norm="once"))) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        described = client.get("/v1/models").json()["comneck"]["clip"]
        assert (described["final_norm"], described["final_norm_recorded"]) == ("once", "twice")
    said = [r.getMessage() for r in caplog.records if "final norm" in r.getMessage() and "overriding" in r.getMessage()]
    assert said == ["CLIP final norm once by --clip-final-norm, overriding the twice the neck's weights record"]
    meta = json.loads((out / "comneck.json").read_text())
    (out / "comneck.json").write_text(json.dumps({**meta, "clip_final_norm": "thrice"}))
    with pytest.raises(ComneckInputError, match=r"comneck.json clip_final_norm: 'thrice' is no CLIP final-norm setting"):
        Pipeline.from_pretrained(out, preset="tiny")


def test_no_loader_unpickles_without_weights_only():
    root = Path(__file__).resolve().parents[1]
    sources = [p for d in ("shared", "cloud_server", "edge_client") for p in (root / d).rglob("*.py")]
    calls = [(p.name, line) for p in sources for line in p.read_text().splitlines() if "torch.load(" in line and "``" not in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls
    assert read_weights  # the one place that loads pickles (comneck.importers.reading)


def test_server_refuses_unusable_weight_sources_before_loading(tmp_path, capsys):
    from comneck_server.cli import main

    (tmp_path / "junk.pth").write_bytes(b"junk")
    (tmp_path / "empty").mkdir()
    cases = {
        ("--weights", str(tmp_path / "nope.pth.tar")): "no such file",
        ("--codec-weights", str(tmp_path / "junk.pth")): "not a safetensors, torch.save or TorchScript file",
        ("--weights", str(tmp_path / "empty")): "not written by `comneck convert`",
    }
    for args, message in cases.items():
        assert main(list(args)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("comneck-server: error: ") and message in err and "\n" not in err


def test_full_size_release_adapter_is_the_paper_neck(tmp_path):
    from comneck.importers.fitting import fit
    from comneck.importers.sources import read_neck

    paper = PRESETS["paper"]
    torch.manual_seed(11)
    official = {k: v + 0.01 * torch.randn_like(v) for k, v in TransformNeck(paper.neck).state_dict().items()}
    torch.save({"state_dict": {}, "adapter": official, "epoch": 59}, tmp_path / "d1_4.pth.tar")
    state, info = read_neck(tmp_path / "d1_4.pth.tar")
    neck = TransformNeck(paper.neck).eval()
    fit(neck, state, "neck")
    assert (info.layout, info.scenario, info.rate) == ("release", "d1", 4)
    assert sum(p.numel() for p in neck.parameters()) == 13_191_168
    y_hat = torch.randn(1, paper.codec.M, 16, 16)
    with torch.no_grad():
        assert torch.allclose(neck(y_hat), reference_neck(official, y_hat, paper.neck.heads), atol=1e-5)
