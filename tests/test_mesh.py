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
