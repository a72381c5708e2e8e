"""Test-wide setup, before any test imports jax.

The bit-for-bit tests (ZO2 == MeZO, a mesh == one device) compare two differently built
programs. Where the CPU has FMA, LLVM fuses a multiply and an add into one rounding by its own
per-CPU cost model, and may do so in one program and not the other (XLA does not promise the
same contraction across programs). The tests therefore compile for AVX without FMA
(`--xla_cpu_max_isa=AVX`), so their verdict does not depend on the host's processor; an
explicit --xla_cpu_max_isa in XLA_FLAGS is kept.

A long-lived test process (an xdist worker runs many files) keeps every executable XLA has
compiled for it, and on the CPU each holds memory maps of its code (a few per kernel). Past the
kernel's per-process limit (vm.max_map_count, 65530 by default) LLVM cannot map the next one
("LLVM compilation error: Cannot allocate memory") and the process dies with a segfault inside
a compile. After a test that leaves the process at half the limit, jax's caches are cleared
(its executables freed), and a process still near the limit fails with a message that says so.
"""

import gc
import os
import sys

import pytest

if "--xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX").strip()


def _map_counts():
    """(memory maps this process holds, the kernel's limit), or None where /proc has neither."""
    try:
        with open("/proc/self/maps", "rb") as f:
            held = f.read().count(b"\n")
        with open("/proc/sys/vm/max_map_count") as f:
            return held, int(f.read())
    except (OSError, ValueError):
        return None


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    yield
    counts = _map_counts()
    if counts is None or counts[0] < counts[1] // 2 or "jax" not in sys.modules:
        return
    import jax

    jax.clear_caches()
    gc.collect()
    held, limit = _map_counts()
    if held > limit * 9 // 10:
        pytest.fail(f"this process holds {held} memory maps with jax's caches cleared, near the "
                    f"kernel's limit of {limit} (vm.max_map_count): the next XLA compile may "
                    f"crash; something still references many compiled executables")
