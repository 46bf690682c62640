"""The evaluation loop: items -> each pipeline at each rate point, in batches -> scored lines in
``results.jsonl`` -> ``summary.json``, ``summary.md``, the plot, BD-rates and ``report.html``.

Lines are written (flushed and synced) as each batch is answered, so a crash or Ctrl-C loses
nothing already written, and ``--resume`` skips what ``results.jsonl`` already holds: its summary
equals an uninterrupted run's. ``--shard i/n`` takes every n-th item from the i-th, so n processes
(or GPUs) split a run; ``merge`` joins their folders. Every line records the protocol.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends import BACKENDS, GenerationOptions
from ..errors import ComneckInputError, ErrorCode
from .config import BACKEND_TASKS, EvalConfig
from .items import Item, Outcome, Support
from .metrics import HumanViewing, codec_frame, metric_for, pair_up, summarize_means
from .report import BD_METHOD, bd_rates, summary_table_markdown, write_report

RESULTS, SUMMARY, TABLE, CONFIG = "results.jsonl", "summary.json", "summary.md", "config.json"
#: LLaVA-1.5's own COCO caption instruction (its evaluation's prompt), for a backend that needs one.
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
#: The official evaluation's answer lengths, per backend (the paper protocol): Honeybee's SEED
#: setting max_length 20 counts the BOS, so 19 new tokens.
PAPER_MAX_NEW_TOKENS = {"honeybee": 19}
SHIKRA_REC_TEMPLATES = 54


@dataclass(frozen=True)
class Shard:
    """Process ``index`` of ``count`` (0-based): it takes items index, index + count, ..."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``i/n`` with 0 <= i < n, or a one-line error."""
        left, sep, right = text.partition("/")
        if not (sep and left.isdigit() and right.isdigit() and 0 <= int(left) < int(right)):
            raise ComneckInputError(f"--shard wants i/n with 0 <= i < n (e.g. 0/4), got {text!r}", ErrorCode.BAD_CONFIG)
        return cls(int(left), int(right))

    def take(self, items: Sequence[Item]) -> list[Item]:
        return list(items[self.index :: self.count])


def check_backend_task(config: EvalConfig) -> None:
    """Refuse, before anything loads, a backend that does not do the task (mcq: that takes no choices)."""
    if config.backend is None:
        return
    spec = BACKENDS.get(config.backend.name)
    if spec is None:
        raise ComneckInputError(f"unknown backend {config.backend.name!r}; backends are {', '.join(BACKENDS)}", ErrorCode.UNKNOWN_BACKEND)
    wanted = BACKEND_TASKS[config.task]
    if wanted not in spec.tasks or (config.task == "mcq" and not spec.choices):
        doing = [task for task, asks in BACKEND_TASKS.items() if asks in spec.tasks and (task != "mcq" or spec.choices)]
        raise ComneckInputError(f"backend {spec.name} does not do the {config.task} task; it does {', '.join(doing) or 'none of them'}",
                                ErrorCode.UNSUPPORTED_TASK)


@dataclass
class Question:
    """What the harness asks the backend for one item: prompt, choices, options, few-shot support."""

    prompt: str
    choices: list[str]
    options: GenerationOptions
    support: list[Support] = field(default_factory=list)


def questions(config: EvalConfig, items: Sequence[Item], classes: Sequence[str] = ()) -> list[Question]:
    """Each item's question under the run's protocol (``paper``: the official evaluation's choices,
    read from its code; ``clean``: what a served request sees); ``classes``: the labels a zero-shot
    classifier chooses from (every class of the dataset, not only those of the items asked)."""
    backend = config.backend.name if config.backend else ""
    paper = config.protocol == "paper"
    length = config.max_new_tokens or (PAPER_MAX_NEW_TOKENS.get(backend) if paper else None)
    options = GenerationOptions(**({"max_new_tokens": length} if length else {}))
    labels = list(classes) or sorted({str(item.reference) for item in items})
    asked = []
    for item in items:
        own = options
        if paper and backend == "shikra":  # the official REC evaluation draws one of the 54 templates per sample
            own = options.model_copy(update={"template": random.Random(f"{config.seed}:{item.id}").randrange(SHIKRA_REC_TEMPLATES)})
        support = list(item.support)
        if paper and config.task == "fewshot":  # the official episode shows the query, labelled, after the five supports
            support.append(Support(item.image, str(item.reference)))
        if config.task == "classify":
            prompt = "Labels: " + ", ".join(labels)
        elif config.task == "caption":
            prompt = (config.backend.prompt if config.backend and config.backend.prompt is not None
                      else CAPTION_PROMPT if backend == "llava" else "")
        else:
            prompt = item.prompt
        asked.append(Question(prompt, list(item.choices), own, support))
    return asked


