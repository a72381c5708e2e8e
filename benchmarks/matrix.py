"""The benchmark matrix: ZO2 (and MeZO beside it) over rows of model shapes, for one or more code
trees side by side; appends one record row per (row, code) to a JSONL file (BENCHMARKS.md's
source, printed by benchmarks/table.py).

    python benchmarks/matrix.py --code old=../old-checkout --code new=. \\
        --row opt_1_3b:1x2048 --row opt_6_7b:1x2048 --row opt_175b:1x2048,layers=4,mezo=no \\
        --out benchmarks/record.jsonl

A row is MODEL:BATCHxSEQ[,key=value...]: MODEL a preset in the reference's nanoGPT shape (GPT-2
blocks at OPT sizes, vocab 50304, untied head; "tiny" for a quick CPU run); keys layers, vocab,
storage, rounding, compute, attn, mezo (auto: where it fits the device, yes, no), steps, warmup,
and ZO2's max_inflight, packed, branches, blocks_per_call, resident_blocks (given: passed to the
engine; left out: its defaults). Every (row, code) runs in its own process with PYTHONPATH set to
that code tree, in the order row 1 code 1, row 1 code 2, row 2 code 1, ... (code order reversed on
every other repeat), so old and new code see the same machine. A process builds ZO2 from random
weights made block by block on the device, times it, then MeZO (all resident) where asked, then
measures the pinned bandwidths. Per row: the median step time over the timed steps (metrics read
one step late, as a training loop does), tokens/s, peak device memory, peak host RSS, P_s (streamed
bytes per step), B_up, B_down, B_bi, and T_limit = max(C, P_s/B_up, P_s/B_down, 2 P_s/B_bi) with C
the MeZO step time where MeZO ran. A row that fails (out of memory, timeout, crash) is written with
its status. The workers use only the packages' public API (zo2_jax.models, zo2_jax.zo,
zo2_jax.offload, the engines' step/streamed_bytes), so any checkout can be measured.

Old against new code: one --code per tree. A tree without git metadata of its own (an export, a
copy on another machine) is named with @COMMIT (+ for uncommitted changes), e.g.

    mkdir -p third_party/old && git archive 538c58f zo2_jax | tar -x -C third_party/old
    python benchmarks/matrix.py --code old=third_party/old@538c58f --code new=.@6c2bfb4+ --row ...

(on a machine where the checkout has its .git, --code new=. finds its commit itself).

`--reference ZO2_CHECKOUT` also times the PyTorch reference (benchmarks/reference_zo2.py) on the
rows it has (presets without layers/vocab changes), in the same call. Then regenerate the tables:
`python benchmarks/table.py benchmarks/record.jsonl --write BENCHMARKS.md`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = 1
ENV_KEYS = ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "XLA_FLAGS")
ENGINE_KEYS = ("max_inflight", "packed", "branches", "blocks_per_call", "resident_blocks")
_yes_no = {"yes": True, "no": False}
ROW_KEYS = {  # key -> parser of its value
    "layers": int, "vocab": int, "steps": int, "warmup": int,
    "storage": lambda v: _choice(v, ("float32", "bfloat16", "float16", "int8")),
    "rounding": lambda v: _choice(v, ("nearest", "stochastic")),
    "compute": lambda v: _choice(v, ("float32", "bfloat16")),
    "attn": lambda v: _choice(v, ("xla", "cudnn")),
    "mezo": lambda v: _choice(v, ("auto", "yes", "no")),
    "max_inflight": int, "blocks_per_call": int, "resident_blocks": int,
    "packed": lambda v: _yes_no[_choice(v, ("yes", "no"))],
    "branches": lambda v: _choice(v, ("fused", "sequential")),
    # the estimate (both engines): directions per step, the estimator, the distribution of z
    "q": int,
    "estimator": lambda v: _choice(v, ("mezo", "fzoo", "sparse", "hizoo")),
    "directions": lambda v: _choice(v, ("gaussian", "rademacher")),
    # LoRA adapters (rank lora_rank) on every attention and MLP matrix over a frozen base
    # or (prefix) num_prefix virtual tokens' keys and values per layer (MeZO-prefix)
    "adapter": lambda v: _choice(v, ("none", "lora", "prefix")),
    "lora_rank": int,
    "num_prefix": int,
    # adapter=lora: the frozen base's block matrices in a GGUF block format (made on the device)
    "base": lambda v: _choice(v, ("storage", "Q8_0", "Q4_0")),
}
ESTIMATE_DEFAULTS = {"q": 1, "estimator": "mezo", "directions": "gaussian", "adapter": "none"}


def _choice(v: str, allowed: tuple) -> str:
    if v not in allowed:
        raise ValueError(f"{v!r} is not one of {', '.join(allowed)}")
    return v


def parse_row(text: str, defaults: dict) -> dict:
    """'opt_1_3b:1x2048,layers=4' -> {'model', 'batch', 'seq', ...settings, 'engine_asked'}."""
    head, *pairs = text.split(",")
    try:
        model, shape = head.split(":")
        batch, seq = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--row {text!r}: expected MODEL:BATCHxSEQ[,key=value...]")
    row = dict(defaults, model=model, batch=batch, seq=seq, engine_asked={})
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in ROW_KEYS:
            raise SystemExit(f"--row {text!r}: unknown key {key!r}; keys: {', '.join(ROW_KEYS)}")
        if key in ENGINE_KEYS and value == "auto":
            continue  # the engine's default
        try:
            parsed = ROW_KEYS[key](value)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"--row {text!r}: {key}={value!r}: {e}")
        (row["engine_asked"] if key in ENGINE_KEYS else row)[key] = parsed
    for key, value in ESTIMATE_DEFAULTS.items():
        row.setdefault(key, value)
    if row["q"] < 1 or (row["estimator"] == "fzoo" and row["q"] < 2):
        raise SystemExit(f"--row {text!r}: q must be >= 1 (>= 2 with estimator=fzoo)")
    return row


def git_identity(path: str) -> tuple:
    """(commit, dirty) of the git checkout whose top level is `path` (None, None where it is not
    one); dirty: zo2_jax/ differs from the commit (tracked or new files). Read-only: no lock, no
    index refresh."""
    git = ["git", "--no-optional-locks", "-C", path]
    try:
        top = subprocess.run(git + ["rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if os.path.realpath(top) != os.path.realpath(path):
            return None, None  # a folder inside another checkout: its commit is not this tree's
        commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(git + ["status", "--porcelain", "--", "zo2_jax"],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def parse_code(text: str) -> tuple:
    """'LABEL=PATH[@COMMIT[+]]' -> (label, absolute path, commit, dirty). The commit comes from
    git where PATH is a checkout's top level; @COMMIT names it where it is not (an exported tree,
    a copy without .git), '+' marking uncommitted changes."""
    label, sep, rest = text.partition("=")
    path, _, given = rest.partition("@")
    if not sep or not label or not os.path.isdir(os.path.join(path, "zo2_jax")):
        raise SystemExit(f"--code {text!r}: expected LABEL=PATH[@COMMIT] of a checkout with "
                         f"zo2_jax/")
    commit, dirty = git_identity(path)
    if given:
        given_commit, given_dirty = given.rstrip("+"), given.endswith("+")
        if commit and not commit.startswith(given_commit):
            raise SystemExit(f"--code {text!r}: {path} is a checkout of {commit[:12]}")
        if not commit:
            commit, dirty = given_commit, given_dirty
    return label, os.path.abspath(path), commit or "not recorded", dirty


def command_line(argv: list) -> str:
    """The exact command, with the environment variables that change what is measured."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ENV_KEYS if k in os.environ]
    script = os.path.relpath(os.path.abspath(sys.argv[0]))
    return " ".join(env + ["python", script] + [shlex.quote(x) for x in argv])


