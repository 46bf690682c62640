"""Decoding in worker processes: the same latents as in process, and a dead or overrunning
worker costs one request, then is replaced."""

import os
import signal

import pytest
import torch

from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_server.decode_workers import DecodeWorkers


@pytest.fixture(scope="module")
def encoded(tiny):
    return EdgeEncoder(tiny).encode_file(sample_photo())


@pytest.fixture(scope="module")
def workers(tiny, tiny_models):
    pool = DecodeWorkers(tiny, None, tiny_models.codec_fingerprint, workers=1, timeout_s=60)
    yield pool
    pool.close()


def test_workers_decode_what_the_gateway_process_decodes(workers, encoded, tiny_models):
    expected = tiny_models.codec.entropy_decode(encoded.bitstream.latents)
    assert torch.equal(workers.decode(encoded.bitstream.latents), expected)
    cut = type(encoded.bitstream.latents)([*encoded.bitstream.latents.strings[:-1], [b"\x00"]], (256, 256))
    with pytest.raises(ComneckInputError) as info:
        workers.decode(cut)
    assert info.value.code == "corrupt_bitstream"  # refusals come back with their code


def test_a_worker_that_dies_costs_one_request_and_is_replaced(workers, encoded, tiny_models):
    (pid,) = workers.pids()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ComneckInputError) as info:
        workers.decode(encoded.bitstream.latents)
    assert info.value.code == "corrupt_bitstream" and "crashed" in str(info.value)
    assert workers.pids() != [pid]
    assert torch.equal(workers.decode(encoded.bitstream.latents), tiny_models.codec.entropy_decode(encoded.bitstream.latents))


def test_an_overrun_is_refused_and_the_worker_replaced(workers, encoded, tiny_models):
    (pid,) = workers.pids()
    limit, workers.timeout_s = workers.timeout_s, 1e-4
    try:
        with pytest.raises(ComneckInputError) as info:
            workers.decode(encoded.bitstream.latents)
    finally:
        workers.timeout_s = limit
    assert info.value.code == "decode_timeout" and workers.pids() != [pid]
    assert torch.equal(workers.decode(encoded.bitstream.latents), tiny_models.codec.entropy_decode(encoded.bitstream.latents))


def test_a_worker_whose_codec_differs_stops_the_start(tiny):
    with pytest.raises(RuntimeError, match="differs from the gateway's"):
        DecodeWorkers(tiny, None, bytes(8), workers=1)
