"""Support-set stores: the memory store and the Redis store keep one contract (replace, delete,
limit), Redis stores of two replicas see the same sets, and a Redis that is down or hung answers
503 support_store_unavailable at once (other inference goes on) until it is back. Redis is Debian's
redis-server, started here on a free loopback port."""

from __future__ import annotations

import base64
import functools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from comneck.backends import BackendAnswer, BackendSpec, SupportExample
from comneck.clip_split import ClipTap
from comneck.errors import ComneckInputError, ErrorCode
from comneck_server.settings import ServerSettings
from comneck_server.support_sets import MemorySupportSets, SupportSet, SupportStore, open_store

PETS = SupportSet("pets", "v2l", (SupportExample("whiskers fur ñ", "cat"), SupportExample("bark tail", "dog")))
FARM = SupportSet("farm", "v2l", (SupportExample("feathers", "chicken"), SupportExample("horns", "cow"), SupportExample("hay", "cow")))


class RedisServer:
    """Debian's redis-server on a free loopback port, its files in ``folder``; no persistence."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder, self.process = folder, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def pause(self, paused: bool) -> None:
        """SIGSTOP (connections open, nothing answers) or SIGCONT."""
        os.kill(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    if server.process.poll() is None:
        server.pause(False)
        server.kill()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The server's URL, emptied for this test (restarted if a test left it down)."""
    if redis_server.process.poll() is not None:
        redis_server.start()
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


@pytest.fixture(params=["memory", "redis"])
def make_store(request) -> Callable[..., SupportStore]:
    """Stores of one kind: memory (one per call), or Redis stores over one server (replicas)."""
    if request.param == "memory":
        return MemorySupportSets
    url = request.getfixturevalue("redis_url")
    from comneck_server.support_redis import RedisSupportSets

    return functools.partial(RedisSupportSets, url)


def refused(call: Callable[[], object]) -> ComneckInputError:
    with pytest.raises(ComneckInputError) as info:
        call()
    assert "\n" not in str(info.value)
    return info.value


def test_put_replaces_get_checks_the_backend_delete_forgets(make_store):
    store = make_store()
    assert store.put(PETS) is False and store.put(FARM) is False
    assert store.all() == [FARM, PETS]  # by name
    assert store.get("pets", "v2l") == PETS  # examples, in order, as registered
    smaller = SupportSet("pets", "v2l", PETS.examples[:1])
    assert store.put(smaller) is True and store.get("pets", "v2l") == smaller
    error = refused(lambda: store.get("pets", "llava"))
    assert error.code == ErrorCode.UNKNOWN_SUPPORT_SET and "(it is v2l's)" in str(error)
    assert store.delete("pets") == smaller and store.all() == [FARM]
    assert refused(lambda: store.get("pets", "v2l")).code == ErrorCode.UNKNOWN_SUPPORT_SET
    assert refused(lambda: store.delete("pets")).code == ErrorCode.UNKNOWN_SUPPORT_SET


def test_the_limit_counts_sets_not_replacements(make_store):
    store = make_store(limit=2)
    store.put(PETS)
    store.put(FARM)
    error = refused(lambda: store.put(SupportSet("zoo", "v2l", PETS.examples)))
    assert error.code == ErrorCode.BAD_SUPPORT and "2 support sets are registered" in str(error)
    assert store.put(SupportSet("farm", "v2l", FARM.examples[:2])) is True  # a replacement fits in a full store
    store.delete("pets")
    assert store.put(SupportSet("zoo", "v2l", PETS.examples)) is False
    assert [s.name for s in store.all()] == ["farm", "zoo"]


def test_replicas_registering_at_once_never_pass_the_limit(make_store):
    """16 registrations at once, each from its own store where the kind allows (Redis: 16 replicas),
    into a limit of 5: exactly 5 get in."""
    shared = make_store(limit=5)
    stores = [make_store(limit=5) if not isinstance(shared, MemorySupportSets) else shared for _ in range(16)]
    outcomes: list[str] = []
    start = threading.Barrier(len(stores))

    def register(i: int) -> None:
        start.wait()
        try:
            stores[i].put(SupportSet(f"set{i}", "v2l", PETS.examples))
            outcomes.append("added")
        except ComneckInputError as exc:
            outcomes.append(str(exc.code))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["added"] * 5 + ["bad_support"] * 11
    assert len(shared.all()) == 5


def test_two_replicas_see_the_same_sets(redis_url):
    first, second = open_store(redis_url), open_store(redis_url)
    first.put(PETS)
    assert second.get("pets", "v2l") == PETS and second.all() == [PETS]
    second.put(FARM)
    assert first.delete("farm") == FARM
    assert second.all() == [PETS] and first.state() == second.state() == "redis: ok"


def _all_unavailable(store: SupportStore, within_s: float) -> None:
    """Every call answers 503 support_store_unavailable, each within ``within_s``."""
    for call in (lambda: store.put(PETS), lambda: store.get("pets", "v2l"), lambda: store.delete("pets"), store.all):
        started = time.monotonic()
        error = refused(call)
        assert time.monotonic() - started < within_s
        assert error.code == ErrorCode.SUPPORT_STORE_UNAVAILABLE and error.code.status == 503 and error.retry_after == 1
        assert "support-set store (Redis) cannot be reached" in str(error)
    assert store.state().startswith("redis: unavailable (")


