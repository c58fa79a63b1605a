"""Byte-bounded LRU bookkeeping shared by the tiers (keys and sizes only, no payloads).

Not thread-safe: the owning tier holds its lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict


class LRUIndex:
    def __init__(self, capacity_bytes: int):
        assert capacity_bytes >= 0
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[bytes, int] = OrderedDict()  # front = least recently used

    def __contains__(self, key: bytes) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def keys(self) -> list[bytes]:
        return list(self._sizes)

    def touch(self, key: bytes) -> None:
        self._sizes.move_to_end(key)

    def victims_for(self, size: int) -> list[bytes]:
        """Least recently used keys to remove so that ``size`` more bytes fit (not removed yet)."""
        assert size <= self.capacity_bytes, (size, self.capacity_bytes)
        victims: list[bytes] = []
        free = self.capacity_bytes - self.used_bytes
        for key, held in self._sizes.items():
            if free >= size:
                break
            victims.append(key)
            free += held
        assert free >= size
        return victims

    def add(self, key: bytes, size: int) -> None:
        """Insert ``key`` as most recently used; the caller made room with :meth:`victims_for`."""
        assert key not in self._sizes, key.hex()
        assert self.used_bytes + size <= self.capacity_bytes, (self.used_bytes, size, self.capacity_bytes)
        self._sizes[key] = size
        self.used_bytes += size

    def remove(self, key: bytes) -> int | None:
        """Forget ``key``; its size, or None when absent."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self.used_bytes -= size
        assert self.used_bytes >= 0
        return size

    def clear(self) -> None:
        self._sizes.clear()
        self.used_bytes = 0
