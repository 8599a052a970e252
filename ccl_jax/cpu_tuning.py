"""Process settings that make XLA:CPU faster, applied by the entry points (`main`, `reproduce`,
`experiments/benchmark.py`) before they train; importing the library changes nothing.

The allocator. XLA:CPU allocates each call's temporary buffers as one large block (hundreds of MiB
for a conv net's training chunk). glibc serves blocks that large with a fresh `mmap` and returns
them with `munmap`, so every call page-faults its whole working set in again: on the 2-core VM
this project is benchmarked on, a CIFAR-10 cnn_pool chunk spent ~0.5 s of system time per call
(134k minor faults, ~520 MiB) and memory-bound ops (im2col patches, activations, pools) ran 3-6×
slower than with their memory already mapped. `tune_allocator` tells glibc's `malloc` (through
`mallopt`, for this process only) to serve every block from its one main heap and to keep freed
memory until more than 2 GiB of it is free at the top of the heap: after the first call, no call
faults at all. It keeps up to 2 GiB more resident than the process would otherwise, and is
skipped where the user steers malloc already (any `MALLOC_*` variable or `GLIBC_TUNABLES`), where
libc is not glibc, and with `CCL_JAX_CPU_TUNING=0`.

Measured and not adopted (jaxlib 0.12, AMD EPYC, AVX2): turning XLA's YNNPACK fusions off
(`--xla_cpu_experimental_ynn_fusion_type=`) makes a lone 2048² fp32 matmul ~20-40% faster (Eigen),
but the MLP training steps ~5-25% slower and the im2col conv steps no faster; oneDNN
(`--xla_cpu_use_onednn`) was no faster than Eigen. XLA_FLAGS is left as the user set it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
KEEP_FREE_BYTES = 2**31 - 1  # mallopt takes an int: ~2 GiB
applied: dict[str, bool] = {}


def enabled() -> bool:
  flag = os.environ.get('CCL_JAX_CPU_TUNING', '1').strip().lower()
  return flag not in ('0', 'false', 'no', 'off')


def tune_allocator() -> bool:
  """One heap, no per-block mmap, freed memory kept (see the module doc). Returns whether set."""
  if 'allocator' in applied:
    return applied['allocator']
  user_set = any(k.startswith('MALLOC_') for k in os.environ) or 'GLIBC_TUNABLES' in os.environ
  ok = False
  if enabled() and not user_set and sys.platform == 'linux' and platform.libc_ver()[0] == 'glibc':
    try:
      mallopt = ctypes.CDLL(None).mallopt
      settings = (
        (_M_ARENA_MAX, 1),  # XLA allocates on its worker threads: keep them on the main heap
        (_M_MMAP_MAX, 0),  # large blocks come from the heap, not a fresh mmap each
        (_M_TRIM_THRESHOLD, KEEP_FREE_BYTES),  # freed memory stays mapped (up to ~2 GiB)
        (_M_TOP_PAD, 64 << 20),  # grow the heap in 64 MiB steps
      )
      ok = all(mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in settings)
    except (OSError, AttributeError):
      ok = False
  applied['allocator'] = ok
  return ok
