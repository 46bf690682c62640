"""Support sets in Redis, shared by every gateway replica that names the same ``redis://`` URL.

Every set is one field of a single hash, :data:`KEY` (field: the set's name, value: its JSON),
so each operation touches one key: a registration checks the limit and writes in one Lua script
(Redis runs a script alone, so two replicas registering the last free place at once cannot both
get it; unlike WATCH/MULTI it needs no retry loop and takes one round trip), a delete reads and
removes in one MULTI/EXEC, and a single key also lives in one slot of a Redis Cluster.

A Redis that is down or unreachable costs a request at most two socket timeouts (:data:`TIMEOUT_S`
each, one retry on a fresh connection, which also carries the first call after Redis comes back)
and answers 503 ``support_store_unavailable``; the gateway's other work never touches Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from comneck.backends import SupportExample
from comneck.errors import ErrorCode

from .errors import ApiError
from .support_sets import MAX_SETS, SupportSet, SupportStore

KEY = "comneck:support-sets"
TIMEOUT_S = 1.0
#: KEYS[1] the hash, ARGV: name, JSON, limit -> 1 replaced, 0 added, -1 full
_PUT = """
local replaced = redis.call('HEXISTS', KEYS[1], ARGV[1])
if replaced == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return replaced
"""


def _to_json(entry: SupportSet) -> str:
    return json.dumps({"backend": entry.backend, "examples": [[e.description, e.label] for e in entry.examples]})


def _from_json(name: str, text: str) -> SupportSet:
    data = json.loads(text)
    return SupportSet(name, data["backend"], tuple(SupportExample(d, label) for d, label in data["examples"]))


@contextmanager
def _reached() -> Iterator[None]:
    """Any Redis failure (refused, timed out, read-only, ...) as the coded 503, in one line; the
    message names no URL (it may hold a password)."""
    try:
        yield
    except redis.RedisError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ApiError(ErrorCode.SUPPORT_STORE_UNAVAILABLE, f"the support-set store (Redis) cannot be reached: {reason}",
                       retry_after=1) from None


class RedisSupportSets(SupportStore):
    """Sets in Redis at ``url``: every replica with the same URL sees the same sets."""

    def __init__(self, url: str, limit: int = MAX_SETS, timeout_s: float = TIMEOUT_S) -> None:
        self.limit = limit
        self._client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                            socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
        self._put_script = self._client.register_script(_PUT)

    def _find(self, name: str) -> SupportSet | None:
        with _reached():
            text = self._client.hget(KEY, name)
        return None if text is None else _from_json(name, text)

    def _put(self, entry: SupportSet) -> bool | None:
        with _reached():
            replaced = int(self._put_script(keys=[KEY], args=[entry.name, _to_json(entry), self.limit]))
        return None if replaced < 0 else bool(replaced)

    def _pop(self, name: str) -> SupportSet | None:
        with _reached(), self._client.pipeline() as transaction:  # MULTI/EXEC: read and remove as one step
            text, _ = transaction.hget(KEY, name).hdel(KEY, name).execute()
        return None if text is None else _from_json(name, text)

    def all(self) -> list[SupportSet]:
        with _reached():
            found = self._client.hgetall(KEY)
        return [_from_json(name, found[name]) for name in sorted(found)]

    def state(self) -> str:
        try:
            with _reached():
                self._client.ping()
        except ApiError as exc:
            return f"redis: unavailable ({exc})"
        return "redis: ok"
