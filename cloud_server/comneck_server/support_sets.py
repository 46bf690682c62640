"""Few-shot support sets a device registers once under a name and then names in its requests.

A set keeps what its backend made of each support image (:class:`~comneck.backends.SupportExample`:
V2L's words) and the labels, not the bitstreams: registering decodes them once, and a request
naming the set sends only its query. Sets live in the gateway's memory (a restart forgets them),
at most :data:`MAX_SETS` of them.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from comneck.backends import SupportExample
from comneck.errors import ComneckInputError, ErrorCode

MAX_SETS = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    """A set name: 1 to 64 letters, digits, ``_``, ``.`` or ``-``, starting with a letter or digit."""
    if not _NAME.fullmatch(name):
        raise ComneckInputError(f"support set name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                                "starting with a letter or digit", ErrorCode.BAD_SUPPORT)
    return name


@dataclass(frozen=True)
class SupportSet:
    """One registered set: the backend whose descriptions it holds, and its examples."""

    name: str
    backend: str
    examples: tuple[SupportExample, ...]

    def describe(self) -> dict[str, Any]:
        labels = [e.label for e in self.examples]
        return {"name": self.name, "backend": self.backend, "classes": sorted(set(labels)), "examples": len(labels)}


class SupportSets:
    """The registered sets by name; thread-safe."""

    def __init__(self, limit: int = MAX_SETS) -> None:
        self.limit = limit
        self._sets: dict[str, SupportSet] = {}
        self._lock = threading.Lock()

    def put(self, entry: SupportSet) -> bool:
        """Register ``entry`` (replacing a set of that name); True when it replaced one."""
        with self._lock:
            replaced = entry.name in self._sets
            if not replaced and len(self._sets) >= self.limit:
                raise ComneckInputError(f"{self.limit} support sets are registered, the most this gateway keeps: delete one first",
                                        ErrorCode.BAD_SUPPORT)
            self._sets[entry.name] = entry
            return replaced

    def get(self, name: str, backend: str) -> SupportSet:
        """The set ``name``, registered for ``backend``."""
        with self._lock:
            found = self._sets.get(name)
        if found is None or found.backend != backend:
            where = f" (it is {found.backend}'s)" if found is not None else ""
            raise ComneckInputError(f"no support set {name!r} is registered for backend {backend}{where}", ErrorCode.UNKNOWN_SUPPORT_SET)
        return found

    def delete(self, name: str) -> SupportSet:
        with self._lock:
            found = self._sets.pop(name, None)
        if found is None:
            raise ComneckInputError(f"no support set {name!r} is registered", ErrorCode.UNKNOWN_SUPPORT_SET)
        return found

    def all(self) -> list[SupportSet]:
        with self._lock:
            return sorted(self._sets.values(), key=lambda s: s.name)
