"""The software SR-IOV NIC: a PF, its VFs and the embedded switch between them and
the wire (vswitch_vmq_sriov.md 4.1; e1000_vfio.md R2 item 5).

Each VF is an ``Ixgbevf`` served to its guest over vfio-user (one ``Server`` per
VF, its own thread for control messages); the data path is ``poll``: each VF's
transmit ring is run by the compiled engine out of the guest memory its driver
DMA-mapped, the frames are steered by the embedded switch, and each goes to the
VFs whose filters take it (their receive engines, then their MSI-X eventfd), to
the wire and to the PF (handed to ``to_wire`` / ``to_pf`` as a batch and the
indexes of its frames). ``from_wire`` and ``from_pf`` steer frames the other way.
VF traffic never passes the virtual switch, as in Hyper-V (4.3).

Guest memory is reached only inside the mapping the driver granted, and only
while it stands: the server's DMA lock is held around each use.
"""
from __future__ import annotations

import logging
import socket
import threading

import numpy as np

from switch.batch import PacketBatch
from switch.kernel import kernel
from switch.parse import parse_batch

from . import ixgbevf_rings as R
from .eswitch import PF, WIRE, EmbeddedSwitch, vf_function
from .ixgbevf import Ixgbevf, VfPolicy, signal_if_writable
from .vfio_user import DMA_WRITEABLE, Server

log = logging.getLogger("hvnet.sriov")


@kernel
def split_by_function(dest, n, plans, counts):
    """The rows of a steered batch by destination function: ``plans[fn, 0, :counts[fn]]``
    (one pass, where a flatnonzero per function cost a Python call each)."""
    for fn in range(counts.shape[0]):
        counts[fn] = 0
    nfn = min(counts.shape[0], 64)
    for i in range(n):
        m = dest[i]
        if m == 0:
            continue
        for fn in range(nfn):
            if (m >> fn) & 1:
                plans[fn, 0, counts[fn]] = i
                counts[fn] += 1