def batches(items: Sequence[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def result_line(item: Item, outcome: Outcome, question: Question, score: dict[str, float], protocol: str) -> dict[str, Any]:
    """One line of ``results.jsonl``: ids, pipeline, rate point, bpp, prediction, reference, score."""
    return {
        "item": item.id, "pipeline": outcome.pipeline, "point": outcome.point, "bytes": outcome.bytes, "bpp": outcome.bpp,
        "edge_ms": outcome.edge_ms, "prediction": outcome.text, "details": outcome.details, "reference": item.reference,
        "prompt": question.prompt, "group": item.group, "score": score, "protocol": protocol, "random_weights": outcome.random_weights,
    }


class Results:
    """``results.jsonl``: lines appended as they come (flushed and synced), and what it already holds."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RESULTS

    def read(self) -> list[dict[str, Any]]:
        """Every complete line (a line cut by a crash is dropped: its item runs again on --resume)."""
        if not self.path.exists():
            return []
        lines = []
        for raw in self.path.read_text(encoding="utf-8").splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return lines

    def done(self) -> set[tuple[str, str, str]]:
        return {(line["pipeline"], line["point"], line["item"]) for line in self.read()}

    def append(self, lines: Sequence[dict[str, Any]]) -> None:
        if self._ends_mid_line():
            with self.path.open("a", encoding="utf-8") as out:
                out.write("\n")
        with self.path.open("a", encoding="utf-8") as out:
            for line in lines:
                out.write(json.dumps(line, default=str) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def _ends_mid_line(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"


def outcome_of(line: dict[str, Any]) -> Outcome:
    """An :class:`Outcome` as a results line records it (no images)."""
    return Outcome(line["item"], line["pipeline"], line["point"], line["prediction"], line["details"], line["bytes"], line["bpp"],
                   line["edge_ms"], line["random_weights"])


def config_record(config: EvalConfig) -> dict[str, Any]:
    """The config as JSON (``config.json``; a resumed or merged run must have been this one)."""
    return json.loads(config.model_dump_json())


def summarize(config: EvalConfig, items: Sequence[Item], lines: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per (pipeline, rate point), in the order the lines came: mean bpp, bytes and edge time, the
    metric's summary and the count; and the metric's notes. Per-item scores come from the lines; a
    corpus-level metric (CIDEr) is computed over each point's lines. The uncompressed image's bpp
    (24, raw RGB) is kept as ``raw_bpp``: its ``bpp`` is None, so plots draw it as the upper bound."""
    metric = metric_for(config.task)
    curves: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in lines:
        curves.setdefault((line["pipeline"], line["point"]), []).append(line)
    uncompressed = {p.curve for p in config.pipelines if p.name == "uncompressed"}
    rows = []
    for (pipeline, point), own in curves.items():
        outcomes = [outcome_of(line) for line in own]
        if all(line["score"] for line in own):
            summary = summarize_means(metric.name, pair_up(items, outcomes), {line["item"]: line["score"] for line in own})
        else:
            summary = metric.evaluate(items, outcomes).summary
        n = len(own)
        bpp = sum(line["bpp"] for line in own) / n
        rows.append({"pipeline": pipeline, "point": point, "bpp": None if pipeline in uncompressed else bpp, "raw_bpp": bpp,
                     "bytes": sum(line["bytes"] for line in own) / n, "edge_ms": sum(line["edge_ms"] for line in own) / n,
                     "random_weights": any(line["random_weights"] for line in own), **summary})
    return rows, metric.notes


def _prepare_output(folder: Path, config: EvalConfig, resume: bool, force: bool) -> None:
    """Refuse to mix runs: a folder holding results needs ``--resume`` (of the same config) or ``--force``."""
    from ..weights_folder import check_target

    results, record = folder / RESULTS, folder / CONFIG
    if results.exists() and not (resume or force):
        raise ComneckInputError(f"{folder} holds an earlier run's results: pass --resume to continue it or --force to start afresh",
                                ErrorCode.BAD_OUTPUT)
    if resume and record.exists():
        earlier = json.loads(record.read_text())
        now = config_record(config)
        changed = sorted(k for k in set(earlier) | set(now) if earlier.get(k) != now.get(k) and k != "output")
        if changed:
            raise ComneckInputError(f"--resume continues the same run, but {', '.join(changed)} differ from {record}: "
                                    "use another output folder", ErrorCode.BAD_OUTPUT)
    if force:
        for name in (RESULTS, SUMMARY, TABLE, CONFIG, "report.html"):
            (folder / name).unlink(missing_ok=True)
    elif not resume:
        check_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(config_record(config), indent=2) + "\n")


def read_all_items(config: EvalConfig) -> list[Item]:
    """Every item of the dataset, whatever the limit or shard (a classifier's labels are all its classes)."""
    from .datasets import read_dataset

    return read_dataset(config.task, config.dataset.root, **config.dataset.options)


def read_items(config: EvalConfig, shard: Shard = Shard(), everything: Sequence[Item] | None = None) -> list[Item]:
    """The dataset's items (``everything``, when already read), limited and sharded as the config and ``shard`` say."""
    items = list(everything) if everything is not None else read_all_items(config)
    items = items[: config.dataset.limit] if config.dataset.limit else items
    taken = shard.take(items)
    if not taken:
        raise ComneckInputError(f"{config.dataset.root}: no items to evaluate (shard {shard.index}/{shard.count} of {len(items)})",
                                ErrorCode.BAD_DATASET)
    return taken


def _base_pipeline(config: EvalConfig) -> Any:
    """The library pipeline every curve shares: the preset's CLIP, the backend (loaded once)."""
    from ..pipeline import Pipeline

    pipeline = Pipeline.from_pretrained(preset=config.preset, device=config.device, dtype=config.dtype,
                                        clip_weights=config.clip_weights, backends=(), clip_final_norm=final_norm(config))
    if config.backend is not None:
        pipeline.add_backend(config.backend.name, config.backend.weights, config.backend.options)
    return pipeline


def final_norm(config: EvalConfig) -> str | None:
    """The paper protocol runs CLIP as the official code does (``ln_post`` twice); clean: what the weights record."""
    return "twice" if config.protocol == "paper" else None


def _learned_bpps(lines: Sequence[dict[str, Any]], learned: set[str]) -> list[float]:
    """The mean bpp of every learned curve's rate point so far: what an ``auto`` quality sweep covers."""
    sums: dict[tuple[str, str], list[float]] = {}
    for line in lines:
        if line["pipeline"] in learned:
            sums.setdefault((line["pipeline"], line["point"]), []).append(line["bpp"])
    return sorted({round(sum(v) / len(v), 4) for v in sums.values()})


def _curve(config: EvalConfig, index: int, base: Any, items: Sequence[Item], results: Results) -> Any:
    """The evaluation pipeline of ``config.pipelines[index]``; an ``auto`` quality sweep is calibrated
    here, on the first items framed as the pipeline frames them, against the learned curves answered before it."""
    from .pipelines import build_pipeline, calibrate, frame

    spec = config.pipelines[index]

    def build(qualities: list[int] | None) -> Any:
        return build_pipeline(spec.name, base, [p.weights for p in spec.points] or [None], qualities=qualities, resize=config.resize,
                              server=config.server if spec.name == "comneck" else None, clip_weights=config.clip_weights,
                              clip_final_norm=final_norm(config), preset=spec.preset)

    if spec.qualities != "auto":
        return build(spec.qualities)
    learned = {p.curve for p in config.pipelines if p.name in ("comneck", "reconstruction", "postproc")}
    targets = _learned_bpps(results.read(), learned)
    if not targets:
        return build(None)
    backend = config.backend.name if config.backend else None
    policy = build(None).policy(backend, BACKEND_TASKS.get(config.task, "human"))
    photos = [frame(item.image, policy, base.preset.image_size).image for item in items[:4]]
    return build(sorted(set(calibrate(spec.name, photos, targets))))  # near targets may share one


def evaluate(config: EvalConfig, resume: bool = False, force: bool = False, shard: Shard = Shard()) -> str:
    """Run ``config``: every pipeline at every rate point over the (sharded) items, lines written as
    they come; then, unless this is one shard of several, the summary, plots and report. Returns
    what the command prints."""
    import dataclasses

    from tqdm import tqdm

    from .pipelines import weight_points

    check_backend_task(config)  # the cheap checks first, before the output folder is touched
    for index, spec in enumerate(config.pipelines):
        if spec.points:
            weight_points([p.weights for p in spec.points], config.curve_preset(index))
    everything = read_all_items(config)
    items = read_items(config, shard, everything)
    folder = config.output
    _prepare_output(folder, config, resume, force)
    classes = sorted({str(item.reference) for item in everything}) if config.task == "classify" else ()
    asked = questions(config, items, classes)
    by_id = {item.id: (dataclasses.replace(item, support=tuple(q.support)), q) for item, q in zip(items, asked)}
    base = _base_pipeline(config)
    metric = (HumanViewing(codec_frame(config.resize or "paper", base.preset.image_size)) if config.task == "human"
              else metric_for(config.task))
    results = Results(folder)
    done = results.done()
    shown = set(random.Random(config.seed).sample(sorted(by_id), min(config.gallery, len(by_id))))
    gallery: list[dict[str, Any]] = []
    backend = config.backend.name if config.backend else None
    task = BACKEND_TASKS.get(config.task, "human")
    for index, spec in enumerate(config.pipelines):
        curve = _curve(config, index, base, items, results)
        for point in curve.points():
            todo = [by_id[item.id][0] for item in items if (spec.curve, point.label, item.id) not in done]
            progress = tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{spec.curve} @ {point.label}", unit="item",
                            disable=None)
            for batch in batches(todo, config.batch_size):
                own = [by_id[item.id][1] for item in batch]
                outcomes = curve.run(point, batch, [q.prompt for q in own], [q.choices or None for q in own],
                                     [q.options for q in own], backend, task)
                lines = []
                for item, question, outcome in zip(batch, own, outcomes):
                    outcome.pipeline = spec.curve
                    score = metric.score(item, outcome)
                    lines.append(result_line(item, outcome, question, score, config.protocol))
                    if item.id in shown and not any(g["pipeline"] == spec.curve and g["item"] == item.id for g in gallery):
                        gallery.append({"item": item.id, "photo": item.image, "reconstruction": outcome.reconstruction,
                                        "prompt": question.prompt, "prediction": outcome.text, "reference": item.reference,
                                        "score": score, "pipeline": spec.curve, "point": point.label})
                results.append(lines)
                progress.update(len(batch))
            progress.close()
    if shard.count > 1:
        return (f"shard {shard.index}/{shard.count}: {len(items)} items x {len(config.pipelines)} pipelines in {folder / RESULTS}; "
                f"join the shards with: comneck-eval merge OUTPUT SHARD_FOLDERS...")
    return write_outputs(folder, config, read_items(config, everything=everything), results.read(), gallery)


