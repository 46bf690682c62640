"""CLIP importers: every published layout lands in open_clip's CLIP with the same outputs,
and files that do not fit are refused with the bad keys named.

transformers' own CLIP is the reference for the Hugging Face layout: a tiny CLIPModel with
random weights must give the same image / text features and block outputs as the open_clip
model the file was imported into.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the reference for the Hugging Face layout (in the dev extra)
from safetensors.torch import save_file
from torch import nn

from comneck.clip_split import ClipSplit, build_clip
from comneck.errors import ComneckInputError
from comneck.importers.clip import ImportedClip, clip_from_state, load_clip, read_clip
from comneck.importers.reading import read_weights
from comneck.presets import PRESETS


TINY = PRESETS["tiny"].clip
SOT, EOT = 49406, 49407  # CLIP's tokenizer: start / end of text; EOT is the highest id


def tiny_clip(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_clip(TINY).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(7))


def tokens() -> torch.Tensor:
    """Two token rows as CLIP's tokenizer writes them: SOT, words, EOT, zero padding."""
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(2, 77, dtype=torch.long)
    for row, length in enumerate((5, 20)):
        ids[row, 0] = SOT
        ids[row, 1 : length + 1] = torch.randint(1, SOT, (length,), generator=g)
        ids[row, length + 1] = EOT
    return ids


