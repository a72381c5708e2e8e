"""Executes the stream schedule (`schedule.py`) on the engine's blocks.

`Schedule` decides the order of uploads, computes, write-backs and waits; `BlockStream` carries
out its ops with runtime `device_put`s (they run on the copy engines while the device computes;
transfers inside one jitted scan over host-resident layers did not overlap, see DESIGN.md),
`jax.block_until_ready` on the ticket tokens, and the pass's function.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax

from zo2_jax.offload.plan import stream_hold
from zo2_jax.offload.schedule import Schedule

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
      device, host: the device and pinned-host shardings, or functions of a tree giving one
        sharding per leaf (a mesh: each leaf moves between memories keeping its sharding).
      max_inflight: W, the most streamed units on the device at once (>= 1).
      units: the pass order (`plan.make_units`); default one block per unit.
      hold: the host never waits on the slots of the `hold` units dispatched last (>= 1);
        default `plan.stream_hold`.
      wrap: whether passes called with `ahead=True` upload into the next pass (default True).
      frozen: a top-level key of every block (dict) that the write-back leaves out: the frozen
        base (`Spec.frozen`), read on the device and never changed, so the host keeps its copy.
    """

    def __init__(self, store: BlockStore, device: jax.sharding.Sharding,
                 host: jax.sharding.Sharding, max_inflight: int,
                 units: Optional[Sequence[Unit]] = None, hold: Optional[int] = None,
                 wrap: bool = True, frozen: Optional[str] = None):
        self.store, self.device, self.host = store, device, host
        self.frozen = frozen
        self._dev_of = device if callable(device) else (lambda _: device)
        self._host_of = host if callable(host) else (lambda _: host)
        units = [tuple(u) for u in (units or [(i,) for i in range(store.n)])]
        n_streamed = len([u for u in units if u[0] not in store.resident])
        if hold is None:
            hold = stream_hold(max_inflight, n_streamed)
        self.schedule = Schedule(units, store.resident, max_inflight, hold, bool(wrap))
        if sum(len(u) for u in units) != store.n:
            raise ValueError(f"units {units} do not cover blocks 0..{store.n - 1} once each")
        self._tokens: dict = {}    # ticket -> what its wait blocks on
        self._uploaded: dict = {}  # unit -> ([blocks], [opts] or None) on the device

    @property
    def units(self) -> list:
        return self.schedule.units

    @property
    def streamed(self) -> list:
        return self.schedule.streamed

    @property
    def max_inflight(self) -> int:
        return self.schedule.max_inflight

    @property
    def hold(self) -> int:
        return self.schedule.hold

    def reset(self) -> None:
        """Forgets prefetched uploads and slots (after a restore or a failure). Write-backs
        still running are waited for first (quietly: the failure that led here is the one
        raised), so the next pass neither exceeds W units on the device nor uploads from a host
        copy being written."""
        for token in self._tokens.values():
            try:
                jax.block_until_ready(token)
            except Exception:
                pass
        self._tokens.clear()
        self._uploaded.clear()
        self.schedule.reset()

    def _wait(self, unit: Unit, token) -> None:
        """Blocks until a slot's token is ready (a hook: a probe times the host's waits)."""
        jax.block_until_ready(token)

    def _payload(self, unit: Unit, with_opt: bool) -> tuple:
        """What an upload of the unit sends: ([blocks], [optimiser states] or None)."""
        blks = [self.store.blocks[j] for j in unit]
        return blks, ([self.store.opts[j] for j in unit] if with_opt else None)

    def _run(self, make_ops: Callable, fn: Optional[Callable] = None,
             update: bool = True) -> None:
        """Carries out the ops of `make_ops()` (a pass of the schedule); on any exception,
        resets and re-raises."""
        store, new = self.store, None
        try:
            for op in make_ops():
                u = op.unit
                if op.kind == "wait":
                    self._wait(u, self._tokens.pop(op.ticket))
                elif op.kind == "upload":
                    payload = self._payload(u, op.with_opt)
                    self._uploaded[u] = jax.device_put(payload, self._dev_of(payload))
                elif op.kind == "opts":
                    blks, _ = self._uploaded[u]
                    opts = [store.opts[j] for j in u]
                    self._uploaded[u] = (blks, jax.device_put(opts, self._dev_of(opts)))
                elif op.kind == "compute" and op.resident:
                    if update:
                        blks, opts = fn(u, [store.blocks[i] for i in u],
                                        [store.opts[i] for i in u])
                        for i, b, o in zip(u, blks, opts):
                            store.blocks[i], store.opts[i] = b, o
                        del blks, opts
                    else:
                        fn(u, [store.blocks[i] for i in u])
                elif op.kind == "compute":
                    blks, opts = self._uploaded.pop(u)
                    if update:
                        new = fn(u, blks, opts)
                    else:
                        self._tokens[op.ticket] = fn(u, blks)
                    del blks, opts
                elif op.kind == "write_back":
                    # the results and the uploads that follow in one device_put (each costs the
                    # host a fixed time, which bounds the step of a small model)
                    back = ([self._written(b) for b in new[0]], list(new[1]))
                    ups = [self._payload(up.unit, up.with_opt) for up in op.uploads]
                    (blks, opts), sent = jax.device_put(
                        (back, ups), (self._host_of(back), self._dev_of(ups)))
                    new = None
                    self._tokens[op.ticket] = (blks, opts)
                    self._uploaded.update(zip([up.unit for up in op.uploads], sent))
                    for i, b, o in zip(u, blks, opts):
                        store.blocks[i], store.opts[i] = self._kept(b, store.blocks[i]), o
                    del blks, opts
                else:
                    raise AssertionError(f"unknown op {op!r}")
        except BaseException:
            del new
            self.reset()
            raise

    def _written(self, block):
        """What the write-back of an updated block moves to the host: all of it, or without
        the frozen base."""
        if self.frozen is None:
            return block
        return {k: v for k, v in block.items() if k != self.frozen}

    def _kept(self, written, old):
        """The host's new block: the written one, with the frozen base of the `old` one."""
        return written if self.frozen is None else {**written, self.frozen: old[self.frozen]}

    # ---- passes ---------------------------------------------------------------------------------

    def update_pass(self, fn: Callable, ahead: bool = False) -> None:
        """blocks, opts <- fn(unit, [block_i], [opt_i]) for every unit (lists in the unit's
        order), streamed units round-tripping through the device; the results replace the
        store's entries. `ahead`: another pass follows at once (a training step), so uploads
        run on into its first units while this pass's last units compute."""
        self._run(lambda: self.schedule.update_pass(ahead), fn, update=True)

    def read_pass(self, fn: Callable, ahead: bool = False) -> None:
        """Calls token_u = fn(unit, [block_i]) for every unit (no write-back). A ready token_u
        means the unit's device copies are no longer needed (its compute has finished).
        `ahead` as in `update_pass` (the next pass's uploads carry no optimiser states)."""
        self._run(lambda: self.schedule.read_pass(ahead), fn, update=False)

    def prefetch(self, with_opt: bool) -> None:
        """Uploads the first streamed units of the next pass, as far as free slots allow without
        waiting on the units dispatched last. Call it after dispatching the work that follows
        the pass (the head), so the device has something to do while the host waits for a
        slot."""
        self._run(lambda: self.schedule.prefetch(with_opt))

    def drain(self) -> None:
        """Waits for all write-backs and drops prefetched uploads (frees the device slots)."""
        self._run(self.schedule.drain)
        self.reset()