# ---- measuring, in the worker process (also used by the probes) ---------------------------------

TINY = dict(hidden_size=64, num_layers=2, num_heads=4)  # "tiny": quick CPU runs and tests


def nanogpt_shape(name: str, seq: int, layers: int = None, vocab: int = None):
    """The reference's nanoGPT shape of preset `name` (or "tiny"): GPT-2 blocks (GELU, 4x MLP,
    pre-LN, learned positions, biases) at its sizes, vocab 50304, untied head."""
    import zo2_jax.models as zm

    base = TINY if name == "tiny" else {k: getattr(zm.preset(name), k) for k in TINY}
    d = base["hidden_size"]
    return zm.DecoderConfig(model_type="gpt2", vocab_size=vocab or 50304, hidden_size=d,
                            num_layers=layers or base["num_layers"], num_heads=base["num_heads"],
                            intermediate_size=4 * d, max_positions=max(seq, 1024),
                            activation="gelu_new", tie_embeddings=False)


def lazy_params(model, dtype, seed: int = 0) -> dict:
    """Random parameters with each block a callable, made on the device by one jitted function
    when the engine asks for it: no second copy of the model anywhere."""
    import jax

    key = jax.random.key(seed)
    init_b = jax.jit(lambda k: model.init_block(k, dtype))
    outer = jax.jit(lambda k: model.init_outer(k, dtype))(jax.random.fold_in(key, 2 ** 31 - 1))
    return {"outer": outer, "blocks": [lambda i=i: init_b(jax.random.fold_in(key, i))
                                       for i in range(model.num_blocks)]}


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp

    ids = jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}


