"""The second learned codec of the section 4.5 ablation: CompressAI's mbt2018-mean through the codec
registry. It codes what CompressAI's own MeanScaleHyperprior codes, byte for byte; the zoo's
checkpoints load; its containers say which codec wrote them; necks train on it and serve beside
ELIC's over one CLIP."""

from __future__ import annotations

import json

import pytest
import torch
from compressai.models import MeanScaleHyperprior
from compressai.zoo.pretrained import load_pretrained

from comneck.bitstream import CODEC_IDS, Bitstream, BitstreamError
from comneck.convert import convert
from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck.models import build_codec
from comneck.pipeline import Pipeline
from comneck.presets import get_preset
from comneck_edge import EdgeEncoder

MBT = get_preset("tiny-mbt2018-mean")


def zoo_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A MeanScaleHyperprior state dict as the zoo stores it: every parameter random and non-zero,
    the entropy bottleneck's parameters under their pre-1.2 names (``_matrices.0``)."""
    torch.manual_seed(seed)
    net = MeanScaleHyperprior(MBT.codec.N, MBT.codec.M)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05 + 0.01)
    state = {}
    for key, value in net.state_dict().items():
        for new, old in (("matrices.", "_matrices."), ("biases.", "_biases."), ("factors.", "_factors.")):
            key = key.replace(f"entropy_bottleneck.{new}", f"entropy_bottleneck.{old}")
        state[key] = value
    return state


def reference(state: dict[str, torch.Tensor]) -> MeanScaleHyperprior:
    """The zoo's own loading path: CompressAI renames the keys, builds the model, rebuilds the tables."""
    net = MeanScaleHyperprior.from_state_dict(load_pretrained(state)).eval()
    net.update(force=True)
    return net


@pytest.fixture(scope="module")
def zoo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "mbt2018-mean-3-0123abcd.pth.tar"
    torch.save(zoo_state(), path)
    return path


def photo(preset) -> torch.Tensor:
    from comneck.image import load_image, pad_to_stride, resize_for_codec, to_tensor

    return pad_to_stride(to_tensor(resize_for_codec(load_image(sample_photo()), "paper", preset.image_size)))[0]


def test_a_zoo_checkpoint_codes_what_compressais_mean_scale_hyperprior_codes(zoo_file):
    codec = build_codec(MBT, zoo_file)
    ref = reference(torch.load(zoo_file))
    x = photo(MBT)
    latents, y_hat = codec.analyze(x, fixed_point=False)  # CompressAI's float path: its own bitstreams
    with torch.no_grad():
        out = ref.compress(x)
        x_ref = ref.decompress(out["strings"], out["shape"])["x_hat"]
    assert latents.strings == out["strings"] and codec.num_streams == len(out["strings"]) == 2
    assert codec.weights_info.layout == "compressai-zoo"
    decoded = codec.entropy_decode(latents)
    assert torch.equal(decoded, y_hat)
    assert torch.equal(codec.synthesize(decoded), x_ref)
    h, w = latents.padded_size
    assert codec.stream_symbols(latents.padded_size) == [MBT.codec.M * (h // 16) * (w // 16), MBT.codec.N * (h // 64) * (w // 64)]


def test_fixed_point_containers_round_trip_bit_exactly_and_name_the_codec(zoo_file):
    codec = build_codec(MBT, zoo_file)
    encoded = EdgeEncoder(MBT, codec_weights=zoo_file).encode_file(sample_photo())
    stream = Bitstream.from_bytes(encoded.data)
    assert stream.codec == "mbt2018-mean" and encoded.data[5] & 0x3F == CODEC_IDS["mbt2018-mean"] == 3
    assert stream.latents.fixed_point
    _, y_edge = codec.analyze(photo(MBT))
    assert torch.equal(codec.entropy_decode(stream.latents), y_edge)
    elic = Pipeline.from_pretrained(preset="tiny")
    with pytest.raises(BitstreamError, match="coded with mbt2018-mean; this decoder runs elic2022-chandelier"):
        elic.answer([encoded.data], ["Labels: cow, horse"])


def test_weights_of_one_codec_are_refused_by_a_preset_of_the_other_in_one_line(zoo_file, tiny):
    with pytest.raises(ComneckInputError, match=r"codec weights are mbt2018-mean, preset 'tiny' runs elic2022-chandelier; "
                                                r"use a preset for those weights \(paper-mbt2018-mean, tiny-mbt2018-mean\)"):
        build_codec(tiny, zoo_file)
    with pytest.raises(ValueError, match=r"mbt2018-mean has no channel groups: groups must be \(40,\)"):
        type(MBT.codec)(arch="mbt2018-mean", N=32, M=40)


def test_convert_writes_a_weights_folder_that_records_the_codec(zoo_file, tmp_path):
    manifest = convert(zoo_file, tmp_path / "w", MBT)
    assert (manifest["codec_arch"], manifest["preset"], manifest["layout"]) == ("mbt2018-mean", "tiny-mbt2018-mean", "compressai-zoo")
    again = build_codec(MBT, tmp_path / "w")
    x = photo(MBT)
    assert again.analyze(x)[0].strings == build_codec(MBT, zoo_file).analyze(x)[0].strings


def test_a_neck_trained_on_the_second_codec_serves_beside_elics_over_one_clip(tmp_path):
    """d2 on mbt2018-mean: codec and neck train, the export records the codec, and an ELIC run's
    pipeline takes it as another rate point sharing its CLIP (the eval's codec ablation)."""
    from PIL import Image

    from comneck.train.config import load_config
    from comneck.train.trainer import Trainer

    data = tmp_path / "data"
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (72, 80), colour).save(data / name / f"{i}.png")
    config = load_config(None, [f"data.root={data}", f"output={tmp_path / 'run'}", "batch_size=2", "preset=tiny-mbt2018-mean",
                                "scenario=d2", "stages.0.epochs=0", "stages.1.epochs=1", "stages.2.epochs=0"])
    trainer = Trainer(config)
    before = {k: v.clone() for k, v in trainer.student.codec.model.g_a.state_dict().items()}
    trainer.run()
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.codec.model.g_a.state_dict().items())
    export = tmp_path / "run" / "export"
    manifest = json.loads((export / "comneck.json").read_text())
    assert (manifest["codec_arch"], manifest["preset"], manifest["scenario"]) == ("mbt2018-mean", "tiny-mbt2018-mean", "d2")
    served = Pipeline.from_pretrained(export, preset="tiny-mbt2018-mean")
    encoded = EdgeEncoder(MBT, codec_weights=export).encode_file(sample_photo())
    alone = served.answer([encoded.data], ["Labels: cow, horse"], task="classify")[0]
    beside = Pipeline.from_pretrained(preset="tiny").with_models(served.models)
    assert beside.models.codec.config.arch == "mbt2018-mean"
    assert beside.answer([encoded.data], ["Labels: cow, horse"], task="classify")[0].details == alone.details
    with pytest.raises(ComneckInputError, match="whose CLIP or image size is not this pipeline's"):
        Pipeline.from_pretrained(preset="tiny-336").with_models(served.models)
