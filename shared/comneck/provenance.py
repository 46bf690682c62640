"""Where a network's weights came from and what they were trained for.

Kept apart from the importers that fill it in, so the codec (below the importers) can say
which rate its weights were trained at without importing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .presets import RATE_LAMBDAS

#: Printed with every output of seeded random weights, so no one mistakes it for a model's.
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (no checkpoint loaded): outputs show the data path works, not model quality"


@dataclass(frozen=True)
class WeightsInfo:
    """Where weights came from and what they were trained for (None: not known)."""

    layout: str  # comneck | release | elic-llm | compressai
    source: str
    scenario: str | None = None
    rate: int | None = None

    @property
    def lmbda(self) -> float | None:
        return RATE_LAMBDAS.get(self.rate) if self.rate else None
