"""Dynamic batching: the batcher forms batches as Triton's does (size and wait bounds, never past an
exclusive job, cancelled work never computed); the gateway's batched answers equal the answers of
each request alone; one request's failure fails it alone; deadlines answer 504 and drop the work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from types import SimpleNamespace

import pytest
from checkpoints import write_llava

from comneck.backends import GenerationOptions
from comneck.errors import ComneckInputError, ErrorCode
from comneck.image import sample_photo
from comneck.models import build_codec
from comneck.pipeline import Pipeline
from comneck_edge import EdgeEncoder
from comneck_server.batcher import Batcher
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings


def fake(prompts: int = 1) -> SimpleNamespace:
    return SimpleNamespace(prompts=["p"] * prompts)


class Recorder:
    """A run_batch that records each batch's requests and answers each with its own identity."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.batches: list[list] = []
        self.hold = hold

    def __call__(self, requests):
        if self.hold is not None:
            self.hold.wait(5)
        self.batches.append(list(requests))
        return [[id(r)] for r in requests]


def test_requests_within_the_wait_form_one_batch_up_to_max_batch():
    hold, run = threading.Event(), Recorder()
    batcher = Batcher(run, max_batch=3, max_wait_s=0.5)
    blocker = batcher.call(hold.wait)  # the thread is busy: these queue behind it
    requests = [fake() for _ in range(5)]
    futures = [batcher.submit(r) for r in requests]
    time.sleep(0.6)  # past their longest wait: a batch forms of what is queued, at once
    hold.set()
    blocker.result(10)
    results = [f.result(10) for f in futures]
    assert [len(b) for b in run.batches] == [3, 2] and [r for b in run.batches for r in b] == requests
    assert [info.size for _, info in results] == [3, 3, 3, 2, 2]
    assert all(answers == [id(r)] for (answers, _), r in zip(results, requests))
    batcher.close()


def test_a_lone_request_waits_at_most_max_wait_and_a_batch_never_reaches_past_an_exclusive_job():
    run = Recorder()
    batcher = Batcher(run, max_batch=8, max_wait_s=0.2)
    started = time.perf_counter()
    (_, info) = batcher.submit(fake()).result(5)
    assert 0.15 < time.perf_counter() - started < 5 and info.size == 1 and 150 < info.wait_ms < 5000
    hold, order = threading.Event(), []
    blocker = batcher.call(hold.wait)
    first = batcher.submit(fake())
    job = batcher.call(lambda: order.append(len(run.batches)))
    second = batcher.submit(fake())
    hold.set()
    for future in (blocker, first, job, second):
        future.result(5)
    assert order == [2] and [len(b) for b in run.batches] == [1, 1, 1]  # first ran before the job, second after
    batcher.close()


def test_a_cancelled_request_is_never_computed_and_one_failure_fails_one_request():
    hold = threading.Event()

    def run(requests):
        return [ValueError("mine") if r.prompts == ["bad"] else ["ok"] for r in requests]

    batcher = Batcher(run, max_batch=8, max_wait_s=0)
    seen: list = []
    batcher.run_batch = lambda requests: (seen.extend(requests), run(requests))[1]
    blocker = batcher.call(hold.wait)
    dropped, good, bad = batcher.submit(fake()), batcher.submit(SimpleNamespace(prompts=["x"])), batcher.submit(SimpleNamespace(prompts=["bad"]))
    assert dropped.cancel() and batcher.depth == 3  # still counted until the thread skips it
    hold.set()
    blocker.result(5)
    assert good.result(5)[0] == ["ok"]
    with pytest.raises(ValueError, match="mine"):
        bad.result(5)
    with pytest.raises(CancelledError):
        dropped.result(0)
    assert len(seen) == 2 and all(r.prompts != ["p"] for r in seen)
    batcher.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        batcher.submit(fake())


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """A tiny pipeline with a classifier and a generative backend (LLaVA at tiny size)."""
    pipeline = Pipeline(tiny_models)
    pipeline.add_backend("clip-zero-shot")
    pipeline.add_backend("llava", write_llava(tmp_path_factory.mktemp("llava")))
    return pipeline


@pytest.fixture(scope="module")
def photos(tiny):
    encoder = EdgeEncoder(tiny)
    return [encoder.encode_file(path).data for path in sorted(sample_photo().parent.glob("*.png"))]


QUESTIONS = [
    ("Labels: cow, horse, beach", "classify", "clip-zero-shot", GenerationOptions()),
    ("Describe the photo.", "caption", "llava", GenerationOptions(max_new_tokens=5, logprobs=2)),
    ("Labels: money, chicken", "classify", "clip-zero-shot", GenerationOptions(top_k=2)),
    ("What animal is it?", "vqa", "llava", GenerationOptions(max_new_tokens=3)),
    ("Where is it?", "vqa", "llava", GenerationOptions(max_new_tokens=7, logprobs=1)),
]


