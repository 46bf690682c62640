"""What every registered backend promises, checked for each one at tiny size: random weights, or
a tiny checkpoint in its published layout for backends that load published weights only. A
few-shot backend answers in an episode the two bitstreams make as labelled support."""

import pytest
from checkpoints import write_honeybee, write_llama_adapter, write_llava, write_shikra, write_v2l

from comneck.backends import BACKENDS, GenerationOptions
from comneck.errors import ComneckInputError
from comneck.image import sample_photo
from comneck.pipeline import PROMPTLESS_TASKS, Pipeline
from comneck_edge import EdgeEncoder

TOO_LONG = "x" * 100_000  # longer than any backend's prompt may be


@pytest.fixture(scope="module")
def bitstreams(tiny):
    encoder = EdgeEncoder(tiny)
    return [encoder.encode_file(p).data for p in sorted(sample_photo().parent.glob("*.png"))[:2]]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, tiny):
    """Weights for the backends that have no random build."""
    from comneck.backends.llama_adapter import write_converted

    adapter = write_llama_adapter(tmp_path_factory.mktemp("llama-adapter"), tiny.clip.model_cfg["embed_dim"])
    converted = tmp_path_factory.mktemp("llama-adapter-converted")
    write_converted(adapter.adapter, adapter.llama, converted)
    v2l = write_v2l(tmp_path_factory.mktemp("v2l"), tiny.clip.model_cfg["embed_dim"])
    return {"shikra": (write_shikra(tmp_path_factory.mktemp("shikra")).merged, {}),
            "honeybee": (write_honeybee(tmp_path_factory.mktemp("honeybee"), tokenizer_inside=True).checkpoint, {}),
            "llava": (write_llava(tmp_path_factory.mktemp("llava")), {}),
            "llama-adapter-v1": (converted, {}),
            "v2l": (v2l.codebooks, {"llama": str(v2l.llama)})}


@pytest.fixture(params=sorted(BACKENDS))
def loaded(request, tiny_models, tiny_checkpoints):
    spec = BACKENDS[request.param]
    pipeline = Pipeline(tiny_models)
    pipeline.add_backend(request.param, *((None, {}) if spec.random_init else tiny_checkpoints[request.param]))
    return pipeline, spec


def support(pipeline, spec, bitstreams):
    """The two bitstreams as labelled support, for a few-shot backend (None for the others)."""
    return pipeline.support(bitstreams, ["cow", "dog"]) if spec.tasks[0] == "fewshot" else None


def test_it_loads_at_tiny_size_and_answers_a_batch_of_two(loaded, bitstreams):
    pipeline, spec = loaded
    assert spec.tasks and spec.target.count(":") == 1 and (spec.example_prompt or spec.tasks[0] in PROMPTLESS_TASKS)
    answers = pipeline.answer(bitstreams, [spec.example_prompt] * 2, options=GenerationOptions(max_new_tokens=4),
                              support=support(pipeline, spec, bitstreams))
    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer.text, str) and answer.text and answer.backend == spec.name and answer.task == spec.tasks[0]


def test_it_reports_random_weights(loaded, bitstreams):
    pipeline, spec = loaded
    assert pipeline.backends[spec.name].random_weights == spec.random_init  # built at random, or read from files
    (answer,) = pipeline.answer(bitstreams[:1], [spec.example_prompt], options=GenerationOptions(max_new_tokens=4),
                                support=support(pipeline, spec, bitstreams))
    assert answer.random_weights and "RANDOM WEIGHTS" in answer.note


def test_it_refuses_a_bad_prompt_with_its_code_before_decoding(loaded, bitstreams, monkeypatch):
    pipeline, spec = loaded
    monkeypatch.setattr(pipeline, "decode", lambda streams: pytest.fail("decoded a refused request"))
    with pytest.raises(ComneckInputError) as info:
        pipeline.answer(bitstreams, [spec.example_prompt, TOO_LONG], support=support(pipeline, spec, bitstreams))
    assert info.value.code in ("bad_prompt", "prompt_too_long")