def time_steps(engine, batch, steps: int, warmup: int, around=contextlib.nullcontext) -> dict:
    """Step times of `engine`: `warmup` untimed steps, then `steps` timed ones, each step's loss
    read one step late (the host stays a step ahead, as in training). A step's time is the
    interval between the host seeing it and the step before it complete; `around()` is entered
    for the timed steps only (e.g. a profiler trace)."""
    import jax
    import numpy as np

    key = jax.random.key(1)
    prev = None
    for s in range(warmup):
        prev = engine.step(batch, jax.random.fold_in(key, s))
    jax.block_until_ready(prev)
    done = []
    with around():
        t0 = time.perf_counter()
        for s in range(steps):
            m = engine.step(batch, jax.random.fold_in(key, warmup + s))
            if s:
                float(prev["loss"])  # step s-1 is complete
                done.append(time.perf_counter())
            prev = m
        jax.block_until_ready(prev)
        done.append(time.perf_counter())
    times = np.diff([t0] + done)
    return {"step_s": float(np.median(times)), "step_s_mean": float(np.mean(times)),
            "steps_s": [round(float(t), 6) for t in times],
            "loss_finite": bool(np.isfinite(float(prev["loss"])))}


def bandwidth(nbytes: int, reps: int = 5) -> dict:
    """Pinned host <-> device bandwidths in GB/s with jax.device_put, as the engine moves blocks:
    median of `reps` transfers of `nbytes`, each way alone and both ways at once."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    dev = jax.devices()[0]
    d_s = jax.sharding.SingleDeviceSharding(dev)
    h_s = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    n = nbytes // 4
    x_dev = jax.device_put(jnp.ones((n,), jnp.float32), d_s)
    x_host = jax.device_put(x_dev, h_s)
    y_dev = jax.device_put(jnp.zeros((n,), jnp.float32), d_s)
    for _ in range(2):  # warm the pinned pool
        jax.block_until_ready((jax.device_put(x_dev, h_s), jax.device_put(x_host, d_s)))

    def median_s(fn):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    up = median_s(lambda: jax.device_put(x_host, d_s))
    down = median_s(lambda: jax.device_put(x_dev, h_s))
    both = median_s(lambda: (jax.device_put(x_host, d_s), jax.device_put(y_dev, h_s)))
    return {"B_up": n * 4 / up / 1e9, "B_down": n * 4 / down / 1e9, "B_bi": 2 * n * 4 / both / 1e9}


def reset_host_peak() -> None:
    """Resets VmHWM to the current RSS (Linux), so each engine's host peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def host_peak_bytes():
    """Peak resident host memory (VmHWM) since the last reset_host_peak(); pinned buffers count
    once touched. None where /proc is not there."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def engine_settings(eng) -> dict:
    """What the engine chose, read from its public attributes (or its plan) where it has them."""
    out = {}
    for name in ENGINE_KEYS + ("hold",):
        v = getattr(eng, name, None)
        if v is None and getattr(eng, "plan", None) is not None:
            v = getattr(eng.plan, name, None)
        if isinstance(v, (set, frozenset, list, tuple)):
            v = len(v)
        out[name] = v if isinstance(v, (bool, int, str)) or v is None else str(v)
    return out


def derive(row: dict) -> dict:
    """T_bus, T_limit (and what bounds it), x T_limit and x MeZO from a row's measurements."""
    ps, zo2, mezo = row.get("streamed_bytes"), row.get("zo2_step_s"), row.get("mezo_step_s")
    if ps and row.get("B_up"):
        pw = row.get("written_bytes") or ps  # a frozen base is not written back
        t_bus = max(ps / (row["B_up"] * 1e9), pw / (row["B_down"] * 1e9),
                    (ps + pw) / (row["B_bi"] * 1e9))
        row["T_bus_s"] = t_bus
        row["T_limit_s"] = max(t_bus, mezo or 0.0)
        row["bound"] = "compute" if mezo and mezo > t_bus else "bus"
        if zo2:
            row["x_T_limit"] = zo2 / row["T_limit_s"]
    if zo2 and mezo:
        row["x_mezo"] = mezo / zo2  # ZO2's tokens/s over MeZO's
    return row