def test_a_killed_redis_is_refused_at_once_and_the_store_recovers(redis_server, redis_url):
    store = open_store(redis_url)
    store.put(PETS)
    redis_server.kill()
    _all_unavailable(store, within_s=0.5)  # connection refused: no timeout to wait for
    redis_server.start()
    assert store.all() == []  # the same store reconnects (this server keeps nothing across restarts)
    store.put(PETS)
    assert store.get("pets", "v2l") == PETS and store.state() == "redis: ok"


def test_a_hung_redis_costs_two_socket_timeouts_at_most(redis_server, redis_url):
    from comneck_server.support_redis import RedisSupportSets

    store = RedisSupportSets(redis_url, timeout_s=0.2)
    store.put(PETS)
    redis_server.pause(True)
    try:
        _all_unavailable(store, within_s=1.0)  # one try and one retry of 0.2 s each, not a hang
    finally:
        redis_server.pause(False)
    assert store.get("pets", "v2l") == PETS


def test_the_setting_takes_memory_or_a_redis_url():
    from comneck_server.cli import parse_settings

    assert ServerSettings().support_store == "memory"
    assert ServerSettings(support_store="redis://redis:6379/0").support_store == "redis://redis:6379/0"
    with pytest.raises(ValidationError):
        ServerSettings(support_store="postgres://db")
    error = refused(lambda: parse_settings(["--support-store", "redis-host:6379"]))
    assert error.code == ErrorCode.BAD_SETTINGS and str(error).startswith("--support-store:")
    assert isinstance(open_store("memory"), MemorySupportSets)


class _StubFewShot:
    """A few-shot backend that describes support image i as ``image i`` and answers with the
    episode it was given, so an answer shows which support set it came from."""

    spec = BackendSpec("stub-fewshot", "x:Y", "test stub", ("fewshot",), ClipTap("embedding", tokens="cls"))
    random_weights = True

    def check_support(self, labels):
        pass

    def check_prompt(self, prompt, task, options, choices=()):
        pass

    def describe(self, features):
        return [f"image {i}" for i in range(len(features))]

    def fewshot(self, features, support, options):
        return [BackendAnswer(support[0].label, {"episode": [[e.description, e.label] for e in support]}) for _ in features]


def test_two_gateways_over_one_redis_share_sets_and_survive_its_outage(redis_server, redis_url, tiny, tiny_pipeline, monkeypatch):
    """A set registered through one gateway's HTTP API answers a fewshot request on another; while
    Redis is down support-set requests answer 503 and classification goes on, and /readyz says so."""
    from fastapi.testclient import TestClient

    from comneck.image import sample_photo
    from comneck_edge import EdgeEncoder
    from comneck_server.app import create_app
    from comneck_server.gateway import Gateway

    monkeypatch.setitem(tiny_pipeline.backends, "stub-fewshot", _StubFewShot())
    settings = ServerSettings(support_store=redis_url)
    data = EdgeEncoder(tiny).encode_file(sample_photo()).data
    query = {"bitstream": base64.b64encode(data).decode(), "prompt": "", "task": "fewshot", "backend": "stub-fewshot",
             "support_set": "pets"}
    classify = {"bitstream": query["bitstream"], "prompt": "Labels: cow, horse, beach", "backend": "clip-zero-shot"}
    with TestClient(create_app(settings, Gateway(tiny_pipeline, settings))) as one, \
            TestClient(create_app(settings, Gateway(tiny_pipeline, settings))) as other:
        made = one.put("/v1/support-sets/pets", files=[("support_bitstreams", ("a.cnk", data)), ("support_bitstreams", ("b.cnk", data))],
                       data={"support_labels": '["cat", "dog"]', "backend": "stub-fewshot"})
        assert made.status_code == 200, made.text
        assert [s["name"] for s in other.get("/v1/support-sets").json()["support_sets"]] == ["pets"]
        answer = other.post("/infer", json=query)
        assert answer.status_code == 200, answer.text
        assert answer.json()["details"]["episode"] == [["image 0", "cat"], ["image 1", "dog"]]
        assert other.get("/readyz").json()["support_store"] == "redis: ok"

        redis_server.kill()
        for refusal in (other.post("/infer", json=query), other.get("/v1/support-sets"), one.delete("/v1/support-sets/pets")):
            assert refusal.status_code == 503 and refusal.headers["retry-after"] == "1", refusal.text
            assert refusal.json()["error"]["code"] == "support_store_unavailable"
        assert other.post("/infer", json=classify).status_code == 200  # no support set: Redis is not asked
        ready = other.get("/readyz")
        assert ready.status_code == 200 and ready.json()["support_store"].startswith("redis: unavailable (")

        redis_server.start()
        assert other.get("/readyz").json()["support_store"] == "redis: ok"
        assert other.get("/v1/support-sets").json() == {"support_sets": []}  # this Redis kept nothing across its restart
        assert other.post("/infer", json=query).json()["error"]["code"] == "unknown_support_set"
