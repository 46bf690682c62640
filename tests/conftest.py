"""Shared fixtures: tiny-preset models are built once per session (seeded, random weights)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from comneck.models import ComneckModels, build_cloud_models
from comneck.pipeline import Pipeline
from comneck.presets import PRESETS, Preset

# The backends' tiny checkpoint writers (tests/backends/checkpoints.py) serve the eval, batching and
# gateway tests too.
sys.path.insert(0, str(Path(__file__).resolve().parent / "backends"))
# A gateway starts one decode worker per core by default; tests that build many gateways start one
# (tests of the default say so themselves). Gateways started as subprocesses inherit this too.
os.environ.setdefault("COMNECK_DECODE_WORKERS", "1")


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