def perturbed(model: nn.Module, seed: int) -> nn.Module:
    """Add noise to every weight, so layer norms (ones / zeros at init) and biases are told
    apart and a swapped mapping shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def assert_near(ours: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= atol


def refused(match: str):
    return pytest.raises(ComneckInputError, match=match)


# ---------------------------------------------------------------- open_clip / OpenAI layout


@pytest.fixture(scope="module")
def source_clip() -> nn.Module:
    return perturbed(tiny_clip(1), 11)


@pytest.mark.parametrize("form", ["safetensors", "ddp-checkpoint"])
def test_open_clip_layout_round_trip_is_exact(source_clip, tmp_path, form):
    state = {f"module.{k}": v for k, v in source_clip.state_dict().items()}
    if form == "safetensors":
        path = tmp_path / "clip.safetensors"
        save_file(state, str(path))
    else:  # an open_clip training checkpoint: the state under "state_dict", beside other entries
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "run", "state_dict": state}, path)
    imported = read_clip(path)
    assert imported.layout == "open_clip" and imported.missing_parts == ()
    target = tiny_clip(2)
    load_clip(target, imported)
    x, ids = images(), tokens()
    with torch.no_grad():
        assert torch.equal(target.encode_image(x), source_clip.encode_image(x))
        assert torch.equal(target.encode_text(ids), source_clip.encode_text(ids))
    assert torch.equal(target.logit_scale, source_clip.logit_scale)


class _Holder(nn.Module):
    """A module TorchScript can compile; the tensors it holds are all that matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchscript_archive(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A scripted module whose state dict is ``state``: nested modules along the dotted names."""
    root = _Holder()
    for key, tensor in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(name, tensor)
    return torch.jit.script(root)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_openai_torchscript_archive_fp16(source_clip, tmp_path):
    half = {k: v.half() for k, v in source_clip.state_dict().items()}
    scalars = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}
    scalars = {k: torch.tensor(v) for k, v in scalars.items()}  # OpenAI's archive keeps these too
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torchscript_archive({**half, **scalars}), str(path))

    stored = read_weights(path, "CLIP")
    assert stored.keys() == half.keys() | scalars.keys()
    assert all(torch.equal(stored[k], v) and stored[k].dtype == torch.float16 for k, v in half.items())

    imported = read_clip(path)
    assert imported.layout == "openai-torchscript" and imported.missing_parts == ()
    assert not scalars.keys() & imported.state.keys()
    target = tiny_clip(2)
    load_clip(target, imported)
    reference = tiny_clip(2)
    reference.load_state_dict({k: v.float() for k, v in half.items()})  # the source through fp16 and back
    x = images()
    with torch.no_grad():
        assert torch.equal(target.encode_image(x), reference.encode_image(x))
        assert_near(target.encode_image(x), source_clip.encode_image(x), atol=5e-3)  # fp16 rounding only


# ---------------------------------------------------------------- Hugging Face layout


def hf_config(eos_token_id: int = EOT):
    """transformers' CLIPConfig of the tiny preset's CLIP (QuickGELU, as OpenAI's weights)."""
    return transformers.CLIPConfig(
        text_config=dict(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256,
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=eos_token_id,
        ),
        vision_config=dict(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=256,
            patch_size=14, image_size=224, hidden_act="quick_gelu",
        ),
        projection_dim=32,
    )


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(5)
    return perturbed(transformers.CLIPModel(hf_config()), 12).eval()


@pytest.fixture(scope="module")
def imported_hf(hf_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model.safetensors"
    save_file(hf_clip.state_dict(), str(path))
    imported = read_clip(path)
    clip = tiny_clip(2)
    load_clip(clip, imported)
    return imported, clip


def pooled(out) -> torch.Tensor:
    """transformers 5's get_*_features return a model output; older ones a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hf_clip_image_features_equal_transformers(hf_clip, imported_hf):
    imported, clip = imported_hf
    assert imported.layout == "hf-clip" and imported.missing_parts == ()
    x = images()
    with torch.no_grad():
        ref = pooled(hf_clip.get_image_features(pixel_values=x))
        feats = ClipSplit(clip.visual, 2)(x)
        assert_near(feats.embedding, ref)
        assert torch.equal(feats.embedding, clip.encode_image(x))


def test_hf_clip_block_outputs_equal_transformers_hidden_states(hf_clip, imported_hf):
    _, clip = imported_hf
    x = images(1)
    split = ClipSplit(clip.visual, 0)
    with torch.no_grad():
        ref = hf_clip.vision_model(pixel_values=x, output_hidden_states=True)
        head = split.head(x)
        feats = split.tail(head, hidden_blocks=range(1, 5))
    # transformers' hidden_states[0] is the encoder input (embeddings after pre_layrnorm),
    # hidden_states[j] the output of layer j: the same numbering as ClipFeatures.hidden.
    assert len(ref.hidden_states) == 5
    assert_near(head, ref.hidden_states[0])
    for j in range(1, 5):
        assert_near(feats.hidden[j], ref.hidden_states[j])
    assert_near(feats.post_ln[:, 0], ref.pooler_output)  # post_layernorm of the class token


@pytest.mark.parametrize("eos_token_id", [EOT, 2])  # 2: the legacy config of openai/clip-vit-*
def test_hf_clip_text_features_and_logit_scale_equal_transformers(hf_clip, imported_hf, eos_token_id):
    _, clip = imported_hf
    ids = tokens()
    hf_clip.text_model.eos_token_id = eos_token_id  # 2 pools at argmax(ids), else at the first EOT
    try:
        with torch.no_grad():
            ref = pooled(hf_clip.get_text_features(input_ids=ids))
            ours = clip.encode_text(ids)
    finally:
        hf_clip.text_model.eos_token_id = EOT
    assert_near(ours, ref)
    assert torch.equal(clip.logit_scale.detach(), hf_clip.logit_scale.detach())


@pytest.mark.parametrize("form", ["transformers-5", "transformers-4"])
def test_hf_vision_only_file_keeps_text_tower_and_projection(hf_clip, tmp_path, form):
    torch.manual_seed(6)
    vision = transformers.CLIPVisionModel(hf_config().vision_config)
    vision.load_state_dict(hf_clip.vision_model.state_dict())
    state = vision.state_dict()
    if form == "transformers-4":  # 4.x wrapped the tower as .vision_model and saved position_ids
        state = {f"vision_model.{k}": v for k, v in state.items()}
        state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    path = tmp_path / "vision.safetensors"
    save_file(state, str(path))

    imported = read_clip(path)
    assert imported.layout == "hf-vision"
    assert imported.missing_parts == ("visual projection", "text tower")
    clip = tiny_clip(2)
    kept = [k for k in clip.state_dict() if not k.startswith("visual.") or k == "visual.proj"]
    untouched = {k: clip.state_dict()[k].clone() for k in kept}
    load_clip(clip, imported)
    after = clip.state_dict()
    assert all(torch.equal(after[k], v) for k, v in untouched.items())

    x = images(1)
    split = ClipSplit(clip.visual, 2)
    with torch.no_grad():
        ref = hf_clip.vision_model(pixel_values=x, output_hidden_states=True)
        feats = split.tail(split.head(x), hidden_blocks=[3, 4])
    assert_near(feats.hidden[3], ref.hidden_states[3])
    assert_near(feats.hidden[4], ref.hidden_states[4])


def test_hf_vision_with_projection_lacks_only_the_text_tower(hf_clip):
    state = {k: v for k, v in hf_clip.state_dict().items() if k.startswith("vision_model.")}
    state["visual_projection.weight"] = hf_clip.visual_projection.weight.detach()
    imported = clip_from_state(state)
    assert imported.layout == "hf-vision" and imported.missing_parts == ("text tower",)
    assert torch.equal(imported.state["visual.proj"], hf_clip.visual_projection.weight.detach().t())


def test_paper_size_hf_vision_state_fits_vit_l14():
    """A ViT-L/14 CLIPVisionModelWithProjection state dict (constant tensors, no real weights)
    maps onto the paper preset's CLIP: names, shapes, the q/k/v packing and the transpose."""
    width, layers, embed = 1024, 24, 768
    shapes = {
        "embeddings.class_embedding": (width,),
        "embeddings.patch_embedding.weight": (width, 3, 14, 14),
        "embeddings.position_embedding.weight": (257, width),
        "pre_layrnorm.weight": (width,), "pre_layrnorm.bias": (width,),
        "post_layernorm.weight": (width,), "post_layernorm.bias": (width,),
    }
    for i in range(layers):
        for name, shape in {
            "self_attn.q_proj": (width, width), "self_attn.k_proj": (width, width), "self_attn.v_proj": (width, width),
            "self_attn.out_proj": (width, width), "mlp.fc1": (4 * width, width), "mlp.fc2": (width, 4 * width),
            "layer_norm1": (width,), "layer_norm2": (width,),
        }.items():
            shapes[f"encoder.layers.{i}.{name}.weight"] = shape
            shapes[f"encoder.layers.{i}.{name}.bias"] = shape[:1]
    shapes = {f"vision_model.{k}": v for k, v in shapes.items()}
    shapes["visual_projection.weight"] = (embed, width)
    # Each tensor one value broadcast to its shape (no memory); the value tells it apart.
    state = {k: torch.tensor(float(n)).expand(shape) for n, (k, shape) in enumerate(shapes.items())}
    value = {k: float(n) for n, k in enumerate(shapes)}

    imported = clip_from_state(state)
    assert imported.missing_parts == ("text tower",)
    torch.manual_seed(0)
    clip = build_clip(PRESETS["paper"].clip)
    load_clip(clip, imported)
    block = clip.visual.transformer.resblocks[23]
    packed = block.attn.in_proj_weight
    assert packed.shape == (3 * width, width)
    for rows, proj in zip((slice(0, width), slice(width, 2 * width), slice(2 * width, None)), "qkv"):
        assert torch.all(packed[rows] == value[f"vision_model.encoder.layers.23.self_attn.{proj}_proj.weight"])
    assert torch.all(block.mlp.c_proj.weight == value["vision_model.encoder.layers.23.mlp.fc2.weight"])
    assert clip.visual.proj.shape == (width, embed)
    assert torch.all(clip.visual.proj == value["visual_projection.weight"])
    assert torch.all(clip.visual.ln_pre.bias == value["vision_model.pre_layrnorm.bias"])


# ---------------------------------------------------------------- refusals


def open_clip_state() -> dict[str, torch.Tensor]:
    return dict(tiny_clip(1).state_dict())


def test_unknown_keys_are_refused_by_name():
    state = open_clip_state()
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(64)  # layer scale: not in this CLIP
    with refused(r"no known CLIP layout \(1\): visual.transformer.resblocks.0.ls_1.gamma") as err:
        clip_from_state(state)
    assert err.value.code == "bad_weights" and "\n" not in str(err.value)


def test_unknown_hf_key_is_refused_by_name(hf_clip):
    state = dict(hf_clip.state_dict())
    state["classifier.weight"] = torch.zeros(10, 64)  # CLIPForImageClassification's head
    with refused(r"no known CLIP layout \(1\): classifier.weight") as err:
        clip_from_state(state)
    assert err.value.code == "bad_weights"


def test_missing_resblock_key_is_refused_by_name(tmp_path):
    state = open_clip_state()
    del state["visual.transformer.resblocks.1.mlp.c_fc.weight"]
    path = tmp_path / "clip.safetensors"
    save_file(state, str(path))
    imported = read_clip(path)
    assert imported.missing_parts == ()  # the vision tower is there, only one key is not
    with refused(r"missing \(1\): visual.transformer.resblocks.1.mlp.c_fc.weight") as err:
        load_clip(tiny_clip(2), imported)
    assert err.value.code == "bad_weights"


def test_half_an_attention_projection_is_refused_by_name(hf_clip):
    state = dict(hf_clip.state_dict())
    del state["vision_model.encoder.layers.2.self_attn.k_proj.weight"]
    with refused(r"attention projections missing \(1\): vision_model.encoder.layers.2.self_attn.k_proj.weight") as err:
        clip_from_state(state)
    assert err.value.code == "bad_weights"


def test_other_architecture_is_refused_with_mis_shaped_keys():
    """ViT-B/32-like weights (patch 32: 7x7 grid) into the tiny ViT-/14."""
    b32 = {**TINY.model_cfg, "vision_cfg": {**TINY.model_cfg["vision_cfg"], "patch_size": 32}}
    torch.manual_seed(0)
    other = build_clip(type(TINY)("tiny-ViT-32", b32))
    imported = clip_from_state(dict(other.state_dict()))
    with refused("mis-shaped") as err:
        load_clip(tiny_clip(2), imported)
    message = str(err.value)
    assert err.value.code == "bad_weights"
    assert "visual.conv1.weight [64, 3, 32, 32] vs [64, 3, 14, 14]" in message
    assert "visual.positional_embedding [50, 64] vs [257, 64]" in message


def test_file_without_clip_keys_is_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.bias": torch.zeros(10)}, str(path))
    with refused(r"holds no CLIP keys of any known layout \(it holds conv1.weight, fc.bias\)") as err:
        read_clip(path)
    assert err.value.code == "bad_weights"


def test_text_tower_alone_is_refused(hf_clip):
    state = {k: v for k, v in hf_clip.state_dict().items() if k.startswith("text_model.")}
    with refused("holds no CLIP vision tower") as err:
        clip_from_state(state)
    assert err.value.code == "bad_weights"


@pytest.mark.parametrize("content", [b"", "empty-dict"])
def test_empty_files_are_refused(tmp_path, content):
    path = tmp_path / "clip.pt"
    if content == "empty-dict":
        torch.save({}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ComneckInputError) as err:
        read_clip(path)
    assert err.value.code == "bad_weights" and str(path) in str(err.value)
    with refused("holds no tensors"):
        clip_from_state({})


UNPICKLED: list[str] = []


class Payload:
    """Stands for code hidden in a pickle: unpickling it calls ``__setstate__``."""

    def __init__(self) -> None:
        self.note = "boom"

    def __setstate__(self, state: dict) -> None:
        UNPICKLED.append("ran")
        self.__dict__.update(state)


def test_pickled_object_is_refused_without_unpickling_it(tmp_path):
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {**open_clip_state(), "extra": Payload()}}, path)
    with refused("never unpickles") as err:
        read_clip(path)
    assert err.value.code == "bad_weights"
    assert UNPICKLED == []


def test_layout_hint_must_agree_with_keys(hf_clip):
    state = dict(hf_clip.state_dict())
    with refused("hf-clip layout, not open_clip"):
        clip_from_state(state, layout_hint="open_clip")
    imported = clip_from_state(open_clip_state(), layout_hint="openai-torchscript")
    assert isinstance(imported, ImportedClip) and imported.layout == "openai-torchscript"


def test_convert_hf_clip_and_vision_only_files_into_folders_the_models_load(hf_clip, tmp_path):
    from comneck.cli import main
    from comneck.models import WeightFiles, build_cloud_models

    save_file(hf_clip.state_dict(), str(tmp_path / "model.safetensors"))
    assert main(["convert", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "clip"), "--preset", "tiny"]) == 0
    manifest = json.loads((tmp_path / "clip" / "comneck.json").read_text())
    assert (manifest["parts"], manifest["layout"], manifest["clip_missing_parts"]) == (["clip"], "hf-clip", [])
    models = build_cloud_models(PRESETS["tiny"], WeightFiles.bundle(tmp_path / "clip"))
    assert models.random_parts == ("codec", "neck")
    x = images(1)
    with torch.no_grad():
        assert_near(models.clip_model.encode_image(x), pooled(hf_clip.get_image_features(pixel_values=x)))

    vision = {k: v for k, v in hf_clip.state_dict().items() if k.startswith("vision_model.")}
    save_file(vision, str(tmp_path / "vision.safetensors"))
    assert main(["convert", str(tmp_path / "vision.safetensors"), "-o", str(tmp_path / "vision"), "--preset", "tiny"]) == 0
    assert json.loads((tmp_path / "vision" / "comneck.json").read_text())["clip_missing_parts"] == ["visual projection", "text tower"]
    models = build_cloud_models(PRESETS["tiny"], WeightFiles(clip=tmp_path / "vision"))
    assert models.random_parts == ("codec", "neck", "clip visual projection", "clip text tower")
    assert "clip visual projection" in models.note and models.random_weights
