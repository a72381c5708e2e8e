"""Several devices, on the CPU: simulated devices in a fresh process, and two real processes.

jax fixes its device count when it starts, so the mesh tests (`mesh_cases.py`) run in a child
pytest with 8 simulated CPU devices, and the multi-process test starts two Python processes that
meet through `jax.distributed.initialize` on 127.0.0.1, with two CPU devices each.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["PYTHONPATH"] = os.pathsep.join([HERE, env.get("PYTHONPATH", "")])
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _mesh_cases(marks: str):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "no:xdist", "-m", marks, os.path.join(HERE, "mesh_cases.py")],
                       env=_env(8), cwd=HERE, capture_output=True, text=True, timeout=2400)
    tail = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, tail
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], tail


def test_mesh_cases_on_8_simulated_devices():
    _mesh_cases("not slow")


@pytest.mark.slow
def test_mesh_cases_on_8_simulated_devices_slow():
    _mesh_cases("slow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = r"""
import json, os, sys
pid, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=120)
import numpy as np, optax
from _toy import MODEL, PARAMS, counting_batch
from zo2_jax.offload import Storage, ZO2Engine
assert len(jax.devices()) == 4 and len(jax.local_devices()) == 2
e = ZO2Engine(MODEL, PARAMS, optax.sgd(1e-3, momentum=0.9), num_directions=4, mesh=4,
              storage=Storage("bfloat16", rounding="stochastic"), max_inflight=2)
assert e.mesh.mode == "directions"
losses = []
for t in range(3):
    m = e.step(counting_batch(jax.random.key(100 + t)), jax.random.key(t))
    losses.append(np.asarray(m["projected_grad"]).tolist())
e.flush()
blocks = [[np.asarray(x).astype(np.float32).tolist() for x in jax.tree.leaves(e.block_state(i))]
          for i in range(e.num_blocks)]
if pid == 0:
    json.dump({"g": losses, "blocks": blocks}, open(out, "w"))
"""


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Two processes (jax.distributed on 127.0.0.1, gloo collectives) with two CPU devices each
    train the toy on one 4-device mesh: the same g and blocks, bit for bit, as one process on one
    device."""
    import optax
    from _toy import MODEL, PARAMS, counting_batch
    from zo2_jax.offload import Storage
    from zo2_jax.zo import MeZOEngine

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, port = tmp_path / "out.json", _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(out)],
                              env=_env(2), cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(x[-3000:] for x in logs)

    one = MeZOEngine(MODEL, PARAMS, optax.sgd(1e-3, momentum=0.9), num_directions=4,
                     storage=Storage("bfloat16", rounding="stochastic"))
    g = []
    for t in range(3):
        m = one.step(counting_batch(jax.random.key(100 + t)), jax.random.key(t))
        g.append(np.asarray(m["projected_grad"]).tolist())
    one.flush()
    got = json.load(open(out))
    assert got["g"] == g
    st = one.state()
    for i in range(one.num_blocks):
        want = [np.asarray(x[i]).astype(np.float32).tolist()
                for x in jax.tree.leaves((st["blocks"], st["opt_blocks"]))]
        assert got["blocks"][i] == want, f"block {i}"


RSS_WORKER = r"""
import ctypes, gc, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from _toy import ToyModel, counting_batch, shared_sgd
from zo2_jax.offload import ZO2Engine

def rss():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

n = int(sys.argv[1])
model = ToyModel(vocab=32, dim=1024, num_blocks=24)
rng = np.random.default_rng(0)
outer = {"embed": rng.standard_normal((32, 1024), np.float32),
         "norm": {"scale": np.ones(1024, np.float32)}}
def block(i):
    r = np.random.default_rng(i)
    return {"w": r.standard_normal((1024, 1024), np.float32) / 32,
            "b": np.zeros(1024, np.float32), "norm": {"scale": np.ones(1024, np.float32)}}
params = {"outer": outer, "blocks": [lambda i=i: block(i) for i in range(24)]}
base = rss()
e = ZO2Engine(model, params, shared_sgd(), num_directions=4, mesh=None if n == 1 else n,
              max_inflight=2)
for t in range(2):
    e.step(counting_batch(jax.random.key(t), batch_size=4, seq=8), jax.random.key(t))
e.flush()
jax.block_until_ready(e._store.blocks)
print(json.dumps({"grown": rss() - base, "streamed": e.streamed_bytes()}))
"""


@pytest.mark.slow
def test_host_memory_holds_one_copy_whatever_the_device_count(tmp_path):
    """ZO2 on 4 devices keeps one copy of the streamed blocks in host memory: the process's
    resident memory grows by at most 1.2x what it grows by on one device (CPU devices' memory is
    host memory too, so the device-side shards and transients count as well)."""
    script = tmp_path / "rss.py"
    script.write_text(RSS_WORKER)
    grown = {}
    for n in (1, 4):
        r = subprocess.run([sys.executable, str(script), str(n)], env=_env(4), cwd=HERE,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        grown[n] = json.loads(r.stdout.strip().splitlines()[-1])
    streamed = grown[1]["streamed"]
    assert streamed == grown[4]["streamed"] > 90 * 2**20
    assert grown[1]["grown"] >= 0.9 * streamed, grown  # the measure sees the blocks
    assert grown[4]["grown"] <= 1.2 * grown[1]["grown"], grown


@pytest.mark.slow
def test_cli_two_processes_with_checkpoint_and_resume_match_one_device(tmp_path):
    """`zo2-jax train` launched as two processes (one command each, --coordinator), checkpointed
    at step 2 and 4, resumed to step 6 by two new processes: the same per-step losses and g, and
    the same exported model, bit for bit, as one process on one device."""
    from _tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    common = ["train", "--model", model, "--engine", "zo2", "--num-directions", "4",
              "--batch-size", "4", "--eval-every", "0", "--no-progress"]
    mp = tmp_path / "two"

    def two(steps):
        port = _free_port()
        cmd = lambda i: [sys.executable, "-m", "zo2_jax.cli", *common, "--devices", "4",  # noqa
                         "--out-dir", str(mp), "--checkpoint-dir", str(mp / "ckpt"),
                         "--checkpoint-every", "2", "--steps", str(steps), "--export-dir",
                         str(mp / "model"), "--coordinator", f"127.0.0.1:{port}",
                         "--num-processes", "2", "--process-id", str(i)]
        procs = [subprocess.Popen(cmd(i), env=_env(2), cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        logs = [p.communicate(timeout=900)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n----\n".join(x[-3000:] for x in logs)
        return logs[0]

    two(4)
    assert "resumed from" in two(6)
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "zo2_jax.cli", *common, "--out-dir", str(one),
                        "--steps", "6", "--export-dir", str(one / "model")], env=_env(1),
                       cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]

    def steps(folder):
        recs = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        return [(r["step"], r["loss"], r["projected_grad"]) for r in recs if r.get("kind") != "eval"]
    assert steps(mp) == steps(one) and len(steps(one)) == 6
    import safetensors.numpy as stn
    a, b = (stn.load_file(str(f / "model" / "model.safetensors")) for f in (mp, one))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (mp / "process1" / "metrics.jsonl").exists()  # the second process logs apart
