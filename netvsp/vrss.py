"""vRSS on the host: which of a synthetic NIC's channels a frame is delivered on.

With subchannels open (vmbus_netvsp.md g.1) and RSS set by the guest
(OID_GEN_RECEIVE_SCALE_PARAMETERS, g.3), a frame toward the guest goes on the
channel its Toeplitz hash picks: ``table[hash & 127]`` over the guest's key and
hash types (g.4; the table repeated to 128 entries as OpenVMM does). Neither
Linux nor OpenVMM computes the hash (the NIC or vSwitch does, g.4): this
software NetVSP computes it here. A frame the types do not cover, or an entry
naming a channel that is not open, goes on the primary (channel 0).

``group_by_channel`` reorders one port's share of the delivery plan so each
channel's frames are contiguous, keeping their order within a channel (a flow
stays in order), and returns where each channel's run starts.
"""
from __future__ import annotations

import numpy as np

from switch.kernel import kernel
from switch.toeplitz import packet_hash


@kernel
def group_by_channel(meta, plan, j0, j1, ktable, hashinfo, itab, nch, tmp, chan, starts,
                     cursor):
    """Sort plan[:, j0:j1] by channel in place (stable). Afterwards channel c's
    deliveries are plan[:, j0 + starts[c]:j0 + starts[c + 1]]. Returns the
    number of channels that got any."""
    m = j1 - j0
    size = itab.shape[0]
    for c in range(nch + 1):
        starts[c] = 0
    for j in range(j0, j1):
        h, t = packet_hash(meta, plan[0, j], ktable, hashinfo)
        c = 0
        if t != 0:
            c = itab[np.int64(h) & (size - 1)]
            if c < 0 or c >= nch:
                c = 0
        chan[j - j0] = c
        starts[c + 1] += 1
    used = 0
    for c in range(nch):
        if starts[c + 1]:
            used += 1
        starts[c + 1] += starts[c]
        cursor[c] = starts[c]
    for k in range(m):
        c = chan[k]
        at = cursor[c]
        tmp[0, at] = plan[0, j0 + k]
        tmp[1, at] = plan[1, j0 + k]
        cursor[c] = at + 1
    for k in range(m):
        plan[0, j0 + k] = tmp[0, k]
        plan[1, j0 + k] = tmp[1, k]
    return used


def scratch(capacity: int, channels: int):
    """The arrays group_by_channel needs for a batch of ``capacity`` deliveries."""
    return (np.zeros((2, capacity), dtype=np.int64), np.zeros(capacity, dtype=np.int64),
            np.zeros(channels + 1, dtype=np.int64), np.zeros(channels, dtype=np.int64))
