"""Prints BENCHMARKS.md from the benchmark record: one table per question, each row the latest
measurement of its shape and settings, with the card, date, commit and command of its calls.

    python benchmarks/table.py benchmarks/record.jsonl --write BENCHMARKS.md
    python benchmarks/table.py benchmarks/record.jsonl > BENCHMARKS.md

The record is JSONL, oldest call first: rows of benchmarks/matrix.py (and the reference's, through
matrix.py --reference), and precision rows (kind "precision"). Every row needs call, card, date,
commit and command ("not recorded" where unknown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap

REQUIRED = ("call", "card", "date", "commit", "command")
BIG = "opt_175b"  # the OPT-175B block shape has its own table

HEADER = """\
# Benchmarks

Generated from `benchmarks/record.jsonl` by `python benchmarks/table.py benchmarks/record.jsonl
--write BENCHMARKS.md` (do not edit by hand); rows from `benchmarks/matrix.py` and the probes in
`benchmarks/probes`; history: `git log -p BENCHMARKS.md benchmarks/`.

Random weights in the reference's nanoGPT shapes (GPT-2 blocks at OPT sizes, vocab 50304, untied
head). A row is the latest measurement of its shape and settings; "earlier": the same row in older
calls. "engine": W units in flight, G blocks per call, packed or not, fused or sequential
branches; settings given explicitly in *italics*. Step times are medians over the timed steps,
the host reading each loss a step late (calls 3a to 9e, before matrix.py: means).