def write_outputs(folder: Path, config: EvalConfig, items: Sequence[Item], lines: Sequence[dict[str, Any]],
                  gallery: Sequence[dict[str, Any]] = ()) -> str:
    """``summary.json``, ``summary.md``, the plots and ``report.html`` from the run's lines; returns the table."""
    from ..models import RANDOM_WEIGHTS_NOTE

    rows, notes = summarize(config, items, lines)
    metric = metric_for(config.task).name
    anchor = config.anchor or next((p.curve for p in config.pipelines if p.name in ("jpeg", "webp", "avif")), None)
    random_weights = any(row["random_weights"] for row in rows)
    summary = {"task": config.task, "protocol": config.protocol, "metric": metric, "rows": rows, "notes": notes,
               "bd_anchor": anchor, "bd_interpolation": BD_METHOD, "bd": bd_rates(rows, metric, anchor) if anchor else {},
               "random_weights": random_weights, "items": len(items)}
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    table = summary_table_markdown(rows, metric)
    banner = f"**{RANDOM_WEIGHTS_NOTE}**\n\n" if random_weights else ""
    (folder / TABLE).write_text(f"# {config.task}: {metric} against bpp (protocol {config.protocol})\n\n{banner}{table}\n")
    meta = {"task": config.task, "dataset": str(config.dataset.root), "protocol": config.protocol,
            "backend": config.backend.name if config.backend else "none (human viewing)",
            "weights": {p.curve: {str(q.rate): str(q.weights) for q in p.points} for p in config.pipelines if p.points},
            "random_weights": random_weights, "random_weights_note": RANDOM_WEIGHTS_NOTE, "metric": metric, "anchor": anchor,
            "notes": notes + _protocol_notes(config), "config": config_record(config)}
    page = write_report(folder, rows, meta, [{k: v for k, v in g.items() if k != "item"} for g in gallery])
    said = f"{RANDOM_WEIGHTS_NOTE}\n" if random_weights else ""
    return f"{said}{table}\nwrote {folder / RESULTS}, {folder / SUMMARY}, {folder / TABLE}, {page}"


