"""The forwarding database of built-in forwarding: learned (MAC, VLAN) -> port.

Open addressing with linear probing in one int64 array of 4-word entries
(key, value, last seen, spare): an entry is half a cache line, so a probe costs
one line, not one per field. The last row holds table-wide values.
An entry not refreshed for ``age_ns`` is aged out: treated
as unknown on lookup and purged (backward-shift deletion keeps probe chains
intact). Counters of learned, purged and moved addresses mirror the switch's
performance counters (vswitch_vmq_sriov.md 2.7; Msvm_DynamicForwardingEntry).
"""
from __future__ import annotations

import numpy as np

from .port import mac_to_str
from .kernel import kernel, helper

KEY = 0     # (mac << 12 | vlan) + 1; 0 = empty slot
VAL = 1     # port | nic << 16
TS = 2      # last seen, ns
# table[-1] holds table-wide values:
I_COUNT = 0  # entries in use
I_AGE = 1    # ageing time, ns
I_FULL = 2   # learn attempts refused because the table was full

DEFAULT_AGE_S = 300.0


class Fdb:
    def __init__(self, capacity: int = 8192, age_s: float = DEFAULT_AGE_S):
        if capacity < 16 or capacity & (capacity - 1):
            raise ValueError(f"FDB capacity {capacity} must be a power of two >= 16")
        self.table = np.zeros((capacity + 1, 4), dtype=np.int64)
        self.info = self.table[capacity]
        self.table[-1, I_AGE] = int(age_s * 1e9)

    def entries(self, now_ns: int | None = None) -> list[dict]:
        t = self.table
        out = []
        for s in np.nonzero(t[:-1, KEY])[0]:
            k = int(t[s, KEY]) - 1
            age = None if now_ns is None else (now_ns - int(t[s, TS])) / 1e9
            out.append({"mac": mac_to_str(k >> 12), "vlan": k & 0xFFF,
                        "port": int(t[s, VAL]) & 0xFFFF, "nic": int(t[s, VAL]) >> 16,
                        "age_s": age})
        return out

    def flush_port(self, port_id: int) -> int:
        return fdb_flush_port(self.table, port_id)


@helper
def _slot(key, mask):
    h = key * -7046029254386353131  # 0x9E3779B97F4A7C15 as int64; wraps like uint64
    return (h >> 20) & mask


@helper
def fdb_find(table, key):
    """Slot of ``key`` (already +1) or -1."""
    mask = (table.shape[0] - 1) - 1
    s = _slot(key, mask)
    for _ in range((table.shape[0] - 1)):
        k = table[s, KEY]
        if k == key:
            return s
        if k == 0:
            return -1
        s = (s + 1) & mask
    return -1


@helper
def fdb_delete_slot(table, s):
    """Backward-shift deletion for linear probing."""
    mask = (table.shape[0] - 1) - 1
    j = s
    while True:
        table[s, KEY] = 0
        while True:
            j = (j + 1) & mask
            k = table[j, KEY]
            if k == 0:
                table[-1, I_COUNT] -= 1
                return
            h = _slot(k, mask)
            # Move j back to s unless its home slot h lies cyclically in (s, j].
            if s <= j:
                if s < h <= j:
                    continue
            else:
                if h > s or h <= j:
                    continue
            break
        table[s, KEY] = table[j, KEY]
        table[s, VAL] = table[j, VAL]
        table[s, TS] = table[j, TS]
        s = j


@helper
def fdb_lookup(table, key, now):
    """Value for ``key`` or -1; an aged entry is purged here. Returns (value, purged)."""
    s = fdb_find(table, key)
    if s < 0:
        return -1, 0
    if now - table[s, TS] > table[-1, I_AGE]:
        fdb_delete_slot(table, s)
        return -1, 1
    return table[s, VAL], 0


@helper
def fdb_learn(table, key, val, now):
    """Insert or refresh. Returns 1 learned, 2 moved, 0 refreshed, -1 table full."""
    mask = (table.shape[0] - 1) - 1
    s = _slot(key, mask)
    for _ in range((table.shape[0] - 1)):
        k = table[s, KEY]
        if k == key:
            # Refresh at most every 1/64 of the ageing time (and 100 ms): saves a
            # store per packet on busy flows, ages out at most that much early.
            if now - table[s, TS] > min(100_000_000, table[-1, I_AGE] >> 6):
                table[s, TS] = now
            if table[s, VAL] != val:
                table[s, VAL] = val
                return 2
            return 0
        if k == 0:
            # Keep the load under 3/4 so probe chains stay short.
            if table[-1, I_COUNT] * 4 >= (table.shape[0] - 1) * 3:
                table[-1, I_FULL] += 1
                return -1
            table[s, KEY] = key
            table[s, VAL] = val
            table[s, TS] = now
            table[-1, I_COUNT] += 1
            return 1
        s = (s + 1) & mask
    table[-1, I_FULL] += 1
    return -1


@kernel
def fdb_age(table, now):
    """Purge every entry older than the ageing time. Returns how many."""
    purged = 0
    s = 0
    while s < (table.shape[0] - 1):
        if table[s, KEY] != 0 and now - table[s, TS] > table[-1, I_AGE]:
            fdb_delete_slot(table, s)
            purged += 1
            continue  # the slot may have received a shifted entry
        s += 1
    return purged


@kernel
def fdb_flush_port(table, port):
    n = 0
    s = 0
    while s < (table.shape[0] - 1):
        if table[s, KEY] != 0 and (table[s, VAL] & 0xFFFF) == port:
            fdb_delete_slot(table, s)
            n += 1
            continue
        s += 1
    return n
