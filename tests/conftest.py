"""Shared fixtures: tiny-preset models are built once per session (seeded, random weights)."""

from __future__ import annotations

import pytest

from comneck.models import ComneckModels, build_cloud_models
from comneck.pipeline import Pipeline
from comneck.presets import PRESETS, Preset


@pytest.fixture(scope="session")
def tiny() -> Preset:
    return PRESETS["tiny"]


@pytest.fixture(scope="session")
def tiny_models(tiny: Preset) -> ComneckModels:
    return build_cloud_models(tiny)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models: ComneckModels) -> Pipeline:
    pipeline = Pipeline(tiny_models)
    pipeline.add_backend("clip-zero-shot")
    return pipeline
