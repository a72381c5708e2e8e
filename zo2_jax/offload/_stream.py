"""The block pipeline: streams host-resident blocks through one jitted per-block function.

For block i (in index order), with W = max_inflight:

    upload(i+1) ........ issued as soon as a device slot is free (before/while block i computes)
    compute(i) ......... the jitted per-block function, on the uploaded copy (donated)
    write_back(i) ...... device_put of the result to pinned host memory, overlapping compute(i+1)

Uploads and write-backs are runtime `device_put`s issued from Python: they run on the copy engines
while the device computes (transfers inside one jitted scan over host-resident layers did not
overlap; see DESIGN.md). At most W streamed blocks hold device memory at once: a block holds a slot
from its upload until its write-back (or, in read-only passes, its compute) has finished. A slot is
freed by waiting on the write-back of an *older* block, never on the one just dispatched, so the
host blocks only while the device still has queued work. W = 2 double-buffers (upload of i+1
during compute of i, after the write-back of i-1); W >= 3 lets write-back and upload run at once
(the engine's default: on an H100 the bus carries ~52 GB/s one way, ~84 GB/s both ways).

After a pass, the first streamed blocks of the next pass are uploaded already (a prefetch across
steps that overlaps the head, the metrics read-out and the next embed).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

import jax

PyTree = Any


class BlockStore:
    """The engine's blocks and their optimiser states (lists; host or device arrays)."""

    def __init__(self, blocks: list, opts: list, resident: frozenset):
        self.blocks, self.opts, self.resident = blocks, opts, resident

    @property
    def n(self) -> int:
        return len(self.blocks)


class BlockStream:
    """Bounded upload / compute / write-back pipeline over a BlockStore.

    Args:
      store: the blocks; streamed ones live in `host` memory, resident ones on `device`.
      device, host: the device and pinned-host shardings.
      max_inflight: W, the most streamed blocks on the device at once (>= 1).
    """

    def __init__(self, store: BlockStore, device: jax.sharding.Sharding,
                 host: jax.sharding.Sharding, max_inflight: int, transport=None):
        self.store, self.device, self.host, self.max_inflight = store, device, host, max_inflight
        self.transport = transport  # streamed blocks travel packed (see _pack.Transport)
        self.streamed = [i for i in range(store.n) if i not in store.resident]
        self.reset()

    def reset(self) -> None:
        """Forgets prefetched uploads and in-flight slots (after a restore or a failure)."""
        self._window: deque = deque()  # [index, token]: token ready => slot free; None = not run
        self._uploaded: dict = {}      # index -> (block, opt or None) on the device
        self._next = 0                 # position in self.streamed of the next upload
        self._last = None              # the streamed block dispatched last

    # ---- slots ----------------------------------------------------------------------------------

    def _make_room(self, last: Optional[int]) -> bool:
        while len(self._window) >= self.max_inflight:
            idx, token = self._window[0]
            if token is None or idx == last:
                return False  # waiting now would idle the device (or wait for nothing)
            self._wait(idx, token)
            self._window.popleft()
        return True

    def _wait(self, i: int, token) -> None:
        jax.block_until_ready(token)

    def _upload(self, j: int, with_opt: bool):
        opt = jax.device_put(self.store.opts[j], self.device) if with_opt else None
        return jax.device_put(self.store.blocks[j], self.device), opt

    def _fill(self, with_opt: bool, last: Optional[int]) -> None:
        while self._next < len(self.streamed) and self._make_room(last):
            j = self.streamed[self._next]
            self._uploaded[j] = self._upload(j, with_opt)
            self._window.append([j, None])
            self._next += 1

    def _take(self, i: int, with_opt: bool):
        if i not in self._uploaded:  # not prefetched (W = 1, or a pass without prefetch)
            self._fill(with_opt, last=None)
        blk, opt = self._uploaded.pop(i)
        if with_opt and opt is None:
            opt = jax.device_put(self.store.opts[i], self.device)
        if self.transport is not None:  # the packed buffers die here, once unpacking is queued
            blk, opt = self.transport.unpack(blk, opt if with_opt else None)
        return blk, opt

    def _release_when(self, i: int, token) -> None:
        for entry in self._window:
            if entry[0] == i:
                entry[1] = token
                return

    # ---- passes ---------------------------------------------------------------------------------

    def update_pass(self, fn: Callable) -> None:
        """block_i, opt_i <- fn(i, block_i, opt_i) for every block, streamed ones round-tripping
        through the device; the results replace the store's entries."""
        store, last = self.store, None
        try:
            for i in range(store.n):
                if i in store.resident:
                    store.blocks[i], store.opts[i] = fn(i, store.blocks[i], store.opts[i])
                else:
                    blk, opt = self._take(i, with_opt=True)
                    new = fn(i, blk, opt)
                    del blk, opt
                    if self.transport is not None:
                        new = self.transport.pack(*new)
                    store.blocks[i], store.opts[i] = jax.device_put(new, self.host)
                    del new
                    self._release_when(i, (store.blocks[i], store.opts[i]))
                    last = i
                self._fill(True, last)
        except BaseException:
            self.reset()
            raise
        self._next, self._last = 0, last

    def read_pass(self, fn: Callable) -> None:
        """Calls token_i = fn(i, block_i) for every block (no write-back). A ready token_i means
        block i's device copy is no longer needed (its compute has finished)."""
        store, last = self.store, None
        try:
            for i in range(store.n):
                if i in store.resident:
                    fn(i, store.blocks[i])
                else:
                    blk, _ = self._take(i, with_opt=False)
                    token = fn(i, blk)
                    del blk
                    self._release_when(i, token)
                    last = i
                self._fill(False, last)
        except BaseException:
            self.reset()
            raise
        self._next, self._last = 0, last

    def prefetch(self, with_opt: bool) -> None:
        """Uploads the first streamed blocks of the next pass, as far as free slots allow without
        waiting on the block dispatched last. Call it after dispatching the work that follows the
        pass (the head), so the device has something to do while the host waits for a slot."""
        self._fill(with_opt, self._last)

    def drain(self) -> None:
        """Waits for all write-backs and drops prefetched uploads (frees the device slots)."""
        for _, token in self._window:
            if token is not None:
                jax.block_until_ready(token)
        self.reset()