def _error(e: BaseException) -> tuple:
    text = f"{type(e).__name__}: {str(e).strip()}"[:400]
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    return ("oom" if oom else "failed"), text


def measure(row: dict, save, say) -> dict:
    """The worker: one (row, code) in this process. `save(row)` after each engine, so a row
    killed at its time limit keeps what it measured."""
    import jax
    import jax.numpy as jnp

    import zo2_jax
    import zo2_jax.models as zm
    from zo2_jax.offload import Storage, ZO2Engine
    from zo2_jax.zo import MeZOEngine, mezo_sgd

    tree = os.path.realpath(row["code_path"])
    if not os.path.realpath(zo2_jax.__file__).startswith(tree + os.sep):
        raise RuntimeError(f"zo2_jax was imported from {zo2_jax.__file__}, not from {tree}")
    dev = jax.devices()[0]
    row.update(card=dev.device_kind, platform=dev.platform, jax=jax.__version__)
    cfg = nanogpt_shape(row["model"], row["seq"], row.get("layers"), row.get("vocab"))
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[row["compute"]]
    attn = row.get("attn") or ("cudnn" if dev.platform == "gpu" and compute != jnp.float32
                               else "xla")
    model = zm.Model(cfg, compute, attn)
    row.update(layers=cfg.num_layers, vocab=cfg.vocab_size, params=cfg.num_params, attn=attn)
    init_dtype = jnp.float32 if row["storage"] == "float32" else jnp.bfloat16
    make_params = lambda: lazy_params(model, init_dtype)  # noqa: E731
    if row.get("adapter", "none") in ("lora", "prefix"):
        from zo2_jax.models.lora import lora
        from zo2_jax.models.prefix import PrefixModel

        base = model
        if row["adapter"] == "lora":
            model = lora(base, row.get("lora_rank", 8))
            make_params = lambda: model.adapt(lazy_params(base, init_dtype),  # noqa: E731
                                              jax.random.key(1), init_dtype)
        else:  # random prefixes: the real-activation init would read every block once more
            model = PrefixModel(base, row.get("num_prefix", 5))
            make_params = lambda: model.adapt(lazy_params(base, init_dtype),  # noqa: E731
                                              jax.random.key(1), init_dtype, init="random")
        if row.get("base", "storage") != "storage":
            adapted = make_params
            make_params = lambda: model.quantize_base(adapted(), row["base"])  # noqa: E731
    elif row.get("base", "storage") != "storage":
        raise ValueError("base= quantises a frozen base: it needs adapter=lora or prefix")
    batch = make_batch(cfg, row["batch"], row["seq"])
    common = dict(eps=1e-3, compute_dtype=compute,
                  storage=Storage(row["storage"], rounding=row["rounding"]),
                  num_directions=row.get("q", 1), estimator=row.get("estimator", "mezo"),
                  directions=row.get("directions", "gaussian"))
    stats = lambda: dev.memory_stats() or {}  # noqa: E731  (None on some backends)
    for name in ("zo2", "mezo"):
        if name == "mezo":
            per_param = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1.1}[row["storage"]]
            limit = stats().get("bytes_limit")
            fits = limit is None or 1.5 * per_param * cfg.num_params + 2e9 < limit
            if row["mezo"] == "no" or (row["mezo"] == "auto" and not fits) or "zo2_error" in row:
                row["mezo_run"] = False
                continue
        t = time.perf_counter()
        reset_host_peak()
        eng = params = None
        try:
            params = make_params()
            if name == "zo2":
                eng = ZO2Engine(model, params, mezo_sgd(1e-6, weight_decay=0.0), **common,
                                **row["engine_asked"])
            else:
                eng = MeZOEngine(model, params, mezo_sgd(1e-6, weight_decay=0.0), **common)
            del params
            row[f"{name}_init_s"] = time.perf_counter() - t
            say(f"{name} built in {row[f'{name}_init_s']:.1f} s; timing")
            r = time_steps(eng, batch, row["steps"], row["warmup"])
            row.update({f"{name}_{k}": v for k, v in r.items()})
            row[f"{name}_tok_s"] = row["batch"] * row["seq"] / r["step_s"]
            row[f"{name}_peak_device_bytes"] = stats().get("peak_bytes_in_use")
            row[f"{name}_host_peak_bytes"] = host_peak_bytes()
            if name == "zo2":
                row["streamed_bytes"] = int(eng.streamed_bytes())
                written = getattr(getattr(eng, "plan", None), "written_bytes", None)
                if written is not None:
                    row["written_bytes"] = int(written)
                row["engine"] = engine_settings(eng)
            say(f"{name} {r['step_s'] * 1e3:.2f} ms/step")
            del eng
        except Exception as e:  # an out-of-memory engine is a result, not a crash
            eng = params = None  # its buffers go before the next engine or the bandwidth probe
            status, row[f"{name}_error"] = _error(e)
            if name == "zo2":
                row["status"] = status
            say(f"{name} failed: {row[f'{name}_error'][:200]}")
        if name == "mezo":
            row["mezo_run"] = True
        gc.collect()
        jax.clear_caches()
        save(row)
    try:  # after the engines: the probe's 1 GiB buffers would otherwise set the peak
        row.update(bandwidth(row.pop("bandwidth_bytes")))
    except Exception as e:
        row["bandwidth_error"] = _error(e)[1]
    row.setdefault("status", "ok")
    return derive(row)


