"""``comneck_edge.encode``: the codec is built once per process for each preset, weights and
settings; weights changed on disk are read again."""

from __future__ import annotations

import os

from comneck.checkpoints import save_state_dict
from comneck.image import sample_photo
from comneck.models import build_codec
from comneck_edge import EdgeEncoder
from comneck_edge import encoder as module


def test_encode_keeps_its_codec_and_reads_changed_weights_again(tiny, tmp_path, monkeypatch):
    module._kept_encoder.cache_clear()
    built = []
    monkeypatch.setattr(module, "build_codec", lambda *args: built.append(args) or build_codec(*args))
    weights = tmp_path / "codec.safetensors"
    save_state_dict(build_codec(tiny).model, weights)
    first = module.encode(sample_photo(), "tiny", codec_weights=weights)
    assert module.encode(sample_photo(), tiny, codec_weights=str(weights)) == first and len(built) == 1  # kept
    assert first == EdgeEncoder(tiny, codec_weights=weights).encode_file(sample_photo()).data  # what a fresh encoder writes
    module.encode(sample_photo(), "tiny", fixed_point=False)
    assert len(built) == 3  # other settings, another encoder (the fresh one above was the second)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed on disk
    module.encode(sample_photo(), "tiny", codec_weights=weights)
    assert len(built) == 4  # read again
    module._kept_encoder.cache_clear()
