"""Test-wide setup, before any test imports jax.

The bit-for-bit tests (ZO2 == MeZO, a mesh == one device) compare two differently built
programs. Where the CPU has FMA, LLVM fuses a multiply and an add into one rounding by its own
per-CPU cost model, and may do so in one program and not the other (XLA does not promise the
same contraction across programs). The tests therefore compile for AVX without FMA
(`--xla_cpu_max_isa=AVX`), so their verdict does not depend on the host's processor; an
explicit --xla_cpu_max_isa in XLA_FLAGS is kept.
"""

import os

if "--xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_max_isa=AVX").strip()
