"""Few-shot support sets a device registers once under a name and then names in its requests.

A set keeps what its backend made of each support image (:class:`~comneck.backends.SupportExample`:
V2L's words) and the labels, not the bitstreams: registering decodes them once, and a request
naming the set sends only its query. At most :data:`MAX_SETS` sets live in a :class:`SupportStore`:
this process's memory (:class:`MemorySupportSets`; a restart forgets them) or Redis, which every
gateway replica naming the same URL shares (:mod:`.support_redis`); ``--support-store`` chooses.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
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


class SupportStore(ABC):
    """The registered sets by name, at most ``limit`` of them; thread-safe. Subclasses keep them
    (:meth:`_find`, :meth:`_put`, :meth:`_pop`); the refusals are the same for every store."""

    limit: int

    @abstractmethod
    def _find(self, name: str) -> SupportSet | None:
        """The set ``name``, or None."""

    @abstractmethod
    def _put(self, entry: SupportSet) -> bool | None:
        """Keep ``entry`` unless the store is full and holds no set of its name, in one atomic step:
        True when it replaced one, False when it added one, None when it is full."""

    @abstractmethod
    def _pop(self, name: str) -> SupportSet | None:
        """Forget the set ``name`` and return it, or None if there is none."""

    @abstractmethod
    def all(self) -> list[SupportSet]:
        """Every set, by name."""

    @abstractmethod
    def state(self) -> str:
        """What /readyz reports: the kind of store and whether it can be reached."""

    def put(self, entry: SupportSet) -> bool:
        """Register ``entry`` (replacing a set of that name); True when it replaced one."""
        replaced = self._put(entry)
        if replaced is None:
            raise ComneckInputError(f"{self.limit} support sets are registered, the most this gateway keeps: delete one first",
                                    ErrorCode.BAD_SUPPORT)
        return replaced

    def get(self, name: str, backend: str) -> SupportSet:
        """The set ``name``, registered for ``backend``."""
        found = self._find(name)
        if found is None or found.backend != backend:
            where = f" (it is {found.backend}'s)" if found is not None else ""
            raise ComneckInputError(f"no support set {name!r} is registered for backend {backend}{where}", ErrorCode.UNKNOWN_SUPPORT_SET)
        return found

    def delete(self, name: str) -> SupportSet:
        """Forget the set ``name``; the set it forgot."""
        found = self._pop(name)
        if found is None:
            raise ComneckInputError(f"no support set {name!r} is registered", ErrorCode.UNKNOWN_SUPPORT_SET)
        return found


class MemorySupportSets(SupportStore):
    """Sets in this process's memory: one gateway's own, gone when it stops."""

    def __init__(self, limit: int = MAX_SETS) -> None:
        self.limit = limit
        self._sets: dict[str, SupportSet] = {}
        self._lock = threading.Lock()

    def _find(self, name: str) -> SupportSet | None:
        with self._lock:
            return self._sets.get(name)

    def _put(self, entry: SupportSet) -> bool | None:
        with self._lock:
            replaced = entry.name in self._sets
            if not replaced and len(self._sets) >= self.limit:
                return None
            self._sets[entry.name] = entry
            return replaced

    def _pop(self, name: str) -> SupportSet | None:
        with self._lock:
            return self._sets.pop(name, None)

    def all(self) -> list[SupportSet]:
        with self._lock:
            return sorted(self._sets.values(), key=lambda s: s.name)

    def state(self) -> str:
        return "memory"


def open_store(setting: str) -> SupportStore:
    """The store ``--support-store`` names: ``memory``, or a ``redis://`` URL."""
    if setting == "memory":
        return MemorySupportSets()
    from .support_redis import RedisSupportSets  # here: only a Redis store needs the redis client

    return RedisSupportSets(setting)