def _protocol_notes(config: EvalConfig) -> list[str]:
    """What the run's protocol changes against the other one (docs/evaluation.md, "Protocols")."""
    if config.protocol == "clean":
        return ["protocol clean: what a served request sees (no labelled query in few-shot prompts, template 0, the "
                "backend's default answer length, CLIP's final norm as the weights record)"]
    return ["protocol paper: the official evaluation's choices: CLIP's ln_post twice, V2L's query shown with its label "
            "as a sixth example, Shikra's REC template drawn per sample (seeded), Honeybee's 19 new tokens"]


def report(folder: Path) -> str:
    """``comneck-eval report``: the outputs again from a folder's ``config.json`` and ``results.jsonl``."""
    from .config import EvalConfig

    record = folder / CONFIG
    if not record.is_file():
        raise ComneckInputError(f"{folder} holds no {CONFIG}: not a comneck-eval output folder", ErrorCode.BAD_OUTPUT)
    config = EvalConfig.model_validate(json.loads(record.read_text()))
    return write_outputs(folder, config, read_items(config), Results(folder).read())


def merge(output: Path, shards: Sequence[Path], force: bool = False) -> str:
    """``comneck-eval merge``: the shards' lines (of one config) joined in ``output``, then its outputs."""
    from ..weights_folder import check_target
    from .config import EvalConfig

    records = []
    for shard in shards:
        if not (shard / CONFIG).is_file():
            raise ComneckInputError(f"{shard} holds no {CONFIG}: not a comneck-eval output folder", ErrorCode.BAD_OUTPUT)
        record = json.loads((shard / CONFIG).read_text())
        records.append({k: v for k, v in record.items() if k != "output"})
    if any(r != records[0] for r in records):
        raise ComneckInputError("the shards were run with different configs: merge only the shards of one run", ErrorCode.BAD_OUTPUT)
    check_target(output, force)
    output.mkdir(parents=True, exist_ok=True)
    config = EvalConfig.model_validate({**records[0], "output": str(output)})
    joined: dict[tuple[str, str, str], dict[str, Any]] = {}
    for shard in shards:
        for line in Results(shard).read():
            joined.setdefault((line["pipeline"], line["point"], line["item"]), line)
    (output / RESULTS).unlink(missing_ok=True)
    Results(output).append(list(joined.values()))
    (output / CONFIG).write_text(json.dumps(config_record(config), indent=2) + "\n")
    return write_outputs(output, config, read_items(config), Results(output).read())
