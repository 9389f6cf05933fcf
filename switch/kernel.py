"""The decorators every fast-path kernel is compiled with.

``kernel`` is ``@njit(nogil=True, cache=True)`` without numba's reference-counted
memory manager (NRT): the kernels never allocate, and with NRT on, numba wraps
array arguments of every helper call in atomic incref/decref pairs that its
pruning pass does not remove. Measured on the built-in forwarding stage: 23.8 us
per 256-packet batch with NRT, 4.8 us without (bench/test_kernels.py).
A kernel compiled this way cannot create arrays (np.empty and friends); pass
preallocated ones in.

``helper`` is for small functions called per packet from kernels: inlined at
numba IR level so no call or argument boxing remains.
"""
from __future__ import annotations

from numba import njit

kernel = njit(nogil=True, cache=True, _nrt=False)
helper = njit(inline="always", cache=True, _nrt=False)
