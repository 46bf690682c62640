"""Mutated containers against a real gateway: every answer is 200 or a coded 4xx, the server
stays up, and a valid request afterwards gets the same answer as before (bounded and seeded)."""

import dataclasses
import random

import httpx
import pytest

from comneck.bitstream import Bitstream
from comneck.codec import EncodedLatents
from comneck.errors import ErrorCode
from comneck.image import sample_photo
from comneck_edge import EdgeEncoder
from comneck_server.demo import local_gateway

CASES = 120
PROMPT = "Labels: cow, horse, beach"


def mutate(stream: Bitstream, rng: random.Random) -> bytes:
    """One random kind of damage, the CRC recomputed (what any client can send)."""
    strings = [list(s) for s in stream.latents.strings]
    size = stream.image_size
    i, j = rng.randrange(len(strings)), rng.randrange(len(strings))
    data = strings[i][0]
    kind = rng.choice(["truncate", "random", "swap", "flip", "size", "extend", "empty"])
    if kind == "truncate":
        strings[i] = [data[: rng.randrange(len(data) + 1)]]
    elif kind == "random":
        strings[i] = [rng.randbytes(rng.choice([len(data), rng.randrange(1, 2 * len(data) + 9)]))]
    elif kind == "swap":
        strings[i], strings[j] = strings[j], strings[i]
    elif kind == "flip":
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        strings[i] = [bytes(flipped)]
    elif kind == "size":  # a header consistent with itself, for another image size
        size = (rng.randint(1, 512), rng.randint(1, 512))
    elif kind == "extend":
        strings[i] = [data + rng.randbytes(rng.randint(1, 64))]
    else:
        strings[i] = [b""]
    padded = tuple(-(-side // 64) * 64 for side in size)
    return dataclasses.replace(stream, image_size=size, latents=EncodedLatents(strings, padded)).to_bytes()


@pytest.fixture(scope="module")
def gateway():
    with local_gateway("tiny", timeout=120) as client:
        yield client.url


def infer(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.post("/infer", files={"bitstream": ("x.cnk", data)}, data={"prompt": PROMPT})


def test_mutated_containers_get_200_or_a_coded_4xx_and_the_gateway_keeps_serving(gateway, tiny):
    encoded = EdgeEncoder(tiny).encode_file(sample_photo())
    codes = {code.value for code in ErrorCode}
    rng = random.Random(2026)
    seen: dict[int, int] = {}
    with httpx.Client(base_url=gateway, timeout=60) as http:
        before = infer(http, encoded.data).json()
        for case in range(CASES):
            data = mutate(encoded.bitstream, rng)
            answer = infer(http, data) if case % 2 else http.post("/reconstruct", content=data,
                                                                    headers={"Content-Type": "application/octet-stream"})
            seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
            assert answer.status_code == 200 or (400 <= answer.status_code < 500 and answer.json()["error"]["code"] in codes), (
                case, answer.status_code, answer.text[:200])
        assert http.get("/healthz").status_code == 200
        after = infer(http, encoded.data).json()
    assert (after["text"], after["details"]) == (before["text"], before["details"])
    assert seen.get(400, 0) > CASES // 4  # most damage is caught, not decoded into garbage
