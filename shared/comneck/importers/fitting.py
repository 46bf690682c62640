"""Load a mapped state dict into a network, refusing with every bad key listed.

``load_state_dict(strict=True)`` stops at a wall of text; here missing, unexpected and
mis-shaped keys are each listed (the first few, then a count) on one line, with code
``bad_weights``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ComneckInputError, ErrorCode

SHOWN = 6


def listing(items: list[str]) -> str:
    """The first few items, then how many more: long key lists stay one readable line."""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{', '.join(items[:SHOWN])}{more}"


def key_problems(target: dict[str, torch.Tensor], state: dict[str, torch.Tensor], derived: Callable[[str], bool]) -> list[str]:
    """Human-readable lists of missing, unexpected and mis-shaped keys; empty when ``state`` fits."""
    missing = [k for k in target if k not in state and not derived(k)]
    unexpected = [k for k in state if k not in target]
    misshaped = [
        f"{k} {list(state[k].shape)} vs {list(target[k].shape)}"
        for k in state
        if k in target and not derived(k) and state[k].shape != target[k].shape
    ]
    return [f"{label} ({len(items)}): {listing(items)}" for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped, file vs model", misshaped)) if items]


def fit(module: nn.Module, state: dict[str, torch.Tensor], what: str, derived: Callable[[str], bool] = lambda key: False) -> None:
    """Copy ``state`` into ``module``; keys for which ``derived`` is true are rebuilt by the
    caller (entropy-coding tables, masks), so they may be absent and are never copied."""
    target = module.state_dict()
    problems = key_problems(target, state, derived)
    if problems:
        raise ComneckInputError(f"{what} weights do not fit: {'; '.join(problems)}", ErrorCode.BAD_WEIGHTS)
    # derived entries keep the module's own values (CompressAI's loader insists they be present)
    module.load_state_dict({k: (target[k] if derived(k) else state[k]) for k in target})