class SriovNic:
    def __init__(self, num_vfs: int, policies: list[VfPolicy] | None = None):
        self.eswitch = EmbeddedSwitch(num_vfs)
        policies = policies or [VfPolicy() for _ in range(num_vfs)]
        self.vfs = [Ixgbevf(k, policies[k], self.eswitch) for k in range(num_vfs)]
        self.servers: list[Server | None] = [None] * num_vfs
        self.threads: list[threading.Thread | None] = [None] * num_vfs
        self.stats = np.zeros((num_vfs, R.NSTATS), np.int64)
        self.errors = np.zeros(num_vfs, np.int64)
        self.batch = PacketBatch(256, 1 << 22)
        self.dest = np.zeros(256, np.int64)
        # per function: the batch rows it takes (row 0 of each plan), and how many
        self.plans = np.zeros((2 + num_vfs, 2, 256), np.int64)
        self.counts = np.zeros(2 + num_vfs, np.int64)
        self.to_wire = None            # (batch, frame indexes) -> None
        self.to_pf = None
        R.warm()
        for vf in self.vfs[:1]:                      # the interrupt path compiled too
            signal_if_writable(-1, vf._pfd, vf._one)

    def serve(self, k: int, sock) -> threading.Thread:
        """Serve VF ``k`` to the vfio-user client at the other end of ``sock``."""
        srv = Server(sock, self.vfs[k])
        self.servers[k] = srv
        t = threading.Thread(target=srv.serve, name=f"vf{k}-vfio-user", daemon=True)
        t.start()
        self.threads[k] = t
        return t

    def unserve(self, k: int, timeout: float = 5.0) -> None:
        """VF ``k`` taken from its client (surprise removal if it did not let go):
        the data path stops using it first, then the connection is cut, its DMA
        mappings and interrupt fds dropped, and the VF reset (FLR), as 4.3 orders it,
        with new queue-register pages: the VF may go to another VM next."""
        srv, t = self.servers[k], self.threads[k]
        self.servers[k] = None
        self.threads[k] = None
        if srv is not None:
            try:
                srv.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if t is not None:
                t.join(timeout)
        self.vfs[k].renew()

    def doorbells(self) -> list[int]:
        return [vf.doorbell for vf in self.vfs]

    # ---- the data path ----------------------------------------------------------------
    def poll(self) -> int:
        """Every VF's transmit ring once; returns the frames it took. One VF's
        failure is logged and counted; the others go on."""
        moved = 0
        for k in range(len(self.vfs)):
            try:
                moved += self._transmit(k)
            except Exception:
                log.exception("VF %d: its transmit failed", k)
                self.errors[k] += 1
        return moved

    @staticmethod
    def _mapping(srv):
        """The mapping the engines use: the first, writable (a read-only one would
        not take receive write-backs), below 2**63 (the kernels' int64)."""
        for m in srv.dma:
            if m.flags & DMA_WRITEABLE and m.address + m.size <= 1 << 63:
                return m
        return None

    def _transmit(self, k: int) -> int:
        srv = self.servers[k]
        if srv is None:
            return 0
        vf, b = self.vfs[k], self.batch
        with srv.dma_lock:
            m = self._mapping(srv)
            if m is None:
                return 0
            mem = np.frombuffer(m.map, np.uint8)
            try:
                b.reset()
                n, cur, cause = R.vf_transmit(mem, m.address, m.size, vf.q, vf.icr,
                                              vf.txs, b.meta, b.data, 0, 0,
                                              vf_function(k), self.stats[k])
            finally:
                del mem
        if cause:
            vf.interrupt()
        if n:
            b.n, b.cursor = n, cur
            self._steer(b, vf_function(k))
        return n

    def from_wire(self, batch, outside: bool = True) -> np.ndarray:
        return self._steer(batch, WIRE, outside)

    def from_pf(self, batch) -> np.ndarray:
        return self._steer(batch, PF, True)

    def _steer(self, b, src: int, outside: bool = True) -> np.ndarray:
        """Steer a batch that function ``src`` sent: VF frames into their rings here,
        the wire's and the PF's to ``to_wire``/``to_pf`` when ``outside`` (else the
        caller reads them off the returned masks)."""
        parse_batch(b.meta, b.data, 0, b.n)
        if self.dest.shape[0] < b.n:
            self.dest = np.zeros(b.n, np.int64)
            self.plans = np.zeros((self.plans.shape[0], 2, b.n), np.int64)
        dest = self.dest[:b.n]
        self.eswitch.steer(b, src, dest)
        counts = self.counts
        split_by_function(dest, b.n, self.plans, counts)
        for fn in np.flatnonzero(counts).tolist():
            c = int(counts[fn])
            if fn >= 2:
                self._receive(fn - 2, b, self.plans[fn], c)
            elif outside:
                out = self.to_wire if fn == WIRE else self.to_pf
                if out is not None:
                    out(b, self.plans[fn, 0, :c])
        return dest

    def _receive(self, j: int, b, plan: np.ndarray, count: int) -> int:
        """Frames ``plan[0, :count]`` of the batch into VF ``j``'s receive ring."""
        srv, vf = self.servers[j], self.vfs[j]
        if srv is None:
            return 0
        with srv.dma_lock:
            m = self._mapping(srv)
            if m is None:
                self.stats[j, R.S_RX_NO_DESC] += count
                return 0
            mem = np.frombuffer(m.map, np.uint8)
            try:
                done, cause = R.vf_receive(mem, m.address, m.size, vf.q, vf.icr, b.meta,
                                           b.data, plan, 0, count, self.stats[j])
            finally:
                del mem
        if cause:
            vf.interrupt()
        return done

    def close(self) -> None:
        for t in self.threads:
            if t is not None:
                t.join(5)
        for vf in self.vfs:
            vf.close()
