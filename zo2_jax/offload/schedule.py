"""The stream schedule as data: the order of uploads, computes, write-backs and waits.

A *unit* is one block or a run of consecutive streamed blocks that travel and compute together:
one batched upload, one jitted call, one batched write-back. `Schedule` decides, for each pass
over the units, which of them to upload when, and which earlier transfer the host waits for
before it may reuse a device slot. It is pure bookkeeping (no jax, no arrays): each pass returns
a list of `Op`s, which `BlockStream` (`_stream.py`) executes in order. Tests read the ops.

For unit u (in pass order), with W = max_inflight >= 3:

    compute(u) ......... the jitted per-unit function, on the uploaded copy (donated)
    write_back(u) ...... device_put of the result to pinned host memory, under compute(u+1)
    upload(u+2) ........ in the same device_put, once a slot is free: it runs under compute(u+1)

At most W streamed units hold device memory at once: a unit holds a slot (a *ticket*) from its
upload until the host has waited for its write-back (or, in read-only passes, its compute). A
slot is freed by waiting on an *older* unit's ticket, never on the one just dispatched, so the
host blocks only while the device still has queued work.

**What a copy waits for.** A runtime `device_put`, in either direction, starts only after all the
device work dispatched before it has finished (jax's GPU runtime; `benchmarks/probes/
overlap_probe.py` shows it). An upload therefore hides only under computes dispatched *after*
it, so the order of dispatch, not only the window, decides the overlap:
- the upload of unit u+2 is dispatched after compute(u) and before compute(u+1), so it runs under
  compute(u+1), beside the write-back of unit u (the bus carries both directions at once).
  With W = 2 the upload of u+1 can only be dispatched after compute(u): uploads and computes
  take turns;
- a pass that is followed by another (`ahead=True`: the steps of a training loop, evaluation
  batches) runs its uploads on into the next pass's first units, so they run under this pass's
  last computes instead of after the head;
- the host never waits on the tickets of the `hold` units dispatched last (`plan.stream_hold`):
  with W <= 3, hold = 1 (the slot for u+2 is the write-back of u-1, which ends about when
  compute(u) does); with W >= 4 and at least 4 streamed units, hold = 2 (the write-back of u-2
  ended long before, so the host never holds back the device's next compute);
- a unit is never uploaded again from a host copy whose write-back has not been waited for (such
  an upload is several times slower than one from a settled copy).

After a pass, `prefetch` uploads the first streamed units of the next pass as far as the window
allows (a prefetch across steps that overlaps the head, the metrics read-out and the next embed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

Unit = tuple  # block indices, consecutive in pass order


@dataclass(frozen=True)
class Op:
    """One action of a pass, in the order the host takes them.

    kind:
      "upload"      device_put the unit's blocks (and, with `with_opt`, optimiser states) to the
                    device; `ticket` is the slot it takes.
      "opts"        device_put the optimiser states of a unit uploaded ahead without them.
      "compute"     call the pass's function on the unit (on the device copies when streamed,
                    on the store's arrays when `resident`). In a read pass its result is the
                    token of `ticket`; in an update pass `ticket` is None.
      "write_back"  device_put the unit's results to the host in one call together with the
                    uploads in `uploads` (a tuple of "upload" ops); the host copies are the
                    token of `ticket`.
      "wait"        block until the token of `ticket` is ready; its slot is free after.
    """

    kind: str
    unit: Unit
    ticket: Optional[int] = None
    with_opt: bool = False
    resident: bool = False
    uploads: tuple = ()

    def __repr__(self) -> str:
        extra = "".join([f" #{self.ticket}" if self.ticket is not None else "",
                         " +opt" if self.with_opt else "", " resident" if self.resident else "",
                         f" {list(self.uploads)}" if self.uploads else ""])
        return f"{self.kind}{list(self.unit)}{extra}"


@dataclass
class _Entry:
    unit: Unit
    ticket: int
    bound: bool = False  # whether its token exists (the op that makes it has been issued)


@dataclass
class Schedule:
    """The stream's bookkeeping across passes: slots in use, units uploaded ahead.

    Args:
      units: every unit in pass order (`plan.make_units`), resident ones one block each.
      resident: the blocks that stay on the device (never uploaded or written back).
      max_inflight: W, the most streamed units holding device memory at once (>= 1).
      hold: the host never waits on the tickets of the `hold` units dispatched last (>= 1).
      wrap: whether a pass with `ahead=True` uploads into the next pass.
    """

    units: Sequence[Unit]
    resident: frozenset
    max_inflight: int
    hold: int
    wrap: bool = True
    window: deque = field(init=False)    # _Entry per slot in use, oldest first
    uploaded: dict = field(init=False)   # unit -> with_opt, for units on the device
    _next: int = field(init=False)       # position of the next upload in `streamed` order
    _limit: int = field(init=False)      # (>= len(streamed): the next pass's units)
    _recent: deque = field(init=False)   # entries of the `hold` units dispatched last
    _tickets: int = field(init=False, default=0)

    def __post_init__(self):
        self.units = [tuple(u) for u in self.units]
        self.resident = frozenset(self.resident)
        n = sum(len(u) for u in self.units)
        if sorted(i for u in self.units for i in u) != list(range(n)):
            raise ValueError(f"units {self.units} do not cover blocks 0..{n - 1} once each")
        self.streamed = [u for u in self.units if u[0] not in self.resident]
        if any(i in self.resident for u in self.streamed for i in u) or any(
                len(u) > 1 for u in self.units if u[0] in self.resident):
            raise ValueError(f"units {self.units} mix resident and streamed blocks")
        for name in ("max_inflight", "hold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.reset()

    def reset(self) -> None:
        """Forgets every slot and upload (after a drain, a restore or a failed pass)."""
        self.window, self.uploaded, self._recent = deque(), {}, deque()
        self._next, self._limit = 0, len(self.streamed)

    # ---- passes ---------------------------------------------------------------------------------

    def update_pass(self, ahead: bool = False) -> list:
        """A pass that replaces every unit's blocks and optimiser states: upload, compute,
        write-back. `ahead`: another pass follows at once, so uploads run on into its units."""
        ops: list = []
        self._begin(ahead)
        # units uploaded ahead by a read pass came without optimiser states: send those before
        # the first compute, so no compute waits for one
        for u, with_opt in self.uploaded.items():
            if not with_opt:
                ops.append(Op("opts", u))
                self.uploaded[u] = True
        for u in self.units:
            if u[0] in self.resident:
                ops.append(Op("compute", u, resident=True))
                self._fill(True, self._held(), ops)
                continue
            self._take(u, True, ops)
            ops.append(Op("compute", u))
            entry = self._pending(u)
            self._dispatched(entry)
            ups: list = []  # the uploads that follow, in the write-back's device_put (each
            self._fill(True, self._held(), ops, collect=ups)  # device_put costs the host time)
            entry.bound = True
            ops.append(Op("write_back", u, entry.ticket, uploads=tuple(ups)))
        self._end()
        return ops

    def read_pass(self, ahead: bool = False) -> list:
        """A pass that only reads the blocks (no write-back): a unit's slot is free once its
        compute has finished. `ahead` as in `update_pass`; its uploads carry no optimiser
        states."""
        ops: list = []
        self._begin(ahead)
        for u in self.units:
            if u[0] in self.resident:
                ops.append(Op("compute", u, resident=True))
            else:
                self._take(u, False, ops)
                entry = self._pending(u)
                entry.bound = True
                ops.append(Op("compute", u, entry.ticket))
                self._dispatched(entry)
            self._fill(False, self._held(), ops)
        self._end()
        return ops

    def prefetch(self, with_opt: bool) -> list:
        """Uploads of the next pass's first units, as far as free slots allow without waiting
        on the units dispatched last. Issue them after the work that follows a pass (the head),
        so the device has something to do while the host waits for a slot."""
        ops: list = []
        self._fill(with_opt, self._held(), ops)
        return ops

    def drain(self) -> list:
        """Waits for every ticket with a token, then forgets the rest (uploads ahead)."""
        ops = [Op("wait", e.unit, e.ticket) for e in self.window if e.bound]
        self.reset()
        return ops

    # ---- slots ----------------------------------------------------------------------------------

    def _begin(self, ahead: bool) -> None:
        n = len(self.streamed)
        self._limit = 2 * n if ahead and self.wrap else n

    def _end(self) -> None:
        n = len(self.streamed)
        self._next, self._limit = max(0, self._next - n), n

    def _held(self) -> list:
        """The entries the host must not wait on now: those of the `hold` units dispatched
        last (their transfers are the device's newest work)."""
        return list(self._recent)[-self.hold:]

    def _dispatched(self, entry: _Entry) -> None:
        self._recent.append(entry)
        while len(self._recent) > self.hold:
            self._recent.popleft()

    def _pending(self, unit: Unit) -> _Entry:
        """The unit's entry whose token the op being issued makes (its oldest unbound one)."""
        return next(e for e in self.window if e.unit == unit and not e.bound)

    def _can_wait(self, entry: _Entry, held: Sequence[_Entry]) -> bool:
        # waiting on a held entry would idle the device; on an unbound one, wait for nothing
        return entry.bound and not any(entry is h for h in held)

    def _make_room(self, held, ops: list) -> bool:
        while len(self.window) >= self.max_inflight:
            entry = self.window[0]
            if not self._can_wait(entry, held):
                return False
            ops.append(Op("wait", entry.unit, entry.ticket))
            self.window.popleft()
        return True

    def _source_ready(self, unit: Unit, held, ops: list) -> bool:
        """Waits for the unit's own earlier slot (its write-back, when it is uploaded for the
        next pass) unless that slot is held; False if it is."""
        for entry in [e for e in self.window if e.unit == unit]:
            if not self._can_wait(entry, held):
                return False
            ops.append(Op("wait", unit, entry.ticket))
            self.window.remove(entry)
        return True

    def _fill(self, with_opt: bool, held, ops: list, until: Optional[Unit] = None,
              collect: Optional[list] = None) -> None:
        """Uploads the next units in pass order while slots allow without waiting on `held`;
        with `until`, stops once that unit is uploaded. With `collect`, the upload ops are
        appended to it instead of `ops` (the caller sends them with a write-back)."""
        while self._next < self._limit:
            u = self.streamed[self._next % len(self.streamed)]
            if not (self._source_ready(u, held, ops) and self._make_room(held, ops)):
                return
            self._tickets += 1
            self.window.append(_Entry(u, self._tickets))
            assert len(self.window) <= self.max_inflight
            (ops if collect is None else collect).append(
                Op("upload", u, self._tickets, with_opt=with_opt))
            self.uploaded[u] = with_opt
            self._next += 1
            if u == until:
                return

    def _take(self, unit: Unit, with_opt: bool, ops: list) -> None:
        """Makes sure the unit is on the device before its compute. One not uploaded ahead
        (W = 1, or after a pass without lookahead) may wait for any slot; the lookahead after it
        keeps `hold`."""
        if unit not in self.uploaded:
            self._fill(with_opt, (), ops, until=unit)
            self._fill(with_opt, self._held(), ops)
        if unit not in self.uploaded:
            raise AssertionError(f"schedule: unit {unit} could not be uploaded "
                                 f"(window {[(e.unit, e.bound) for e in self.window]})")
        del self.uploaded[unit]


def simulate(units: Sequence[Unit], resident: frozenset, max_inflight: int, hold: int,
             passes: Sequence[str], wrap: bool = True) -> list:
    """The ops of a sequence of passes, for reading and testing a schedule: `passes` holds
    "update", "update+" (ahead), "read", "read+", "prefetch", "prefetch-opt" and "drain".
    Returns [(pass, [Op, ...]), ...]."""
    s = Schedule(units, resident, max_inflight, hold, wrap)
    out = []
    for p in passes:
        if p in ("update", "update+"):
            ops = s.update_pass(ahead=p.endswith("+"))
        elif p in ("read", "read+"):
            ops = s.read_pass(ahead=p.endswith("+"))
        elif p in ("prefetch", "prefetch-opt"):
            ops = s.prefetch(with_opt=p == "prefetch-opt")
        elif p == "drain":
            ops = s.drain()
        else:
            raise ValueError(f"unknown pass {p!r}: expected update, update+, read, read+, "
                             f"prefetch, prefetch-opt or drain")
        out.append((p, ops))
    return out
