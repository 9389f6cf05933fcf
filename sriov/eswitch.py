"""The SR-IOV NIC's embedded switch (VEB): VPorts with MAC/VLAN receive filters
between the wire, the PF and the VFs (vswitch_vmq_sriov.md 4.1-4.3; checklist 38,
39, 41).

- VPort 0 is the default VPort, on the PF; it exists as long as the switch and
  takes every unicast frame from the wire that no filter claims. A VF has at
  most one VPort; a VPort's attachment (PF or which VF) never changes.
- Filters follow NDIS's receive-filter rules (switch/rxfilter.py). Assigning a VF
  moves the vNIC's filters from the default VPort to the VF's
  (OID_RECEIVE_FILTER_MOVE_FILTER); removing it moves them back first.
- Spoof checking (per VF, on by default): a frame from a VF leaves only with a
  source MAC and VLAN one of its VPort's filters would accept; others are
  dropped and counted. A VF receives only what its filters match: broadcast and
  multicast too flood only to the VFs whose filters take their VLAN.

Functions are numbered for the steering kernel: WIRE 0, PF 1, VF k is 2 + k; one
compiled loop per batch gives each parsed frame a bit mask of the functions it
goes to (``dest``), or a drop reason.
"""
from __future__ import annotations

import numpy as np

from switch.batch import DMAC, DROP, F_VLAN, FLAGS, SMAC, TCI
from switch.kernel import kernel
from switch.rxfilter import VLAN_UNTAGGED_OR_ZERO, vlan_matches

WIRE, PF = 0, 1
MAX_VFS = 62                         # functions fit the bits of one int64 mask
DEFAULT_VPORT = 0
# counters per function
C_RX, C_TX, C_SPOOF, C_NO_FILTER = range(4)
NCOUNTERS = 4
D_SPOOF = 1                          # drop reasons the kernel writes into DROP


class EswitchError(ValueError):
    pass


def vf_function(k: int) -> int:
    return 2 + k


@kernel
def veb_steer(meta, n, src, f_mac, f_vlan, f_vport, vport_fn, spoof, dest, counters):
    """Destinations of the ``n`` parsed frames that function ``src`` sent."""
    nf = f_mac.shape[0]
    nfn = counters.shape[0]
    all_fns = (np.int64(1) << nfn) - 1
    for i in range(n):
        dest[i] = 0
        if meta[DROP, i] != 0:
            continue
        tagged = (meta[FLAGS, i] & F_VLAN) != 0
        vid = meta[TCI, i] & 0xFFF if tagged else 0
        counters[src, C_TX] += 1
        if src >= 2 and spoof[src] != 0:
            ok = False
            smac = meta[SMAC, i]
            for f in range(nf):
                v = f_vport[f]
                if v >= 0 and vport_fn[v] == src and f_mac[f] == smac and \
                        vlan_matches(f_vlan[f], tagged, vid):
                    ok = True
                    break
            if not ok:
                meta[DROP, i] = D_SPOOF
                counters[src, C_SPOOF] += 1
                continue
        dmac = meta[DMAC, i]
        if (dmac >> 40) & 1:                        # group bit: broadcast or multicast
            # The wire and the PF see every VLAN; a VF only those its filters take.
            m = (np.int64(1) << WIRE) | (np.int64(1) << PF)
            for f in range(nf):
                v = f_vport[f]
                if v >= 0 and vport_fn[v] >= 2 and vlan_matches(f_vlan[f], tagged, vid):
                    m |= np.int64(1) << vport_fn[v]
            m &= all_fns & ~(np.int64(1) << src)
        else:
            m = np.int64(0)
            for f in range(nf):
                v = f_vport[f]
                if v >= 0 and f_mac[f] == dmac and vlan_matches(f_vlan[f], tagged, vid):
                    fn = vport_fn[v]
                    if fn != src:
                        m = np.int64(1) << fn
                    break
            if m == 0 and src != WIRE and not (dmac == 0):
                m = np.int64(1) << WIRE             # not ours: out to the wire
            if m == 0 and src == WIRE:
                m = np.int64(1) << PF               # the default VPort takes the rest
                counters[src, C_NO_FILTER] += 1
        dest[i] = m
        for fn in range(nfn):
            if (m >> fn) & 1:
                counters[fn, C_RX] += 1


