"""--lazy-backends: backends checked at start-up and loaded by the first request that needs them."""

import pytest
from checkpoints import write_shikra
from fastapi.testclient import TestClient
from test_gateway import PROMPT, through

from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck.pipeline import Pipeline
from comneck_edge import EdgeEncoder, GatewayError
from comneck_server.app import create_app
from comneck_server.gateway import Gateway
from comneck_server.settings import ServerSettings


@pytest.fixture(scope="module")
def encoded(tiny):
    return EdgeEncoder(tiny).encode_file(sample_photo())


def test_lazy_backends_load_on_first_use_once_and_a_failure_stays_reported(tiny_models, encoded, tmp_path):
    """--lazy-backends: start-up checks a backend without loading it; the first request that
    needs it loads it (on the model thread); one whose files fail only at loading answers 503
    load_failed, for that request and the next, and the others keep serving."""
    broken = write_shikra(tmp_path).merged
    next(broken.glob("pytorch_model-00002-*.bin")).write_text("not weights")  # found only by loading it
    pipeline = Pipeline(tiny_models)
    pipeline.add_backend("clip-zero-shot", lazy=True)
    pipeline.add_backend("shikra", broken, lazy=True)
    gateway = Gateway(pipeline, ServerSettings(lazy_backends=True))
    with pytest.raises(ComneckInputError) as info:  # start-up checks still run: a missing file is refused at once
        pipeline.add_backend("llava", tmp_path / "nowhere", lazy=True)
    assert info.value.code == "bad_settings"
    with TestClient(create_app(ServerSettings(lazy_backends=True), gateway)) as client:
        assert client.get("/readyz").json()["backends"] == {"clip-zero-shot": "lazy", "shikra": "lazy"}
        assert [b["state"] for b in client.get("/v1/models").json()["comneck"]["backends"]] == ["lazy", "lazy"]
        loads = []
        real_load = pipeline._load
        pipeline._load = lambda arg: (loads.append(arg.name), real_load(arg))[1]
        http = through(client)
        assert http.infer(encoded.data, PROMPT)["backend"] == "clip-zero-shot"  # the default, loaded now
        assert http.infer(encoded.data, PROMPT)["backend"] == "clip-zero-shot"
        assert loads == ["clip-zero-shot"]
        for _ in range(2):
            with pytest.raises(GatewayError) as refused:
                http.infer(encoded.data, "the cow", backend="shikra")
            assert (refused.value.status, refused.value.code) == (503, "load_failed")
            assert "backend shikra failed to load" in str(refused.value)
        assert loads == ["clip-zero-shot", "shikra"]  # tried once
        states = client.get("/readyz").json()["backends"]
        assert states["clip-zero-shot"] == "loaded" and states["shikra"].startswith("failed: ComneckInputError")
        assert http.infer(encoded.data, PROMPT)["text"]  # the others keep serving
