"""Run configurations as YAML files with ``--set key.path=value`` overrides, validated by a pydantic
model: what ``comneck-train`` and ``comneck-eval`` read. A refusal is one line naming the key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from .errors import ComneckInputError, ErrorCode
from .presets import PRESETS, RATE_LAMBDAS

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _rate(rate: int) -> int:
    if rate not in RATE_LAMBDAS:
        raise ValueError("rate index must be 1..4")
    return rate


def _preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset; choose one of {', '.join(PRESETS)}")
    return name


#: A config's rate index (1..4, lambda 0.004..0.032) and preset name, checked as they are read.
RateIndex = Annotated[int, AfterValidator(_rate)]
PresetName = Annotated[str, AfterValidator(_preset)]


def set_path(tree: dict[str, Any], dotted: str, value: Any, list_defaults: Mapping[str, Callable[[], list[Any]]] = {}) -> None:
    """Set ``a.b.0.c`` in nested mappings and lists (a number indexes a list, e.g. ``stages.0.epochs``);
    a list named in ``list_defaults`` that the tree lacks starts as its defaults."""
    head = dotted.split(".")[0]
    if head in list_defaults and head not in tree and "." in dotted:
        tree[head] = list_defaults[head]()
    keys = dotted.split(".")
    node: Any = tree
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ComneckInputError(f"--set {dotted}: {key} is not an index of a {len(node)}-item list", ErrorCode.BAD_CONFIG)
            slot: Any = int(key)
        elif isinstance(node, dict):
            slot = key
            if not last:
                node.setdefault(key, {})
        else:
            raise ComneckInputError(f"--set {dotted}: {keys[depth - 1]} is a value, not a section", ErrorCode.BAD_CONFIG)
        if last:
            node[slot] = value
        else:
            node = node[slot]


def load_yaml_config(model: type[ConfigT], path: str | Path | None, overrides: list[str] = (),  # type: ignore[assignment]
                     list_defaults: Mapping[str, Callable[[], list[Any]]] = {}) -> ConfigT:
    """Read ``path`` (YAML), apply ``key.path=value`` overrides (values parsed as YAML), validate as ``model``."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ComneckInputError(f"cannot read config {path}: {exc.strerror}", ErrorCode.BAD_CONFIG) from None
        except yaml.YAMLError as exc:
            raise ComneckInputError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}", ErrorCode.BAD_CONFIG) from None
        if not isinstance(tree, dict):
            raise ComneckInputError(f"config {path} must be a mapping of settings", ErrorCode.BAD_CONFIG)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ComneckInputError(f"--set wants KEY=VALUE, got {item!r}", ErrorCode.BAD_CONFIG)
        set_path(tree, key.strip(), yaml.safe_load(value) if value else value, list_defaults)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ComneckInputError(f"config {where}: {first['msg']}", ErrorCode.BAD_CONFIG) from None