class EmbeddedSwitch:
    """The NIC switch of a PF with ``num_vfs`` VFs."""

    def __init__(self, num_vfs: int, max_filters: int = 256, max_vports: int = 64):
        if not 0 <= num_vfs <= MAX_VFS:
            raise EswitchError(f"{num_vfs} VFs: 0..{MAX_VFS}")
        self.num_vfs = num_vfs
        self.f_mac = np.zeros(max_filters, np.int64)
        self.f_vlan = np.zeros(max_filters, np.int64)
        self.f_vport = np.full(max_filters, -1, np.int64)
        self.vport_fn = np.full(max_vports, -1, np.int64)
        self.vport_fn[DEFAULT_VPORT] = PF
        self.spoof = np.ones(2 + num_vfs, np.int64)
        self.spoof[WIRE] = self.spoof[PF] = 0
        self.trust = np.zeros(2 + num_vfs, np.int64)
        self.counters = np.zeros((2 + num_vfs, NCOUNTERS), np.int64)

    # ---- VPorts (OID_NIC_SWITCH_CREATE_VPORT / DELETE_VPORT) -----------------------------
    def create_vport(self, vf: int | None = None) -> int:
        """A VPort on the PF (``vf`` None) or on VF ``vf``, which may have only one."""
        fn = PF if vf is None else self._vf(vf)
        if vf is not None and fn in self.vport_fn:
            raise EswitchError(f"VF {vf} already has a VPort (one non-default VPort per VF)")
        free = np.flatnonzero(self.vport_fn < 0)
        if not free.size:
            raise EswitchError("no free VPort")
        v = int(free[0])
        self.vport_fn[v] = fn
        return v

    def delete_vport(self, v: int) -> None:
        self._vport(v)
        if v == DEFAULT_VPORT:
            raise EswitchError("the default VPort goes only with the switch")
        if (self.f_vport == v).any():
            raise EswitchError(f"VPort {v} still has filters: move or clear them first")
        self.vport_fn[v] = -1

    def vport_of(self, vf: int) -> int | None:
        hits = np.flatnonzero(self.vport_fn == self._vf(vf))
        return int(hits[0]) if hits.size else None

    # ---- filters (OID_RECEIVE_FILTER_SET_FILTER / CLEAR / MOVE) ---------------------------
    def set_filter(self, v: int, mac: int, vlan: int = VLAN_UNTAGGED_OR_ZERO) -> int:
        self._vport(v)
        if not 0 <= mac < 1 << 48 or (mac >> 40) & 1:
            raise EswitchError(f"filter MAC {mac:#014x}: a unicast 48-bit address")
        if not (vlan < 0 and vlan >= -2) and not 1 <= vlan <= 4094:
            raise EswitchError(f"filter VLAN {vlan}: 1..4094, or MAC-only")
        taken = (self.f_vport >= 0) & (self.f_mac == mac) & (self.f_vlan == vlan)
        if taken.any():
            raise EswitchError(f"MAC {mac:#014x} VLAN {vlan} is already filtered to VPort "
                               f"{int(self.f_vport[np.flatnonzero(taken)[0]])}")
        free = np.flatnonzero(self.f_vport < 0)
        if not free.size:
            raise EswitchError("no free receive filter")
        f = int(free[0])
        self.f_mac[f], self.f_vlan[f], self.f_vport[f] = mac, vlan, v
        return f

    def clear_filter(self, f: int) -> None:
        if not 0 <= f < self.f_vport.size or self.f_vport[f] < 0:
            raise EswitchError(f"no filter {f}")
        self.f_vport[f] = -1

    def filters(self, v: int) -> list[tuple[int, int, int]]:
        return [(int(f), int(self.f_mac[f]), int(self.f_vlan[f]))
                for f in np.flatnonzero(self.f_vport == v)]

    def move_filters(self, mac: int, src: int, dst: int) -> int:
        """Every filter of ``mac`` from VPort ``src`` to ``dst`` (checklist 39);
        returns how many moved."""
        self._vport(src)
        self._vport(dst)
        sel = (self.f_vport == src) & (self.f_mac == mac)
        self.f_vport[sel] = dst
        return int(sel.sum())

    # ---- per-VF settings ------------------------------------------------------------------
    def set_spoofchk(self, vf: int, on: bool) -> None:
        self.spoof[self._vf(vf)] = int(on)

    def set_trust(self, vf: int, on: bool) -> None:
        self.trust[self._vf(vf)] = int(on)

    # ---- the data path --------------------------------------------------------------------
    def steer(self, batch, src: int, dest: np.ndarray) -> None:
        """Fill ``dest`` (int64 per frame: bit per function) for a parsed batch that
        function ``src`` sent."""
        if not 0 <= src < 2 + self.num_vfs:
            raise EswitchError(f"source function {src}: 0..{1 + self.num_vfs}")
        if dest.shape[0] < batch.n:
            raise EswitchError(f"{dest.shape[0]} destination slots for {batch.n} frames")
        veb_steer(batch.meta, batch.n, src, self.f_mac, self.f_vlan, self.f_vport,
                  self.vport_fn, self.spoof, dest, self.counters)

    def _vf(self, vf: int) -> int:
        if not 0 <= vf < self.num_vfs:
            raise EswitchError(f"VF {vf}: the PF has {self.num_vfs}")
        return vf_function(vf)

    def _vport(self, v: int) -> None:
        if not 0 <= v < self.vport_fn.size or self.vport_fn[v] < 0:
            raise EswitchError(f"no VPort {v}")