def worker(row: dict, result: str) -> int:
    t0 = row.pop("t0")

    def say(msg):
        print(f"[{time.time() - t0:7.1f} s]   {msg}", file=sys.stderr, flush=True)

    def save(r):
        with open(result + ".tmp", "w") as fh:
            json.dump(r, fh)
        os.replace(result + ".tmp", result)

    try:
        save(measure(row, save, say))
    except Exception as e:
        row["status"], row["error"] = _error(e)
        save(row)
        raise
    return 0


# ---- the matrix, in the parent process (no jax here: the workers own the device) ---------------

def _relay(proc, tail: collections.deque) -> None:
    for line in proc.stdout:
        tail.append(line.rstrip())
        print(line.rstrip(), file=sys.stderr, flush=True)


def run_process(cmd: list, env: dict, cwd: str, timeout: float) -> tuple:
    """(returncode or 'timeout', last lines of its output); the whole process group is killed
    at the time limit."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tail = collections.deque(maxlen=30)
    relay = threading.Thread(target=_relay, args=(proc, tail), daemon=True)
    relay.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc = "timeout"
    relay.join(timeout=5)
    return rc, "\n".join(tail)


def run_ours(row: dict, timeout: float) -> dict:
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [row["code_path"],
                                                      os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(row),
           "--result", result]
    rc, tail = run_process(cmd, env, row["code_path"], timeout)
    with open(result) as fh:
        text = fh.read()
    os.remove(result)
    out = json.loads(text) if text else dict(row)
    for k in ("t0", "bandwidth_bytes", "code_path"):
        out.pop(k, None)
    if rc == "timeout":
        out["status"], out["error"] = "timeout", f"killed after {timeout:.0f} s (--row-timeout)"
    elif rc != 0 and out.get("status", "ok") == "ok":
        out["status"], out["error"] = "crashed", f"exit code {rc}: {tail[-400:]}"
    return derive(out)


def run_reference(row: dict, run: str, zo2_path: str, timeout: float) -> dict:
    """The PyTorch reference on `row`'s shape, `run` = 'method:precision', as a record row."""
    method, precision = run.split(":")
    fd, out = tempfile.mkstemp(suffix=".jsonl")
    os.close(fd)
    cmd = [sys.executable, os.path.join(HERE, "reference_zo2.py"), "--model", row["model"],
           "--method", method, "--precision", precision, "--batch", str(row["batch"]),
           "--seq", str(row["seq"]), "--steps", str(row["steps"]), "--warmup",
           str(row["warmup"]), "--zo2-path", zo2_path, "--json-out", out]
    rc, tail = run_process(cmd, dict(os.environ), HERE, timeout)
    with open(out) as fh:
        lines = [ln for ln in fh if ln.strip()]
    os.remove(out)
    raw = json.loads(lines[-1]) if lines else {"method": method, "precision": precision,
                                               "error": f"no result (exit {rc}): {tail[-300:]}"}
    base = {k: row[k] for k in ("call", "command", "date", "repeat", "batch", "seq", "model",
                                "steps", "warmup")}
    return reference_record(raw, base)


