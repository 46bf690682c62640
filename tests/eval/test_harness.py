"""comneck-eval end to end on the tiny preset (random weights, labelled so in every output): every
task writes every output; a run killed partway and resumed, and a sharded run merged, give the
uninterrupted run's summary; bad input is one line, exit 2, and nothing written is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from checkpoints import write_honeybee, write_llama_adapter, write_shikra, write_v2l
from eval_fixtures import write_coco_karpathy, write_fewshot, write_image_folder, write_kodak, write_refcoco, write_seed_bench
from PIL import Image

from comneck.eval.cli import main
from comneck.eval.harness import RESULTS, SUMMARY
from comneck.models import build_cloud_models
from comneck.presets import PRESETS
from comneck.weights_folder import write_folder

OUTPUTS = ("results.jsonl", "summary.json", "summary.md", "report.html", "config.json")


def write_config(path: Path, **config) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config, default=str))))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-data")
    clip_dim = PRESETS["tiny"].clip.model_cfg["embed_dim"]
    llama_adapter, v2l = write_llama_adapter(root / "adapter", clip_dim), write_v2l(root / "v2l", clip_dim)
    honeybee, shikra = write_honeybee(root / "honeybee"), write_shikra(root / "shikra")
    return {
        "classify": (write_image_folder(root / "folder"), {}, {"name": "clip-zero-shot"}),
        "caption": (write_coco_karpathy(root / "coco"), {}, {"name": "llama-adapter-v1", "weights": llama_adapter.adapter,
                                                            "options": {"llama": str(llama_adapter.llama)}}),
        "mcq": (write_seed_bench(root / "seed"), {}, {"name": "honeybee", "weights": honeybee.checkpoint,
                                                      "options": {"tokenizer": str(honeybee.tokenizer)}}),
        "rec": (write_refcoco(root / "refcoco"), {"dataset": "refcoco", "split": "val"}, {"name": "shikra", "weights": shikra.merged}),
        "fewshot": (write_fewshot(root / "fewshot"), {}, {"name": "v2l", "weights": v2l.codebooks, "options": {"llama": str(v2l.llama)}}),
        "human": (write_kodak(root / "kodak"), {}, None),
    }


def config_for(task: str, data: dict, out: Path, **more) -> dict:
    root, options, backend = data[task]
    pipelines = [{"name": "comneck", "points": [{"rate": 1}]}, {"name": "uncompressed"}, {"name": "jpeg", "qualities": [20, 60]}]
    if task == "human":
        pipelines = [{"name": "reconstruction", "points": [{"rate": 1}]}, {"name": "jpeg", "qualities": [20, 60]}]
    config = {"task": task, "preset": "tiny", "dataset": {"root": root, "options": options, "limit": 2}, "batch_size": 2,
              "output": out, "gallery": 2, "pipelines": pipelines, "max_new_tokens": 6, **more}
    return {**config, "backend": backend} if backend else config


@pytest.mark.parametrize("task", ["classify", "caption", "mcq", "rec", "fewshot", "human"])
def test_every_task_writes_every_output_labelled_random(task, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(write_config(tmp_path / "c.yaml", **config_for(task, data, out)))]) == 0, capsys.readouterr().err
    assert all((out / name).is_file() for name in OUTPUTS)
    lines = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    curves = list(dict.fromkeys((line["pipeline"], line["point"]) for line in lines))
    expected = 2 + 1 if task == "human" else 1 + 1 + 2
    assert len(curves) == expected and len(lines) == 2 * expected
    assert all(line["protocol"] == "clean" and (line["score"] or task == "caption") for line in lines)
    # random weights wherever a random network ran: human viewing's JPEG runs none
    assert all(line["random_weights"] == (task != "human" or line["pipeline"] != "jpeg") for line in lines)
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["random_weights"] and [(r["pipeline"], r["point"]) for r in summary["rows"]] == curves
    jpeg = [line for line in lines if line["pipeline"] == "jpeg"]
    assert all(line["bytes"] > 0 and line["bpp"] == pytest.approx(8 * line["bytes"] / (256 * 256)) for line in jpeg) or task == "human"
    assert "RANDOM WEIGHTS" in (out / "summary.md").read_text() and "RANDOM WEIGHTS" in (out / "report.html").read_text()
    plot = next(out.glob("curve_*.png"))
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 100
    assert "RANDOM WEIGHTS" in capsys.readouterr().out


def _rows(folder: Path) -> list[dict]:
    """Summary rows without the timing (it differs from run to run)."""
    return [{k: v for k, v in row.items() if k != "edge_ms"} for row in json.loads((folder / SUMMARY).read_text())["rows"]]


def test_a_run_killed_partway_and_resumed_or_sharded_and_merged_gives_the_uninterrupted_summary(data, tmp_path, capsys):
    config = config_for("classify", data, tmp_path / "whole")
    config["dataset"]["limit"] = 3
    whole = write_config(tmp_path / "whole.yaml", **config)
    assert main(["run", str(whole)]) == 0
    expected = _rows(tmp_path / "whole")
    lines = (tmp_path / "whole" / RESULTS).read_text().splitlines(keepends=True)
    killed = tmp_path / "killed"
    assert main(["run", str(whole), "--output", str(killed)]) == 0
    (killed / RESULTS).write_text("".join(lines[:5]) + lines[5][:17])  # killed while writing line 6
    (killed / SUMMARY).unlink()
    assert main(["run", str(whole), "--output", str(killed)]) == 2  # an earlier run's results need --resume or --force
    assert "pass --resume to continue it or --force" in capsys.readouterr().err
    assert len((killed / RESULTS).read_text().splitlines()) == 6  # nothing lost
    assert main(["run", str(whole), "--output", str(killed), "--resume"]) == 0
    assert _rows(killed) == expected and len((killed / RESULTS).read_text().splitlines()) == len(lines) + 1  # the cut line stays, unread
    for i in range(2):
        assert main(["run", str(whole), "--output", str(tmp_path / f"shard{i}"), "--shard", f"{i}/2"]) == 0
    assert "join the shards" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "shard0"), str(tmp_path / "shard1")]) == 0
    assert _rows(tmp_path / "merged") == expected


def test_bad_input_is_one_line_and_exit_2_and_keeps_what_was_written(data, tmp_path, capsys):
    out = tmp_path / "out"
    good = config_for("classify", data, out)
    assert main(["run", str(write_config(tmp_path / "good.yaml", **good))]) == 0
    written = (out / RESULTS).read_text()
    capsys.readouterr()
    other = tmp_path / "other-preset"
    write_folder(other, "tiny-336", {"codec": build_cloud_models(PRESETS["tiny"]).codec.model}, {"scenario": "d1", "rate": 1})
    (tmp_path / "empty").mkdir()
    cases = {
        "wrong layout": ({**good, "dataset": {"root": data["human"][0]}}, "expected one sub-folder of images per class"),
        "annotation format": ({**good, "task": "mcq", "dataset": {"root": tmp_path / "empty"}, "backend": {"name": "honeybee"}}, "SEED-Bench.json"),
        "backend without the task": ({**good, "backend": {"name": "shikra"}}, "backend shikra does not do the classify task"),
        "weights of another preset": ({**good, "pipelines": [{"name": "comneck", "points": [{"rate": 1, "weights": other}]}]},
                                      "preset 'tiny-336'"),
        "rate point twice": ({**good, "pipelines": [{"name": "comneck", "points": [{"rate": 1}, {"rate": 1}]}]}, "listed twice"),
    }
    for name, (config, said) in cases.items():
        assert main(["run", str(write_config(tmp_path / "bad.yaml", **config)), "--resume"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("comneck-eval: error: ") and err.count("\n") == 1 and said in err, (name, err)
        assert (out / RESULTS).read_text() == written, name
    image = next((data["classify"][0] / "cow").glob("*.JPEG"))
    missing = tmp_path / "missing"
    (missing / "cow").mkdir(parents=True)
    (missing / "cow" / image.name).symlink_to(tmp_path / "nowhere.jpg")
    assert main(["run", str(write_config(tmp_path / "bad.yaml", **{**good, "dataset": {"root": missing}, "output": tmp_path / "o2"}))]) == 2
    assert "comneck-eval: error: " in capsys.readouterr().err


def test_the_ready_configs_validate():
    """configs/eval/*.yaml (the paper's figures, the ablations) and the ablations' training configs."""
    from comneck.eval.config import load_eval_config
    from comneck.train.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    evals = {path.stem: load_eval_config(path) for path in sorted((root / "eval").glob("*.yaml"))}
    assert {"fig3_caption_llama_adapter", "fig3_vqa_honeybee", "fig3_rec_shikra", "fig3_fewshot_v2l", "fig4_kodak_psnr",
            "ablation_loss", "ablation_skip", "ablation_codec"} <= set(evals)
    assert {c.task for c in evals.values()} == {"caption", "mcq", "rec", "fewshot", "human"}
    assert [evals["ablation_codec"].curve_preset(i) for i in range(3)] == ["paper", "paper-mbt2018-mean", "paper"]
    trains = [load_config(path) for path in sorted((root / "ablation").glob("*.yaml"))]
    assert sorted([s.epochs for s in c.stages] for c in trains) == [[0, 0, 60], [20, 20, 20], [20, 20, 20], [20, 20, 20], [20, 20, 20],
                                                                   [60, 0, 0]]
    assert sorted(c.split_block for c in trains if c.split_block is not None) == [1, 4, 8]
    assert sorted(c.preset for c in trains) == ["paper"] * 5 + ["paper-mbt2018-mean"]


def test_the_codec_ablation_draws_a_curve_per_codec_over_one_clip(data, tmp_path, capsys):
    """A curve of another preset's codec (tiny-mbt2018-mean beside tiny's ELIC) codes with its own
    codec and neck and answers through the run's CLIP; a curve preset of another CLIP is refused."""
    out = tmp_path / "out"
    config = config_for("classify", data, out)
    config["pipelines"] = [{"name": "comneck", "label": "elic", "points": [{"rate": 1}]},
                           {"name": "comneck", "label": "mbt", "preset": "tiny-mbt2018-mean", "points": [{"rate": 1}]}]
    assert main(["run", str(write_config(tmp_path / "c.yaml", **config))]) == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    by_curve = {curve: [line for line in lines if line["pipeline"] == curve] for curve in ("elic", "mbt")}
    assert [len(v) for v in by_curve.values()] == [2, 2]
    assert [line["bytes"] for line in by_curve["elic"]] != [line["bytes"] for line in by_curve["mbt"]]  # two codecs, two bitstreams
    config["pipelines"][1]["preset"] = "tiny-336"
    assert main(["run", str(write_config(tmp_path / "bad.yaml", **config)), "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "preset tiny-336 does not share preset tiny's CLIP and image size" in err


def test_a_backend_option_it_does_not_take_is_refused_in_one_line(data, tmp_path, capsys):
    config = config_for("classify", data, tmp_path / "out")
    config["backend"] = {"name": "clip-zero-shot", "options": {"tokenizer": str(tmp_path)}}
    assert main(["run", str(write_config(tmp_path / "c.yaml", **config))]) == 2
    err = capsys.readouterr().err
    assert err == "comneck-eval: error: backend clip-zero-shot: 'tokenizer' is not an option of clip-zero-shot (options: none)\n"
