# -*- test-case-name: tests.test_crafted_mail -*-
"""
Parsed messages, kept for the next FETCH: a FETCH of BODYSTRUCTURE then
BODY[1.2] (what every client does) parses the message once.  Bounded by
bytes and entries, least recently used first out; safe to share between
worker threads.

A stored message never changes (Maildir), and a rename (flags, new to cur)
keeps its inode, so the key is the file's device, inode, size and mtime.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Hashable

PART_OVERHEAD = 2048  # a rough cost of one parsed part beside its bytes


class PartCache:
    def __init__(self, max_bytes: int = 64 << 20, max_entries: int = 256) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(stat: os.stat_result) -> Hashable:
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def get(self, key: Hashable) -> Any:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: Any, cost: int) -> None:
        if cost > self.max_bytes // 4:
            return  # one huge message would push out everything else
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, cost)
            self._bytes += cost
            while self._items and (self._bytes > self.max_bytes
                                   or len(self._items) > self.max_entries):
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        return len(self._items)


parsed = PartCache()
