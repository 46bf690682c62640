import dataclasses
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from comneck.checkpoints import save_state_dict
from comneck.errors import ComneckInputError
from comneck.models import WeightFiles, build_cloud_models, build_codec
from comneck.weights_folder import FORMAT, MANIFEST, part_file, read_manifest, write_folder


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


def test_a_weights_folder_is_written_whole_and_replaced_only_when_forced(tiny_models, tmp_path):
    target = tmp_path / "weights"
    neck = {k: v for k, v in tiny_models.neck.state_dict().items() if k != "class_embedding"}
    manifest = write_folder(target, "tiny", {"codec": tiny_models.codec.model, "neck": neck}, {"rate": 2})
    assert manifest == {"format": FORMAT, "version": 1, "preset": "tiny", "parts": ["codec", "neck"], "rate": 2}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # readable by whoever the umask lets, like any folder
    assert read_manifest(target) == manifest and sorted(p.name for p in target.iterdir()) == ["codec.safetensors", MANIFEST, "neck.safetensors"]
    assert load_file(part_file(target, "neck")).keys() == neck.keys()
    for taken in (target, target / MANIFEST):  # a non-empty folder without force, a file always
        with pytest.raises(ComneckInputError) as info:
            write_folder(taken, "tiny", {"neck": neck}, {}, force=taken.is_file())
        assert info.value.code == "bad_output"
    assert write_folder(target, "tiny", {"neck": neck}, {}, force=True)["parts"] == ["neck"]
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "neck.safetensors"]  # nothing of the old folder stays
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]  # nor any staging folder
    with pytest.raises(ComneckInputError, match="holds no codec weights"):
        part_file(target, "codec")