Performance model: `T_limit = max(C, P_s/B_up, P_s/B_down, 2 P_s/B_bi)`: P_s bytes streamed per
step each way, B pinned bandwidths measured in the same process, C the MeZO step where it ran.
"""


def load(paths: list) -> list:
    rows = []
    for path in paths:
        with open(path) as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                r = json.loads(line)
                missing = [k for k in REQUIRED if not r.get(k)]
                if missing:
                    raise SystemExit(
                        f"{path}:{n}: the row ({r.get('model')}, call {r.get('call')}) has no "
                        f"{', '.join(missing)}: every row needs {', '.join(REQUIRED)} "
                        f"(write 'not recorded' where unknown)")
                rows.append(r)
    return rows


# ---- formatting -------------------------------------------------------------------------------

def num(v, nd=2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}" if s < 0.02 else f"{s * 1e3:.1f}"


def gb(b, nd=2) -> str:
    return "-" if b is None else f"{b / 1e9:.{nd}f}"


def short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def shape(r) -> str:
    layers = f" ({r['layers']} layers)" if r["model"] == BIG and r.get("layers") else ""
    return f"{r['model']}{layers}"


def storage(r) -> str:
    rd = {"stochastic": " SR", "nearest": " RN"}.get(r.get("rounding"), "")
    return f"{short(r['storage'])}{rd if r['storage'] != 'float32' else ''}"


def engine(r) -> str:
    """'W4 G1 packed fused', explicit settings in italics."""
    asked, got = r.get("engine_asked") or {}, r.get("engine") or {}
    parts = []
    for key, fmt in (("max_inflight", "W{}"), ("hold", "hold {}"), ("blocks_per_call", "G{}"),
                     ("packed", "{}"), ("branches", "{}"), ("resident_blocks", "{} resident")):
        v = asked.get(key, got.get(key))
        if v is None or (key == "resident_blocks" and not v) or (key == "hold" and key not in
                                                                  asked):
            continue
        text = fmt.format({True: "packed", False: "unpacked"}.get(v, v) if key == "packed"
                          else v)
        parts.append(f"*{text}*" if key in asked else text)
    return " ".join(parts) or "defaults"


def bound(r) -> str:
    """What T_limit is: C (MeZO's step) or the bus; "no C" where MeZO did not run."""
    b = r.get("bound", "-")
    return b if b != "bus" or r.get("mezo_step_s") else "bus, no C"


def code(r) -> str:
    c = r.get("code")
    return f"{c} {r['commit'][:7]}{'+' if r.get('dirty') else ''}" if c else "-"


def median_of(rows, field):
    vals = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(vals) if vals else None


# ---- which rows answer a question -------------------------------------------------------------

def estimate(r) -> tuple:
    """(q, estimator, directions) of a matrix row (rows before these keys: MeZO's, q = 1)."""
    return r.get("q", 1), r.get("estimator", "mezo"), r.get("directions", "gaussian")


def adapter(r) -> str:
    """A matrix row's adapter: "none" (every weight trained) or e.g. "lora r8", "prefix 5"."""
    a = r.get("adapter", "none")
    if a == "none":
        return a
    base = r.get("base", "storage")
    asked = "".join(f", {k}={v}" for k, v in sorted((r.get("engine_asked") or {}).items()))
    size = f"r{r.get('lora_rank', 8)}" if a == "lora" else str(r.get("num_prefix", 5))
    return f"{a} {size}" + ("" if base == "storage" else f", base {base}") + asked


def key(r) -> tuple:
    return (r["impl"], r["model"], r.get("layers"), r["batch"], r["seq"], r["storage"],
            r.get("rounding"), r["compute"], json.dumps(r.get("engine_asked") or {},
                                                        sort_keys=True),
            adapter(r)) + estimate(r)


def latest(rows: list) -> list:
    """[(current rows, earlier rows)] per key: current = the key's rows of its latest call (a
    row skipped for the call's time limit only where nothing else measured the key)."""
    order = {}
    for r in rows:
        order.setdefault(r["call"], len(order))
    by_key = {}
    for r in rows:
        by_key.setdefault(key(r), []).append(r)
    out = []
    for rs in by_key.values():
        rs = [r for r in rs if r.get("status") != "skipped"] or rs  # skipped: never ran
        last = max(order[r["call"]] for r in rs)
        out.append(([r for r in rs if order[r["call"]] == last],
                    [r for r in rs if order[r["call"]] != last]))
    out.sort(key=lambda ce: sort_key(ce[0][0], order))
    return out


MODELS = ("tiny", "gpt2", "gpt2_medium", "gpt2_large", "gpt2_xl", "opt_125m", "opt_350m",
          "opt_1_3b", "opt_2_7b", "opt_6_7b", "opt_13b", "opt_30b", "opt_66b", "opt_175b")
STORAGES = ("bfloat16", "float32", "float16", "int8")


def sort_key(r, order) -> tuple:
    rank = lambda v, seq: seq.index(v) if v in seq else len(seq)  # noqa: E731
    return (rank(r["model"], MODELS), r.get("layers") or 0, r["batch"] * r["seq"], r["batch"],
            rank(r["storage"], STORAGES), r["compute"] != "bfloat16", order[r["call"]],
            engine(r))


def by_code(rows: list) -> list:
    """Rows of one call and key, one per code label (repeats: medians), as (row, n)."""
    groups = {}
    for r in rows:
        groups.setdefault(r.get("code"), []).append(r)
    out = []
    for rs in groups.values():
        agg = dict(rs[-1])
        for f in ("zo2_step_s", "mezo_step_s", "x_T_limit", "x_mezo", "zo2_tok_s"):
            agg[f] = median_of(rs, f)
        out.append((agg, len(rs)))
    return out


def earlier(rows: list, field: str, nd=2) -> str:
    seen = []
    for r in rows:
        if r.get(field) is not None:
            label = r["call"] + (f" {r['code']}" if r.get("code") else "")
            seen.append(f"{r[field]:.{nd}f} ({label})")
    return ", ".join(seen[-3:]) or "-"


class Table:
    """A markdown table with footnotes and the calls its rows come from."""

    def __init__(self, title: str, what: str, columns: list, notes: bool = False):
        self.title, self.what, self.columns, self.use_notes = title, what, columns, notes
        self.cells, self.notes, self.calls, self.after = [], [], {}, []

    def add(self, cells: list, rows: list) -> None:
        marks = ""
        for r in rows:
            self.calls.setdefault(r["call"], []).append(r)
            if self.use_notes and r.get("note"):
                if r["note"] not in self.notes:
                    self.notes.append(r["note"])
                marks += f"[{self.notes.index(r['note']) + 1}]"
            if r.get("status", "ok") != "ok":
                err = (r.get("error") or r.get("zo2_error") or "")[:60].replace("|", "/")
                cells = cells[:1] + [f"**{r['status']}**: {err}"] + [""] * (len(cells) - 3) \
                    + cells[-1:]
        self.cells.append(cells[:-1] + [cells[-1] + marks])

    def render(self) -> list:
        if not self.cells:
            return []
        keep = [i for i, c in enumerate(self.columns)
                if c != "code" or any(row[i] != "-" for row in self.cells)]
        line = lambda cells: "| " + " | ".join(cells[i] for i in keep) + " |"  # noqa: E731
        out = [f"## {self.title}", "", textwrap.fill(self.what, 100), "", line(self.columns),
               "|" + "---|" * len(keep)]
        out += [line(c) for c in self.cells] + [""]
        if self.notes:
            out += [f"[{i}] {n}" for i, n in enumerate(self.notes, 1)] + [""]
        if self.after:
            out += self.after + [""]
        return out + call_lines(self.calls, ORDER) + [""]


def call_lines(calls: dict, order: dict) -> list:
    """One line per group of calls with the same card, host, date, commits and versions, oldest
    call first."""
    groups = {}
    for call, rows in sorted(calls.items(), key=lambda cr: order.get(cr[0], 0)):
        r, commits = rows[0], []
        for x in rows:
            c = code(x) if x.get("code") not in (None, "reference") else (
                ("reference " if x.get("code") == "reference" else "")
                + (x["commit"][:7] if x["commit"] != "not recorded" else x["commit"]))
            if c not in commits:
                commits.append(c)
        host = f" ({r['host']})" if r.get("host") else ""
        sw = f", jax {r['jax']}" if r.get("jax") else ""
        sw += f", torch {x['torch']}" if any(x.get("torch") for x in rows) else ""
        what = f"{r['card']}{host}, {r['date']}, commit {', '.join(commits)}{sw}"
        groups.setdefault(what, []).append((call, r, dict.fromkeys(x["command"] for x in rows)))
    out = []
    for what, cs in groups.items():  # every command of a call (one call can run several)
        cmds = ", ".join(f"`{c}`" for _, _, commands in cs for c in commands)
        hist = sorted({r["history"] for _, r, _ in cs if r.get("history")})
        where = f" (in git at {', '.join(hist)})" if hist else ""
        out.append(f"- **{', '.join(c for c, _, _ in cs)}**: {what}: {cmds}{where}")
    return out


# ---- the questions ----------------------------------------------------------------------------

def ours(rows, speed=True, plain=True):
    """Our matrix rows (the OPT-175B shape's or the others'); `plain`: MeZO's estimate with one
    Gaussian direction only (the other estimates have their own table)."""
    return [r for r in rows if r.get("impl") == "zo2_jax" and r.get("kind", "speed") == "speed"
            and (r["model"] != BIG) == speed and (not plain or (estimate(r) == (
                1, "mezo", "gaussian") and adapter(r) == "none"))]


def speed_table(rows) -> Table:
    t = Table("Speed against the bus limit and against MeZO",
              "ZO2's step time over T_limit (lower is better; 1.00 = at the bound). P_s is per "
              "direction; what T_limit is in brackets: C (MeZO's step) or the bus (\"no C\": "
              "MeZO did not run in that process). Against MeZO: ZO2's tokens/s over MeZO's "
              "(everything resident) in the same process (higher is better; from an earlier "
              "call, named, where the latest did not run MeZO). \"earlier\": step / T_limit in "
              "older calls.",
              ["model", "B x T", "storage / compute", "engine", "code", "ZO2 ms", "tok/s",
               "P_s GB", "T_limit ms", "step / T_limit", "MeZO ms", "vs MeZO", "earlier",
               "call"], notes=True)
    for cur, old in latest([r for r in ours(rows) if r.get("x_T_limit") is not None
                            or r.get("x_mezo") is not None or r.get("status", "ok") != "ok"]):
        for r, n in by_code(cur):
            m, used = r, cur
            if r.get("x_mezo") is None:  # MeZO from the latest call that ran it
                with_mezo = [x for x in old if x.get("x_mezo") is not None]
                m = with_mezo[-1] if with_mezo else r
                used = cur + with_mezo[-1:]
            vs = f"**{num(m.get('x_mezo'))}**" if m.get("x_mezo") is not None else "-"
            mezo_ms = ms(m.get("mezo_step_s")) if m.get("x_mezo") is not None else "-"
            if m is not r and m.get("x_mezo") is not None:
                vs += f" ({m['call']})"
            limit = (f"{ms(r.get('T_limit_s'))} ({bound(r)})" if r.get("T_limit_s") is not None
                     else "-")
            t.add([shape(r), f"{r['batch']}x{r['seq']}", f"{storage(r)} / {short(r['compute'])}",
                   engine(r), code(r) + (f" (n={n})" if n > 1 else ""),
                   ms(r.get("zo2_step_s")), num(r.get("zo2_tok_s"), 0),
                   gb(r.get("streamed_bytes")), limit,
                   f"**{num(r.get('x_T_limit'))}**", mezo_ms, vs,
                   earlier(old, "x_T_limit"), r["call"]], used)
    return t


def memory_table(rows) -> Table:
    t = Table("Device and host memory against MeZO",
              "Peak device memory (XLA's peak_bytes_in_use) and peak host RSS (VmHWM, reset before "
              "each engine is built) in GB. MeZO ran after ZO2 in the same process, so its device "
              "peak is at least ZO2's (\"<=\": equal, MeZO's own is not separated).",
              ["model", "B x T", "storage / compute", "engine", "code", "ZO2 device",
               "MeZO device", "ZO2 host", "MeZO host", "call"])
    mem = [r for r in ours(rows) if r.get("zo2_peak_device_bytes")]
    for cur, old in latest(mem):
        for r, _ in by_code(cur):
            m, used = r, cur
            if not r.get("mezo_peak_device_bytes"):  # MeZO from the latest call that ran it
                with_mezo = [x for x in old if x.get("mezo_peak_device_bytes")]
                m = with_mezo[-1] if with_mezo else r
                used = cur + with_mezo[-1:]
            md = m.get("mezo_peak_device_bytes")
            mezo_dev = "-" if md is None else (
                "<=" if md == m.get("zo2_peak_device_bytes") else "") + gb(md)
            if m is not r and md is not None:
                mezo_dev += f" ({m['call']})"
            t.add([shape(r), f"{r['batch']}x{r['seq']}", f"{storage(r)} / {short(r['compute'])}",
                   engine(r), code(r), f"**{gb(r['zo2_peak_device_bytes'])}**", mezo_dev,
                   gb(r.get("zo2_host_peak_bytes"), 1), gb(m.get("mezo_host_peak_bytes"), 1),
                   r["call"]], used)
    return t


def big_table(rows) -> Table:
    t = Table("The OPT-175B block shape",
              "OPT-175B's blocks (3.6 GB each in bf16) at 4 layers or more, ZO2 alone; the device "
              "peak does not grow with depth. \"not separated\": timed on an engine that "
              "another setting had set the process's peak on.",
              ["layers", "storage / compute", "engine", "code", "s/step", "tok/s", "P_s GB",
               "T_bus s", "step / T_bus", "device GB", "host GB", "call"])
    for cur, _ in sorted(latest(ours(rows, speed=False)), key=lambda ce: (
            ce[0][0]["layers"], ce[0][0]["storage"] != "bfloat16", engine(ce[0][0]))):
        for r, _ in by_code(cur):
            x = r["zo2_step_s"] / r["T_bus_s"] if r.get("zo2_step_s") and r.get("T_bus_s") \
                else None
            dev = r.get("zo2_peak_device_bytes")
            t.add([str(r["layers"]), f"{storage(r)} / {short(r['compute'])}", engine(r),
                   code(r), num(r.get("zo2_step_s"), 3),
                   num(r.get("zo2_tok_s"), 0), gb(r.get("streamed_bytes"), 1),
                   num(r.get("T_bus_s"), 3), f"**{num(x)}**",
                   f"**{gb(dev)}**" if dev else "not separated",
                   gb(r.get("zo2_host_peak_bytes"), 1), r["call"]], cur)
    return t


def reference_table(rows) -> Table:
    t = Table("Against the reference",
              "The PyTorch reference ZO2 (github.com/liangyuwang/zo2, nanoGPT path) and ours on "
              "the same card in the same call.",
              ["implementation", "model", "B x T", "host / compute", "tok/s", "step ms",
               "peak device GB", "call"])
    ref = [r for r in rows if r.get("impl") == "reference_zo2"]
    last = {(r["model"], r["batch"], r["seq"]): r["call"] for r in ref}  # the latest call
    for (model, b, s), call in last.items():
        same = lambda r: (r["call"], r["model"], r["batch"], r["seq"]) == (  # noqa: E731
            call, model, b, s)
        mine = [r for r in ours(rows) if same(r) and r.get("zo2_tok_s")]
        theirs = [r for r in ref if same(r)]
        for r in mine + theirs:
            m = "mezo" if r.get("mezo_step_s") and not r.get("zo2_step_s") else "zo2"
            name = ("zo2_jax ZO2" + (f" ({r['code']})" if r.get("code") else "")
                    if r["impl"] == "zo2_jax" else f"reference {'MeZO' if m == 'mezo' else 'ZO2'}")
            t.add([name, model, f"{b}x{s}", f"{storage(r)} / {short(r['compute'])}",
                   f"**{num(r.get(f'{m}_tok_s'), 0)}**", ms(r.get(f"{m}_step_s")),
                   gb(r.get(f"{m}_peak_device_bytes")), call], [r])
        zo2 = [r for r in theirs if r.get("zo2_tok_s")]
        if mine and zo2:
            o, th = (max(rs, key=lambda r: r["zo2_tok_s"]) for rs in (mine, zo2))
            line = (f"Ours over the reference at {model} {b}x{s}: best against best "
                    f"**{o['zo2_tok_s'] / th['zo2_tok_s']:.2f}x** ({storage(o)} / "
                    f"{short(o['compute'])} against its {short(th['compute'])})")
            o32 = [r for r in mine if r["storage"] == r["compute"] == "float32"]
            t32 = [r for r in zo2 if r["compute"] == "float32"]
            if o32 and t32:
                line += f"; fp32 against fp32 **{o32[0]['zo2_tok_s'] / t32[0]['zo2_tok_s']:.2f}x**"
            t.after.append(line + ".")
    return t


def precision_table(rows) -> Table:
    prec = [r for r in rows if r.get("kind") == "precision"]
    last = prec[-1]["call"] if prec else None
    prec = [r for r in prec if r["call"] == last]
    t = Table("Host storage precision",
              prec[0]["setup"] if prec else "", ["host storage", "accuracy before",
                                                 "accuracy after", "mean loss, last 20 steps",
                                                 "update vs fp32's (cosine)", "call"])
    for r in prec:
        t.add([r["setting"], num(r["acc_before"], 3), f"**{num(r['acc_after'], 3)}**",
               num(r["final_mean_loss"]), num(r.get("cos_to_fp32_update")), r["call"]], [r])
    return t


def _start_end(r, k, fmt) -> str:
    s, e, g = r.get(f"{k}_start"), r.get(f"{k}_end"), r.get(f"{k}_growth_pct")
    if s is None or e is None:
        return "-"
    return f"{fmt(s)} -> {fmt(e)}" + ("" if g is None else f" ({g:+.2f}%)")


def soak_table(rows) -> Table:
    soak = [r for r in rows if r.get("probe") == "soak" and r.get("card") != "cpu"]
    t = Table("Long runs: memory at the start and the end",
              "soak.py: eval and checkpoint every `every` steps; sampled after them, first "
              "and last cycle.",
              ["model", "B x T", "storage / compute", "steps (every)", "host RSS",
               "device in use", "pinned host", "live arrays", "call"])
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    for r in soak[-4:]:
        t.add([shape(r), f"{r['batch']}x{r['seq']}", f"{short(r['storage'])} / "
               f"{short(r['compute'])}", f"{r['steps']} ({r['every']})",
               _start_end(r, "rss", mib), _start_end(r, "device_bytes_in_use", mib),
               _start_end(r, "live_pinned_host_bytes", mib),
               _start_end(r, "live_arrays", str), r["call"]], [r])
    return t


def mesh_table(rows) -> Table:
    mesh = [r for r in rows if r.get("probe") == "mesh"]
    calls = list(dict.fromkeys(r["call"] for r in mesh))[-1:]  # the latest call
    mesh = [r for r in mesh if r["call"] in calls]
    t = Table("The mesh path against the one-device path",
              "mesh_probe.py, one process, same keys; `same`: losses and g bit for bit equal.",
              ["model", "B x T", "path", "packed", "devices", "parallel", "q", "step", "tokens/s",
               "vs one device", "same", "peak device", "call"])
    for r in mesh:
        t.add([shape(r), f"{r['batch']}x{r['seq']}", r["path"],
               {True: "yes", False: "no", None: "-"}[r.get("packed")], str(r["devices"]),
               r.get("parallel") or "-", str(r["num_directions"]), ms(r["step_s"]),
               f"{r['tokens_per_s']:,.0f}", num(r.get("speed_vs_one_device")),
               {True: "yes", False: "**no**", None: "-"}[r.get("same_as_one_device")],
               gb(r.get("peak_device_bytes")), r["call"]], [r])
    return t


ORDER = {}  # call -> its place in the record (oldest first)


def directions_table(rows) -> Table:
    """Matrix calls that ran q > 1 (or another estimator): directions per second against q = 1
    (MeZO-SGD, the same distribution of z) of the same call, model and shape."""
    mine = [r for r in rows if r.get("impl") == "zo2_jax" and r.get("kind", "speed") == "speed"
            and r.get("zo2_step_s") and adapter(r) == "none"]
    calls = {r["call"] for r in mine if estimate(r)[:2] != (1, "mezo")}
    t = Table("Directions per second: the idle compute of a bus-bound step",
              "ZO2 steps with q directions (two forward passes each; FZOO: q + 1 passes in all) "
              "in one call; directions/s = q / step time, against the q = 1 MeZO-SGD row of the "
              "same call, model, shape and distribution of z. MeZO ms: the all-resident step, "
              "the compute alone (timeout: it did not finish in the row's time).",
              ["model", "B x T", "storage / compute", "estimator", "q", "ZO2 ms", "MeZO ms",
               "directions/s", "vs q = 1", "step / T_limit", "call"])
    for call in [c for c in ORDER if c in calls][-1:]:  # the latest such call
        group = sorted((r for r in mine if r["call"] == call),
                       key=lambda r: (sort_key(r, ORDER), estimate(r)))
        for r in group:
            q, est, dirs = estimate(r)
            base = [b for b in group if (b["model"], b["batch"], b["seq"]) == (
                r["model"], r["batch"], r["seq"]) and estimate(b) == (1, "mezo", dirs)]
            rate = q / r["zo2_step_s"]
            vs = rate / (1 / base[0]["zo2_step_s"]) if base else None
            mezo = (ms(r["mezo_step_s"]) if r.get("mezo_step_s") else
                    r["status"] if r.get("status", "ok") != "ok" else "-")
            t.add([shape(r), f"{r['batch']}x{r['seq']}", f"{storage(r)} / {short(r['compute'])}",
                   f"{est} ({dirs})", str(q), ms(r["zo2_step_s"]), mezo, num(rate, 1),
                   f"**{num(vs)}**" if vs else "-", num(r.get("x_T_limit")), r["call"]],
                  [dict(r, status="ok")])  # ZO2 was timed: a later phase's failure is its cell
    return t


def adapter_table(rows) -> Table:
    """Matrix calls with adapter rows (each key's latest row): each adapter row against
    full-parameter ZO2 (the latest such call's row of the same model, shape and storage without
    adapters; on the same card, as every call is)."""
    mine = [r for r in rows if r.get("impl") == "zo2_jax" and r.get("kind", "speed") == "speed"]
    calls = {r["call"] for r in mine if adapter(r) != "none"}
    t = Table("Adapters: LoRA and prefix tuning over a frozen, read-only base",
              "ZO2 with LoRA adapters or a prefix over a frozen base (bf16, or kept in a GGUF block format "
              "and dequantised on the device), which is uploaded every step and never written "
              "back (P_up up, P_down down: the adapters and their optimiser state), against "
              "full-parameter ZO2 (the row of the same model and shape). T_bus = max(P_up / "
              "B_up, P_down / B_down, (P_up + P_down) / B_bi). MeZO ms: everything resident, "
              "the compute (in brackets: taken from that row of the same shape). step / "
              "T_limit, T_limit = max(T_bus, MeZO): lower is better, 1.00 at the bound.",
              ["model", "B x T", "storage / compute", "adapter", "ZO2 ms", "P_up GB",
               "P_down GB", "T_bus ms", "MeZO ms", "step / T_limit", "vs full ZO2",
               "ZO2 device GB", "call"])
    latest_of = {}  # of the calls with adapter rows, each key's latest row
    for r in sorted((r for r in mine if r["call"] in calls), key=lambda r: ORDER[r["call"]]):
        latest_of[key(r)] = r
    group = sorted(latest_of.values(), key=lambda r: (sort_key(r, ORDER), adapter(r) != "none"))
    for r in group:
        full = [b for b in group if adapter(b) == "none" and b.get("zo2_step_s") and (
            b["model"], b.get("layers"), b["batch"], b["seq"], b["storage"]) == (
            r["model"], r.get("layers"), r["batch"], r["seq"], r["storage"])]
        vs = (full[0]["zo2_step_s"] / r["zo2_step_s"]
              if full and adapter(r) != "none" and r.get("zo2_step_s") else None)
        t_bus = r.get("T_bus_s")
        # MeZO (the compute): the row's own, else an adapter row's of the same model and shape
        m = r if r.get("mezo_step_s") else next(
            (b for b in group if b.get("mezo_step_s") and (adapter(b) == "none") == (
                adapter(r) == "none") and (b["model"], b.get("layers"), b["batch"], b["seq"])
             == (r["model"], r.get("layers"), r["batch"], r["seq"])), None)
        mezo = m["mezo_step_s"] if m else None
        limit = max(t_bus, mezo or 0.0) if t_bus else None
        t.add([shape(r), f"{r['batch']}x{r['seq']}", f"{storage(r)} / {short(r['compute'])}",
               adapter(r), ms(r.get("zo2_step_s")), gb(r.get("streamed_bytes")),
               gb(r.get("written_bytes") or r.get("streamed_bytes")), ms(t_bus),
               "-" if mezo is None else ms(mezo) + ("" if m is r else f" ({adapter(m)})"),
               f"**{num(r['zo2_step_s'] / limit)}**" if limit and r.get("zo2_step_s") else "-",
               f"**{num(vs)}x**" if vs else "-",
               gb(r.get("zo2_peak_device_bytes")), r["call"]], [r])
    return t


def time_to_accuracy_table(rows) -> Table:
    """Per task, the latest time_to_accuracy call of each question (estimators, or adapters: a
    call with a lora or prefix method): one row per method."""
    mine = [r for r in rows if r.get("probe") == "time_to_accuracy" and r.get("kind") == "summary"]
    t = Table("Time to accuracy against MeZO-SGD: estimators and adapters",
              "benchmarks/time_to_accuracy.py: every method the same budget of forward passes; the "
              "target is MeZO-SGD's mean final value over the seeds. Forward passes to the target: "
              "the mean over seeds where every seed got there, and where the seeds' mean curve "
              "got there (its fraction of MeZO-SGD's budget in bold). Best: the mean curve's best "
              "value @ forward passes. Seconds: training steps only, mean over seeds.",
              ["task", "model", "method", "seeds", "final", "target", "passes (each seed)",
               "passes (mean curve)", "of MeZO's budget", "best @ passes", "s to target",
               "call"], notes=True)
    for task in dict.fromkeys(r["task"] for r in mine):
        by_call = {}
        for r in mine:
            if r["task"] == task:
                by_call.setdefault(r["call"], []).append(r)
        latest = {}  # question -> its latest call
        for call in sorted(by_call, key=lambda c: ORDER.get(c, 0)):
            latest[any(a in r["method"] for a in ("lora", "prefix")
                       for r in by_call[call])] = call
        for call in sorted(latest.values(), key=lambda c: ORDER.get(c, 0)):
            for r in by_call[call]:
                p, c = r.get("passes_to_target_mean"), r.get("mean_curve_passes_to_target")
                digits = 3 if task == "sentiment" else 4
                best = (f"{r['best_of_mean_curve']:.{digits}f} @ {r['best_at_passes']:.0f}"
                        if r.get("best_of_mean_curve") is not None else "-")
                seeds = str(len(r["seeds"])) + (f" (+{len(r['incomplete_seeds'])} cut short)"
                                                if r.get("incomplete_seeds") else "")
                t.add([task, r["model"], r["method"], seeds, num(r.get("final_mean"), digits),
                       num(r["target"], digits), "-" if p is None else f"{p:.0f}",
                       "-" if c is None else f"{c:.0f}",
                       f"**{num(r.get('mean_curve_fraction_of_baseline'))}**",
                       best, num(r.get("seconds_to_target_mean"), 1), r["call"]],
                      # no seed reached the budget: the seeds cell says so; the setup a note
                      [dict(r, status="ok", note=r.get("setup"))])
            plots = sorted({x["plot"] for x in by_call[call] if x.get("plot")})
            t.after += [f"Curves ({task}, each seed and their mean, against forward passes "
                        f"and seconds): {p}" for p in plots]
    return t


def render(rows: list) -> str:
    ORDER.clear()
    for r in rows:
        ORDER.setdefault(r["call"], len(ORDER))
    out = [HEADER]
    for make in (speed_table, memory_table, big_table, reference_table,
                 precision_table, soak_table, mesh_table, directions_table, adapter_table,
                 time_to_accuracy_table):
        out += make(rows).render()
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("record", nargs="+", help="JSONL record file(s), oldest first")
    p.add_argument("--write", metavar="FILE", help="write to FILE instead of stdout")
    a = p.parse_args(argv)
    text = render(load(a.record))
    if a.write:
        with open(a.write, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