def reference_record(raw: dict, base: dict) -> dict:
    """A reference_zo2.py JSON line in the record's format."""
    method, precision = raw.get("method", "zo2"), raw.get("precision")
    gpu = raw.get("gpu_dtype") or {"fp32": "float32", "fp16": "float16",
                                   "bf16": "bfloat16"}.get(precision, "float32")
    rec = dict(base, schema=SCHEMA, impl="reference_zo2", kind="speed", code="reference",
               commit=raw.get("reference_commit") or "not recorded", dirty=None,
               card=raw.get("gpu") or "not recorded", jax=None, torch=raw.get("torch"),
               layers=(raw.get("shape") or {}).get("layers"), params=raw.get("n_params"),
               storage=raw.get("host_dtype") or gpu,
               compute=gpu + (f" (autocast {raw.get('amp_dtype')})" if precision == "amp" else ""),
               rounding=None, engine_asked={"precision": precision}, step_stat="median")
    if raw.get("error"):
        rec["status"], rec[f"{method}_error"] = ("oom" if raw["error"].startswith("OOM")
                                                 else "failed"), raw["error"]
    else:
        rec["status"] = "ok"
        rec.update({f"{method}_step_s": raw["step_s"], f"{method}_tok_s": raw["tokens_per_s"],
                    f"{method}_step_s_mean": raw.get("step_s_mean"),
                    f"{method}_peak_device_bytes": raw.get("peak_gpu_bytes"),
                    f"{method}_init_s": raw.get("init_s"),
                    f"{method}_loss_finite": raw.get("loss_finite")})
    return rec


