"""The block pipeline: streams host-resident blocks through jitted per-unit functions.

A *unit* is one block or a run of consecutive streamed blocks that travel and compute together:
one batched upload, one jitted call, one batched write-back (`ZO2Engine(blocks_per_call=...)`).
For unit u (in pass order), with W = max_inflight >= 3:

    compute(u) ......... the jitted per-unit function, on the uploaded copy (donated)
    write_back(u) ...... device_put of the result to pinned host memory, under compute(u+1)
    upload(u+2) ........ in the same device_put, once a slot is free: it runs under compute(u+1)

Uploads and write-backs are runtime `device_put`s issued from Python: they run on the copy engines
while the device computes (transfers inside one jitted scan over host-resident layers did not
overlap; see DESIGN.md). At most W streamed units hold device memory at once: a unit holds a slot
from its upload until its write-back (or, in read-only passes, its compute) has finished. A slot is
freed by waiting on the write-back of an *older* unit, never on the one just dispatched, so the
host blocks only while the device still has queued work.

**What a copy waits for.** A runtime `device_put`, in either direction, starts only after all the
device work dispatched before it has finished (jax's GPU runtime; `benchmarks/probes/
overlap_probe.py` shows it). An upload therefore hides only under computes dispatched *after*
it, and the order of dispatch, not only the window, decides the overlap:
- the upload of unit u+2 is dispatched after compute(u) and before compute(u+1), so it runs under
  compute(u+1), beside the write-back of unit u (the bus carries both directions at once).
  With W = 2 the upload of u+1 can only be dispatched after compute(u), whose end it waits for:
  uploads and computes take turns;
- a pass that is followed by another (`ahead=True`: the steps of a training loop, evaluation
  batches) runs its uploads on into the next pass's first units, so they run under this pass's
  last computes instead of after the head;
- the host waits for a slot only on write-backs of units older than the `hold` units dispatched
  last. With W <= 3 that is hold = 1: the slot for u+2 is the write-back of u-1, which ends about
  when compute(u) does, so the host dispatches compute(u+1) a little late whenever the bus is as
  slow as the compute. With W >= 4 and at least 4 streamed units the default is hold = 2: the
  write-back of u-2 ended long before, and the host never holds back the device's next compute.

After a pass, the first streamed units of the next pass are uploaded already, as far as the
window allows (a prefetch across steps that overlaps the head, the metrics read-out and the
next embed).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional, Sequence

import jax

from zo2_jax.offload.plan import stream_hold

PyTree = Any
Unit = tuple  # block indices, consecutive in pass order


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
      max_inflight: W, the most streamed units on the device at once (>= 1).
      units: the pass order (`plan.make_units`); default one block per unit.
      hold: the host never waits on the slots of the `hold` units dispatched last (>= 1);
        default `plan.stream_hold`.
      wrap: whether passes called with `ahead=True` upload into the next pass (default True).
    """

    def __init__(self, store: BlockStore, device: jax.sharding.Sharding,
                 host: jax.sharding.Sharding, max_inflight: int,
                 units: Optional[Sequence[Unit]] = None, hold: Optional[int] = None,
                 wrap: bool = True):
        self.store, self.device, self.host, self.max_inflight = store, device, host, max_inflight
        self.units = [tuple(u) for u in (units or [(i,) for i in range(store.n)])]
        if sorted(i for u in self.units for i in u) != list(range(store.n)):
            raise ValueError(f"units {self.units} do not cover blocks 0..{store.n - 1} once each")
        self.streamed = [u for u in self.units if u[0] not in store.resident]
        if any(i in store.resident for u in self.streamed for i in u) or any(
                len(u) > 1 for u in self.units if u[0] in store.resident):
            raise ValueError(f"units {self.units} mix resident and streamed blocks")
        if hold is not None and (isinstance(hold, bool) or not isinstance(hold, int) or hold < 1):
            raise ValueError(f"hold must be an int >= 1, got {hold!r}")
        self.hold = stream_hold(max_inflight, len(self.streamed)) if hold is None else hold
        self.wrap = bool(wrap)
        self.reset()

    def reset(self) -> None:
        """Forgets prefetched uploads and in-flight slots (after a restore or a failure)."""
        if hasattr(self, "_window"):  # e.g. after a failed pass: the slots stay taken until
            self._wait_all(quiet=True)  # their write-backs end (that failure is the one raised)
        # [unit, token] per upload: token ready => slot free; None = not run yet. A unit's
        # earlier entry is waited for and removed before it is uploaded again, so each unit has
        # at most one entry; entries, not units, are what the host waits on.
        self._window: deque = deque()
        self._uploaded: dict = {}      # unit -> ([blocks], [opts] or None) on the device
        # position of the next upload in the pass order (>= len(streamed): the next pass's
        # units, uploaded ahead), and the end of what the pass in progress may upload
        self._next, self._limit = 0, len(self.streamed)
        self._recent: deque = deque()  # window entries of the `hold` units dispatched last

    # ---- slots ----------------------------------------------------------------------------------

    def _held(self) -> list:
        """The window entries the host must not wait on now: those of the `hold` units
        dispatched last (their write-backs are the device's newest work)."""
        return list(self._recent)[-self.hold:]

    def _dispatched(self, entry: Optional[list]) -> None:
        self._recent.append(entry)
        while len(self._recent) > self.hold:
            self._recent.popleft()

    def _make_room(self, held: Sequence[list]) -> bool:
        while len(self._window) >= self.max_inflight:
            entry = self._window[0]
            unit, token = entry
            if token is None or any(entry is h for h in held):
                return False  # waiting now would idle the device (or wait for nothing)
            self._wait(unit, token)
            self._window.popleft()
        return True

    def _wait(self, unit: Unit, token) -> None:
        jax.block_until_ready(token)

    def _wait_all(self, quiet: bool) -> None:
        for _, token in self._window:
            if token is not None:
                try:
                    jax.block_until_ready(token)
                except Exception:
                    if not quiet:
                        raise

    def _payload(self, unit: Unit, with_opt: bool) -> tuple:
        """What an upload of the unit sends: ([blocks], [optimiser states] or None)."""
        blks = [self.store.blocks[j] for j in unit]
        return blks, ([self.store.opts[j] for j in unit] if with_opt else None)

    def _upload(self, unit: Unit, with_opt: bool):
        """One batched device_put for the unit's blocks (and optimiser states)."""
        return jax.device_put(self._payload(unit, with_opt), self.device)

    def _source_ready(self, unit: Unit, held: Sequence[list]) -> bool:
        """Waits for the unit's own earlier slot (its write-back, when it is uploaded for the
        next pass) unless that slot is held; False if it is. An upload from a host copy whose
        write-back is still running is several times slower than one from a settled copy, so
        the engine never issues one."""
        for entry in [e for e in self._window if e[0] == unit]:
            if entry[1] is None or any(entry is h for h in held):
                return False
            self._wait(unit, entry[1])
            self._window.remove(entry)
        return True

    def _fill(self, with_opt: bool, held: Sequence[list], until: Optional[Unit] = None,
              collect: Optional[list] = None) -> None:
        """Uploads the next units in pass order while slots allow without waiting on `held`;
        with `until`, stops once that unit is uploaded. With `collect`, the units are taken
        (their slots too) but appended to it instead of uploaded: the caller sends them."""
        while self._next < self._limit:
            u = self.streamed[self._next % len(self.streamed)]
            if not (self._source_ready(u, held) and self._make_room(held)):
                return
            if collect is None:
                self._uploaded[u] = self._upload(u, with_opt)
            else:
                collect.append(u)
            self._window.append([u, None])
            self._next += 1
            if u == until:
                return

    def _take(self, unit: Unit, with_opt: bool):
        if unit not in self._uploaded:  # not uploaded ahead (W = 1, or after a plain pass):
            # the unit itself may wait on any write-back; the lookahead after it keeps `hold`
            self._fill(with_opt, held=(), until=unit)
            self._fill(with_opt, self._held())
        return self._uploaded.pop(unit)

    def _release_when(self, unit: Unit, token) -> Optional[list]:
        """Gives the unit's pending window entry (its oldest without a token) the token that
        frees its slot, and returns the entry."""
        for entry in self._window:
            if entry[0] == unit and entry[1] is None:
                entry[1] = token
                return entry
        return None

    def _write_back_and_fill(self, unit: Unit, new_blks: list, new_opts: list) -> tuple:
        """The unit's write-back and the uploads that follow it (`_fill` with the slots held
        now) in one device_put: each device_put costs the host a fixed time, which bounds the
        step of a small model. The write-back comes first in it, as
        it did in its own call, and the slot decisions are `_fill`'s: the unit's own entry
        counts as held (it is the newest) while its token does not exist yet. Returns the
        host copies (blocks, opts). This relies on hold >= 1: the unit's entry, dispatched last,
        is in `_held()`, so no slot decision waits on its missing token. With hold = 1 (W <= 3)
        the fill may wait on the previous unit's write-back before this one is queued."""
        assert self.hold >= 1
        entry = self._release_when(unit, None)
        self._dispatched(entry)
        ups: list = []
        self._fill(True, self._held(), collect=ups)
        (blks, opts), sent = jax.device_put(
            ((new_blks, new_opts), [self._payload(u, True) for u in ups]),
            (self.host, self.device))
        if entry is not None:
            entry[1] = (blks, opts)
        self._uploaded.update(zip(ups, sent))
        return blks, opts

    # ---- passes ---------------------------------------------------------------------------------

    def _begin(self, ahead: bool) -> None:
        n = len(self.streamed)
        self._limit = 2 * n if ahead and self.wrap else n

    def _end(self) -> None:
        n = len(self.streamed)
        self._next, self._limit = max(0, self._next - n), n

    def update_pass(self, fn: Callable, ahead: bool = False) -> None:
        """blocks, opts <- fn(unit, [block_i], [opt_i]) for every unit (lists in the unit's
        order), streamed units round-tripping through the device; the results replace the
        store's entries. `ahead`: another pass follows at once (a training step), so uploads
        run on into its first units while this pass's last units compute."""
        store = self.store
        self._begin(ahead)
        # units uploaded ahead by a read pass came without optimiser states: send those now,
        # before the first compute, so no compute waits for one (every later upload of this
        # pass carries them)
        for u, (blks, opts) in list(self._uploaded.items()):
            if opts is None:
                self._uploaded[u] = (blks, jax.device_put([store.opts[j] for j in u],
                                                          self.device))
        try:
            for u in self.units:
                if u[0] in store.resident:
                    blks, opts = fn(u, [store.blocks[i] for i in u], [store.opts[i] for i in u])
                else:
                    blks, opts = self._take(u, with_opt=True)
                    new = fn(u, blks, opts)
                    del blks, opts
                    blks, opts = self._write_back_and_fill(u, list(new[0]), list(new[1]))
                    del new
                for i, b, o in zip(u, blks, opts):
                    store.blocks[i], store.opts[i] = b, o
                del blks, opts
                if u[0] in store.resident:
                    self._fill(True, self._held())
        except BaseException:
            self.reset()
            raise
        self._end()

    def read_pass(self, fn: Callable, ahead: bool = False) -> None:
        """Calls token_u = fn(unit, [block_i]) for every unit (no write-back). A ready token_u
        means the unit's device copies are no longer needed (its compute has finished).
        `ahead` as in `update_pass` (the next pass's uploads carry no optimiser states)."""
        store = self.store
        self._begin(ahead)
        try:
            for u in self.units:
                if u[0] in store.resident:
                    fn(u, [store.blocks[i] for i in u])
                else:
                    blks, _ = self._take(u, with_opt=False)
                    token = fn(u, blks)
                    del blks
                    self._dispatched(self._release_when(u, token))
                self._fill(False, self._held())
        except BaseException:
            self.reset()
            raise
        self._end()

    def prefetch(self, with_opt: bool) -> None:
        """Uploads the first streamed units of the next pass, as far as free slots allow without
        waiting on the units dispatched last. Call it after dispatching the work that follows
        the pass (the head), so the device has something to do while the host waits for a
        slot."""
        self._fill(with_opt, self._held())

    def drain(self) -> None:
        """Waits for all write-backs and drops prefetched uploads (frees the device slots)."""
        self._wait_all(quiet=False)
        self.reset()
