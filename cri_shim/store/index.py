"""Id and name bookkeeping shared by the sandbox and container stores.

CRI callers may name objects by a unique id prefix (crictl does), and kubelet
relies on names being unique per pod/attempt: `NameIndex` reserves a name
before any containerd object exists, so a retried call cannot create a twin.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Generic, TypeVar

from cri_shim.errors import invalid_argument, not_found

T = TypeVar("T")


def new_id() -> str:
    """64 hex characters, the id shape kubelet and crictl expect."""
    return secrets.token_hex(32)


class AmbiguousId(Exception):
    pass


class IdIndex(Generic[T]):
    """Objects by full id, with unique-prefix lookup."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def __contains__(self, object_id: str) -> bool:
        return object_id in self._items

    def add(self, object_id: str, item: T) -> None:
        self._items[object_id] = item

    def discard(self, object_id: str) -> T | None:
        return self._items.pop(object_id, None)

    def find(self, id_or_prefix: str) -> T | None:
        """Exact id, else the single object whose id starts with it, else None."""
        if not id_or_prefix:
            return None
        exact = self._items.get(id_or_prefix)
        if exact is not None:
            return exact
        matches = [item for key, item in self._items.items() if key.startswith(id_or_prefix)]
        if len(matches) > 1:
            raise invalid_argument(f"{self.kind} id prefix {id_or_prefix!r} is ambiguous")
        return matches[0] if matches else None

    def get(self, id_or_prefix: str) -> T:
        """Like find, but NOT_FOUND with the kind and id when absent."""
        item = self.find(id_or_prefix)
        if item is None:
            raise not_found(f"{self.kind} {id_or_prefix!r} not found")
        return item


class NameIndex:
    """Unique names: reserve before creating, release after removing."""

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}

    def owner(self, name: str) -> str | None:
        return self._owners.get(name)

    def reserve(self, name: str, object_id: str) -> str | None:
        """Reserve `name` for `object_id`; returns the current owner if taken by another."""
        current = self._owners.get(name)
        if current is not None and current != object_id:
            return current
        self._owners[name] = object_id
        return None

    def release(self, name: str, object_id: str) -> None:
        if self._owners.get(name) == object_id:
            del self._owners[name]