def summary(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r.get('status')}: {(r.get('error') or r.get('zo2_error') or '')[:160]}"
    parts = []
    for name in ("zo2", "mezo"):
        if r.get(f"{name}_step_s"):
            parts.append(f"{name} {r[f'{name}_step_s'] * 1e3:.2f} ms")
    if r.get("x_T_limit"):
        parts.append(f"{r['x_T_limit']:.3f} x T_limit ({r['bound']})")
    if r.get("x_mezo"):
        parts.append(f"{r['x_mezo']:.3f} x MeZO tok/s")
    return ", ".join(parts)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--row", action="append", default=[], help="MODEL:BxT[,key=value...]")
    p.add_argument("--code", action="append", default=[],
                   help="LABEL=PATH[@COMMIT[+]] of a checkout to measure (repeatable; default "
                        "new=.); @COMMIT where PATH has no git metadata of its own, + for "
                        "uncommitted changes")
    p.add_argument("--out", default=os.path.join(HERE, "record.jsonl"),
                   help="JSONL file the rows are appended to")
    p.add_argument("--storage", default="bfloat16", type=ROW_KEYS["storage"])
    p.add_argument("--rounding", default="stochastic", type=ROW_KEYS["rounding"])
    p.add_argument("--compute", default="bfloat16", type=ROW_KEYS["compute"])
    p.add_argument("--mezo", default="auto", type=ROW_KEYS["mezo"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="the whole matrix this many times")
    p.add_argument("--row-timeout", type=float, default=180, help="seconds per (row, code)")
    p.add_argument("--time-limit", type=float, default=480,
                   help="seconds for the whole call; rows that cannot start are written as "
                        "'skipped'")
    p.add_argument("--min-row-s", type=float, default=20,
                   help="do not start a row with less time than this left")
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="bytes of each probe transfer")
    p.add_argument("--call", help="name of this call in the record (default: the UTC time)")
    p.add_argument("--reference", metavar="ZO2_CHECKOUT",
                   help="also time the PyTorch reference (folder holding its zo2/ package)")
    p.add_argument("--reference-runs", default="zo2:fp16,zo2:fp32",
                   help="method:precision pairs of reference_zo2.py")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.worker and not a.row:
        p.error("give at least one --row")
    if a.steps < 2 or a.warmup < 1 or a.repeats < 1:
        p.error("--steps must be >= 2, --warmup >= 1 (the first step compiles), --repeats >= 1")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker), a.result)
    codes = [parse_code(c) for c in a.code or ["new=."]]
    defaults = dict(storage=a.storage, rounding=a.rounding, compute=a.compute, mezo=a.mezo,
                    steps=a.steps, warmup=a.warmup)
    rows = [parse_row(r, defaults) for r in a.row]
    t0 = time.time()
    call = a.call or time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(t0))
    base = dict(schema=SCHEMA, call=call, command=command_line(argv),
                date=time.strftime("%Y-%m-%d", time.gmtime(t0)))
    jobs = []
    for rep in range(a.repeats):
        for row in rows:
            for label, path, commit, dirty in (codes if rep % 2 == 0 else codes[::-1]):
                jobs.append(dict(base, **row, repeat=rep, impl="zo2_jax", kind="speed",
                                 code=label, code_path=path, commit=commit, dirty=dirty,
                                 step_stat="median"))
            if a.reference and not (row.get("layers") or row.get("vocab")):
                for run in a.reference_runs.split(","):
                    jobs.append(dict(base, **row, repeat=rep, reference_run=run))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for i, job in enumerate(jobs, 1):
        elapsed = time.time() - t0
        left = a.time_limit - elapsed
        what = (f"{job['model']}{'@' + str(job['layers']) if job.get('layers') else ''} "
                f"{job['batch']}x{job['seq']} {job['storage']}/{job['compute']} "
                f"{job.get('code') or 'reference ' + job['reference_run']}")
        print(f"[{elapsed:7.1f} s] {i}/{len(jobs)} {what}", file=sys.stderr, flush=True)
        if left < a.min_row_s:
            rec = dict(job, status="skipped",
                       error=f"{elapsed:.0f} s of the {a.time_limit:.0f} s limit gone")
            rec.pop("code_path", None)
        elif "reference_run" in job:
            rec = run_reference(job, job["reference_run"], a.reference, min(a.row_timeout, left))
        else:
            rec = run_ours(dict(job, t0=t0, bandwidth_bytes=a.bandwidth_mib << 20),
                           min(a.row_timeout, left))
        rec.setdefault("card", "not recorded")
        rec.pop("reference_run", None)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"[{time.time() - t0:7.1f} s] {i}/{len(jobs)} {what}: {summary(rec)}",
              file=sys.stderr, flush=True)
    print(f"[{time.time() - t0:7.1f} s] {len(jobs)} rows appended to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