def test_batched_answers_equal_each_request_alone(served, photos):
    gateway = Gateway(served, ServerSettings(max_batch=8, max_wait_ms=300))
    alone = [served.answer([photos[i % 2]], [prompt], backend, task, options)[0]
             for i, (prompt, task, backend, options) in enumerate(QUESTIONS)]
    answers: dict[int, object] = {}

    def ask(i: int) -> None:
        prompt, task, backend, options = QUESTIONS[i]
        answers[i] = gateway.infer(photos[i % 2], prompt, task, backend, options)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sizes = [answers[i].timings_ms["batch_size"] for i in range(len(QUESTIONS))]
    assert max(sizes) > 1  # they were batched
    for i, expected in enumerate(alone):
        got = answers[i]
        assert got.text == expected.text and got.backend == expected.backend and got.task == expected.task
        assert _strip(got.details) == _strip(expected.details)
        assert _floats(got.details) == pytest.approx(_floats(expected.details), abs=1e-5)
    gateway.close()


_SCORED = ("logprobs", "probabilities", "scores", "ranked", "labels")


def _strip(details: dict) -> dict:
    """Details without their float scores (compared to tolerance apart); ranked labels keep their
    names and order (their probabilities are rounded to 6 places, which a last-bit difference can
    tip)."""
    kept = {k: v for k, v in details.items() if k not in _SCORED}
    if "labels" in details:
        kept["labels"] = [entry["label"] for entry in details["labels"]]
    return kept


def _floats(details: dict) -> list[float]:
    found: list[float] = []

    def walk(node) -> None:
        if isinstance(node, float):
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk({k: v for k, v in details.items() if k in _SCORED})
    return found


def test_a_request_whose_backend_raises_fails_alone_in_its_batch(served, photos, monkeypatch):
    gateway = Gateway(served, ServerSettings(max_batch=8, max_wait_ms=300))
    llava = served.backends["llava"]
    generate = llava.generate

    def fragile(features, prompts, *args, **kwargs):
        if "boom" in prompts:
            raise RuntimeError("the backend broke on this item")
        return generate(features, prompts, *args, **kwargs)

    monkeypatch.setattr(llava, "generate", fragile)
    outcomes: dict[str, object] = {}

    def ask(prompt: str) -> None:
        try:
            outcomes[prompt] = gateway.infer(photos[0], prompt, "vqa", "llava", GenerationOptions(max_new_tokens=2)).text
        except RuntimeError as exc:
            outcomes[prompt] = exc

    threads = [threading.Thread(target=ask, args=(p,)) for p in ("one?", "boom", "two?")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(outcomes["boom"], RuntimeError)
    assert isinstance(outcomes["one?"], str) and isinstance(outcomes["two?"], str)
    gateway.close()


def test_a_request_past_its_deadline_answers_deadline_exceeded_and_its_work_is_dropped(served, photos, monkeypatch):
    gateway = Gateway(served, ServerSettings(request_timeout_s=0.5, max_wait_ms=0))
    hold, ran = threading.Event(), []
    run = gateway.batcher.run_batch

    def slow(requests):
        ran.append([r.prompts[0] for r in requests])
        hold.wait(5)
        return run(requests)

    monkeypatch.setattr(gateway.batcher, "run_batch", slow)
    late: list[ComneckInputError] = []

    def running() -> None:
        try:
            gateway.infer(photos[0], "Labels: a, b")
        except ComneckInputError as exc:
            late.append(exc)

    first = threading.Thread(target=running)
    first.start()
    while not ran:
        time.sleep(0.01)
    with pytest.raises(ComneckInputError) as err:
        gateway.infer(photos[0], "Labels: late, dropped")
    assert err.value.code == ErrorCode.DEADLINE_EXCEEDED and "had not started and was dropped" in str(err.value)
    hold.set()
    first.join()
    gateway.close()
    assert ran == [["Labels: a, b"]]  # the late request never reached the models
    assert len(late) == 1 and late[0].code == ErrorCode.DEADLINE_EXCEEDED and "it was running" in str(late[0])


def test_a_gateway_starts_one_decode_worker_per_core_by_default(monkeypatch):
    """The default (tests elsewhere run one worker: tests/conftest.py) and what a request then
    reports: decoded on a worker before it queued."""
    import os

    from comneck_server import gateway as module

    monkeypatch.delenv("COMNECK_DECODE_WORKERS")
    settings = ServerSettings()
    assert settings.decode_workers is None and module.cores() == len(os.sched_getaffinity(0))
    started: list[int] = []

    class Counted:
        def __init__(self, preset, codecs, workers, *args):
            started.append(workers)
            (weights,) = codecs.values()
            codec = build_codec(preset, weights)
            self.decode = lambda stream: codec.entropy_decode(stream.latents)

        def close(self) -> None:
            pass

    monkeypatch.setattr(module, "DecodeWorkers", Counted)
    gateway = Gateway.load(settings)
    try:
        assert started == [module.cores()]
        answer = gateway.infer(EdgeEncoder(gateway.models.preset).encode_file(sample_photo()).data, "Labels: a, b")
        timings = list(answer.timings_ms)
        assert timings.index("entropy_decode") < timings.index("queue")
    finally:
        gateway.close()
