"""Training on the tiny preset and a generated two-class dataset: every scenario end to end,
falling losses on one batch, frozen parts untouched, exact resume, serving the export, DDP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_runner import run_main
from PIL import Image

from comneck.clip_split import ClipSplit
from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck.models import build_codec
from comneck.train.cli import main as train_main
from comneck.train.config import load_config
from comneck.train.objectives import stage_plan
from comneck.train.trainer import Trainer
from comneck_edge import EdgeEncoder
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for name, colour in (("red_thing", (200, 40, 40)), ("blue_thing", (40, 40, 200))):
        (root / name).mkdir()
        for i in range(4):
            pixels = (np.array(colour) + rng.integers(-40, 40, (72, 80, 3))).clip(0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def config(dataset, tmp_path, *overrides):
    return load_config(None, [f"data.root={dataset}", f"output={tmp_path}", "batch_size=2", "stages.0.epochs=1",
                              "stages.1.epochs=1", "stages.2.epochs=1", "log_every=1", *overrides])


def losses(folder, stage):
    return [json.loads(line)["loss"] for line in (folder / "log.jsonl").read_text().splitlines() if json.loads(line)["stage"] == stage]


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if "_cdf" not in k and "_offset" not in k)


def test_config_from_yaml_with_overrides(tmp_path, dataset):
    path = tmp_path / "c.yaml"
    path.write_text(f"scenario: d3\nrate: 2\ndata:\n  root: {dataset}\n  limit: 6\nstages:\n  - {{epochs: 2, lr: 0.001}}\n  - {{epochs: 2, lr: 0.0001}}\n  - {{epochs: 2, lr: 0.0001}}\n")
    cfg = load_config(path, ["stages.1.epochs=5", "loss.gamma=30", "target=tokens", "target_block=-2"])
    assert (cfg.scenario, cfg.rate, cfg.lmbda, cfg.data.limit) == ("d3", 2, 0.008, 6)
    assert [s.epochs for s in cfg.stages] == [2, 5, 2] and cfg.loss.gamma == 30 and cfg.target == "tokens"
    for bad in (["rate=7"], ["scenario=d9"], ["stages.5.epochs=1"], ["nonsense=1"], ["rate"]):
        with pytest.raises(ComneckInputError) as info:
            load_config(path, bad)
        assert info.value.code == "bad_config" and "\n" not in str(info.value)


def test_stage_plans_follow_the_paper(dataset, tmp_path):
    d1 = stage_plan(config(dataset, tmp_path))
    assert [(s.ce, s.dist) for s in d1] == [(1152.0, 0.0), (11.52, 1152.0), (0.0, 1152.0)]
    assert all(s.trains == ("neck",) for s in d1)
    d2 = stage_plan(config(dataset, tmp_path, "scenario=d2", "rate=3"))
    assert d2[1].trains == ("neck", "codec") and (d2[1].rate, d2[1].mse) == (1.0, 0.016)
    assert d2[1].dist == pytest.approx(0.016 * 11.52 * 100 / 60)  # gamma:beta = 60:1, L_dist in the neck stages' units
    d3 = stage_plan(config(dataset, tmp_path, "scenario=d3"))
    assert d3[1].trains == ("neck", "codec-encoder") and d3[1].mse == 0 and d3[1].dist == pytest.approx(0.004 * 11.52 * 100)
    assert [s.trains for s in stage_plan(config(dataset, tmp_path, "scenario=postproc"))] == [("unet",)] * 3


@pytest.mark.parametrize("scenario", ["d1", "d2", "d3", "postproc"])
def test_every_scenario_trains_end_to_end_and_freezes_the_rest(scenario, dataset, tmp_path, tiny, tiny_models):
    trainer = Trainer(config(dataset, tmp_path, f"scenario={scenario}"))
    summary = trainer.run()
    s = trainer.student
    assert summary["steps"] == 12 and (tmp_path / "export" / "neck.safetensors").is_file()
    assert abs(summary["real_bpp"] - summary["estimated_bpp"]) < 0.15 * summary["estimated_bpp"]
    assert same(trainer.clip_model, tiny_models.clip_model)  # the teacher never moves
    base = build_codec(tiny)
    changed = {
        "d1": {"neck"},
        "d2": {"neck", "g_a", "g_s", "latent_codec"},
        "d3": {"neck", "g_a", "latent_codec"},
        "postproc": {"unet"},
    }[scenario]
    assert same(s.neck, tiny_models.neck) == ("neck" not in changed)
    for part in ("g_a", "g_s", "latent_codec"):
        assert same(getattr(s.codec.model, part), getattr(base.model, part)) == (part not in changed), part
    manifest = json.loads((tmp_path / "export" / "comneck.json").read_text())
    assert manifest["parts"] == (["neck", "codec", "unet"] if scenario == "postproc" else ["neck", "codec"])
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == sorted(["comneck.json", *(f"{p}.safetensors" for p in manifest["parts"])])
    assert ("neck" in summary["random_weights_in"]) == (scenario == "postproc")  # its export holds the seeded neck
    if scenario == "postproc":
        assert "use" in summary and "use" in manifest["training"]


@pytest.mark.parametrize(
    "scenario, stage, lr",
    [("d1", 0, 1e-3), ("d1", 1, 1e-3), ("d1", 2, 1e-3), ("d2", 1, 1e-3), ("d3", 1, 1e-3), ("postproc", 2, 1e-3)],
)
def test_each_objective_falls_on_one_fixed_batch(scenario, stage, lr, dataset, tmp_path):
    epochs = ["0", "0", "0"]
    epochs[stage] = "12"
    cfg = config(dataset, tmp_path, f"scenario={scenario}", "data.limit=2", *(f"stages.{i}.epochs={n}" for i, n in enumerate(epochs)), f"stages.{stage}.lr={lr}")
    Trainer(cfg).run()
    curve = losses(tmp_path, stage)
    assert len(curve) == 12 and sum(curve[-3:]) < 0.8 * sum(curve[:3]), curve


def test_a_resumed_run_equals_an_uninterrupted_one(dataset, tmp_path):
    whole = Trainer(config(dataset, tmp_path / "a", "scenario=d2"))
    whole.run()
    first = Trainer(config(dataset, tmp_path / "b", "scenario=d2"))
    assert first.run(stop_after_steps=6) == {"stopped_at": {"stage": 1, "epoch": 0, "step_in_epoch": 2, "global_step": 6}}
    second = Trainer(config(dataset, tmp_path / "b", "scenario=d2"))
    assert second.resume() and second.position["global_step"] == 6
    second.run()
    for name in ("neck", "codec"):
        a = (tmp_path / "a" / "export" / f"{name}.safetensors").read_bytes()
        assert a == (tmp_path / "b" / "export" / f"{name}.safetensors").read_bytes(), name
    assert losses(tmp_path / "a", 2) == losses(tmp_path / "b", 2)


def test_the_export_is_a_weights_folder_the_gateway_and_edge_load(dataset, tmp_path, tiny):
    trainer = Trainer(config(dataset, tmp_path, "scenario=d3", "rate=2", "data.limit=4", "stages.0.epochs=0", "stages.2.epochs=0",
                             "clip_final_norm=twice"))
    assert trainer.student.clip.final_norm == "twice"  # student and teacher: one CLIP split
    summary = trainer.run()
    export = tmp_path / "export"
    manifest = json.loads((export / "comneck.json").read_text())
    assert manifest["clip_final_norm"] == "twice"
    assert (manifest["format"], manifest["version"], manifest["preset"], manifest["layout"]) == ("comneck-weights", 1, "tiny", "comneck")
    assert (manifest["scenario"], manifest["rate"], manifest["lmbda"], manifest["codec_arch"]) == ("d3", 2, 0.008, tiny.codec.arch)
    assert manifest["training"] == {k: v for k, v in summary.items() if k not in ("scenario", "rate", "preset")}
    assert manifest["training"]["steps"] == 2 and f"--weights {export}" in manifest["training"]["serve"]
    gateway = Gateway.load(ServerSettings(preset="tiny", weights=export))
    assert gateway.models.random_parts == ("clip",) and gateway.describe()["clip"]["final_norm"] == "twice"
    y_hat = torch.randn(1, tiny.codec.M, 16, 16)
    student = trainer.student.cpu().eval()
    with torch.no_grad():  # the seeded CLIP's ln_post (weight 1, bias 0) is nearly idempotent: make it tell once from twice
        for ln_post in (student.clip.visual.ln_post, gateway.models.clip.visual.ln_post):
            torch.manual_seed(5)
            ln_post.weight.normal_(1.0, 0.5), ln_post.bias.normal_(0.0, 0.5)
    with torch.no_grad():  # the served features are the ones the neck was trained against, not standard CLIP's
        trained = student.clip.tail(student.neck(y_hat)).embedding
        once = ClipSplit(student.clip.visual, student.clip.split_block, "once").tail(student.neck(y_hat)).embedding
    served = gateway.pipeline.features([y_hat]).embedding
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(served, once, rtol=1e-3, atol=1e-3)
    described = gateway.describe()["codec"]
    assert described["weights"] == {"layout": "comneck", "scenario": "d3", "rate": 2}
    assert described["fingerprint"] == manifest["codec_fingerprint"] != build_codec(tiny).fingerprint().hex()
    encoder = EdgeEncoder(tiny, codec_weights=export)
    assert encoder.rate == 2 and encoder.fingerprint.hex() == manifest["codec_fingerprint"]
    result = gateway.infer(encoder.encode_file(sample_photo()).data, "Labels: red thing, blue thing")
    assert result.text in ("red thing", "blue thing")
    assert trainer.export() == summary  # a second export replaces the first whole
    assert json.loads((export / "comneck.json").read_text()) == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def run_train(*args: str) -> subprocess.CompletedProcess:
    """``comneck-train ARGS``, run in this process (cli_runner says why)."""
    return run_main(train_main, *args)


def test_cli_errors_are_one_line(tmp_path):
    for args in (["--data", str(tmp_path / "none")], ["--data", str(tmp_path), "--rate", "9"], [str(tmp_path / "missing.yaml")],
                 ["--data", str(tmp_path), "--set", "clip_final_norm=thrice"]):
        run = run_train(*args, "--output", str(tmp_path / "out"))
        assert run.returncode == 2 and run.stderr.startswith("comneck-train: error:") and run.stderr.count("\n") == 1, run.stderr


def test_two_processes_with_torchrun_gloo(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "comneck.train.cli",
           "--data", str(dataset), "--epochs", "1,0,1", "--batch-size", "2", "--output", str(tmp_path), "--set", "log_every=1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # 8 images / (2 per step x 2 processes) per epoch, two epochs; rank 0 logs
    assert json.loads((tmp_path / "export" / "comneck.json").read_text())["training"]["steps"] == 4


def test_a_half_written_checkpoint_is_ignored_on_resume(dataset, tmp_path):
    first = Trainer(config(dataset, tmp_path, "checkpoint_every=2"))
    first.run(stop_after_steps=4)
    broken = tmp_path / "checkpoints" / ".step-00000006.tmp"  # a kill while writing step 6
    broken.mkdir()
    (broken / "weights.safetensors").write_bytes(b"partial")
    second = Trainer(config(dataset, tmp_path))
    assert second.resume() and second.position["global_step"] == 4
    assert second.run()["steps"] == 12


def test_mixed_precision_bf16_trains(dataset, tmp_path):
    summary = Trainer(config(dataset, tmp_path, "amp=bf16", "data.limit=4")).run()
    assert summary["steps"] == 6 and all(line for line in (tmp_path / "log.jsonl").read_text().splitlines())


def test_fp16_loss_scaling_skips_overflows_then_trains_and_tensorboard_has_the_log(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(config(dataset, tmp_path, "amp=fp16", "tensorboard=true", "stages.0.epochs=0", "stages.1.epochs=0", "stages.2.epochs=4")).run()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    scales = [line["loss_scale"] for line in log]
    assert len(log) == 16 and scales[0] == 2.0**15 and min(scales) < 2.0**10  # overflowing steps halved GradScaler's 2^16
    first, last = (sum(line["loss"] for line in part) / 4 for part in (log[:4], log[-4:]))
    assert last < first  # once the scale fits, the steps are taken
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("dist/loss")] == [(line["global_step"], pytest.approx(line["loss"])) for line in log]


def test_a_neck_trained_to_skip_another_number_of_blocks_records_it_and_serves_so(dataset, tmp_path, tiny):
    """Section 4.5's ablation: split_block 1 (the neck's tokens enter block 2) trains, exports, records
    and serves with that split; an eval run's rate points of another split share the run's CLIP."""
    from comneck.pipeline import Pipeline

    trainer = Trainer(config(dataset, tmp_path, "data.limit=2", "stages.1.epochs=0", "stages.2.epochs=0", "split_block=1"))
    assert trainer.student.clip.split_block == 1 and trainer.student.clip.num_blocks == 4
    trainer.run()
    export = tmp_path / "export"
    assert json.loads((export / "comneck.json").read_text())["split_block"] == 1
    served = Pipeline.from_pretrained(export, preset="tiny")
    assert served.models.clip.split_block == served.preset.split_block == 1
    y_hat = torch.randn(1, tiny.codec.M, 16, 16)
    student = trainer.student.cpu().eval()
    with torch.no_grad():
        trained = student.clip.tail(student.neck(y_hat)).embedding
    torch.testing.assert_close(served.features([y_hat]).embedding, trained, rtol=1e-5, atol=1e-6)
    base = Pipeline.from_pretrained(preset="tiny")  # split 2, as the preset says
    other = base.with_models(served.models)
    assert other.models.clip.split_block == 1 and other.models.clip_model is base.models.clip_model
    torch.testing.assert_close(other.features([y_hat]).embedding, trained, rtol=1e-5, atol=1e-6)
    with pytest.raises(ComneckInputError, match="split block must be in 0..3"):
        Trainer(config(dataset, tmp_path / "bad", "split_block=4"))
