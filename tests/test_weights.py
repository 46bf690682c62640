import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from comneck.checkpoints import save_state_dict
from comneck.errors import ComneckInputError
from comneck.models import WeightFiles, build_cloud_models, build_codec


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory, tiny):
    """Weight files from a differently seeded build: loading them must change every network."""
    other = build_cloud_models(dataclasses.replace(tiny, seed=7))
    folder = tmp_path_factory.mktemp("weights")
    files = WeightFiles(folder / "codec.safetensors", folder / "neck.safetensors", folder / "clip.safetensors")
    save_state_dict(other.codec.model, files.codec)
    save_state_dict(other.neck, files.neck)
    save_state_dict(other.clip_model, files.clip)
    return other, files


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weight_files_load_into_every_network(tiny, tiny_models, other_weights):
    other, files = other_weights
    loaded = build_cloud_models(tiny, files)
    assert loaded.random_parts == () and not loaded.random_weights
    assert "trained weights" in loaded.note
    for part in ("neck", "clip_model"):
        assert same_weights(getattr(loaded, part), getattr(other, part))
        assert not same_weights(getattr(loaded, part), getattr(tiny_models, part))
    assert loaded.codec_fingerprint == other.codec_fingerprint != tiny_models.codec_fingerprint


def test_random_parts_are_named(tiny, other_weights):
    _, files = other_weights
    models = build_cloud_models(tiny, WeightFiles(neck=files.neck))
    assert models.random_parts == ("codec", "clip")
    assert "RANDOM WEIGHTS" in models.note and "codec, clip" in models.note


def test_unusable_weight_files_get_one_line_errors(tiny, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"proj": torch.zeros(2, 2)}, str(wrong))
    for path in (tmp_path / "missing.safetensors", junk, wrong):
        with pytest.raises(ComneckInputError) as info:
            build_codec(tiny, path)
        assert info.value.code == "bad_weights" and "\n" not in str(info.value)
