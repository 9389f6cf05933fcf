"""Emulated e1000 NICs as switch ports (type emulated): the device model of each
NIC, its guest's register accesses arriving as intercepts, its DMA into guest
RAM by the compiled engines, its interrupt line as an eventfd.

Reference: e1000_vfio.md A.1 (Bus Master gates DMA), A.4 (doorbells), A.8-A.10
(the engines), A.11 (interrupts and moderation), A.14 (why exits cost). In
Hyper-V the emulated adapter's frames reach the switch through the host's
worker process; here the port kind plays that part (seed, "emulated NIC").

Per batch, for each NIC: the intercepts waiting are applied in order (a TDT or
TCTL write marks the transmit ring due), the device's timers run (a restarted
autonegotiation completing), then the transmit engine fills the switch batch;
deliveries go through the receive engine. Interrupt causes raise the line;
a rising line interrupts the guest (eventfd) at once, and later rising edges
wait until QEMU's mitigation delay (ITR, RADV, TADV: ``_interval``) has passed
since: the switch's idle wait honours that deadline.
"""
from __future__ import annotations

import time

import numpy as np

from hypervisor.intercept import CONFIG, IO, MMIO, InterceptServer
from hypervisor.pci import ConfigSpace
from switch import counters as C
from switch.delivery import tx_failed_span
from switch.portkind import PortKind

from . import regs as E
from .device import E1000
from .rx import MAX_SEGMENTS, NRXSTATS, e1000_receive
from .tx import NTXS, NXSTATS, TX_MAX, X_IDE, e1000_transmit

MIT_FLOOR = 500             # QEMU's floor on the mitigation delay, 256 ns units
RX_NAMES = ("frames", "not ready", "filtered", "oversize", "no buffer", "bad DMA", "malformed")
TX_NAMES = ("frames", "descriptors", "bad DMA", "too big", "ring error", "runt",
            "delay requested")


class E1000Nic:
    """The host side of one emulated NIC."""

    def __init__(self, mem: np.ndarray, mac: bytes, intercept_sock, irq,
                 clock=time.monotonic):
        """``mem``: guest RAM (GuestMemory.mem); ``irq``: the interrupt eventfd
        (a Doorbell) the guest waits on."""
        self.mem, self.irq, self.clock = mem, irq, clock
        self.dev = E1000(mac, clock=clock)
        self.pci = ConfigSpace(E.VENDOR_ID, E.DEVICE_ID, E.REVISION, E.CLASS_CODE,
                               [(E.MMIO_SIZE, False), (E.IO_SIZE, True)], cache_line=0x10)
        d = self.dev
        self.server = InterceptServer(intercept_sock, {
            MMIO: (d.mmio_read, d.mmio_write), IO: (d.io_read, d.io_write),
            CONFIG: (self.pci.read, self.pci.write)})
        d.on_irq = self._line
        self.txs = np.zeros(NTXS, dtype=np.int64)
        self.txbuf = np.zeros(TX_MAX, dtype=np.uint8)
        self.txstats = np.zeros(NXSTATS, dtype=np.int64)
        self.rxstats = np.zeros(NRXSTATS, dtype=np.int64)
        self.scratch = np.zeros(65536 + MAX_SEGMENTS * 256, dtype=np.uint8)
        self.seglens = np.zeros(MAX_SEGMENTS, dtype=np.int64)
        self.small = np.zeros(64, dtype=np.uint8)
        self.interrupts = 0
        self._last_irq = -1.0
        self._deferred = False

    # interrupts (A.11)
    def _line(self, up: bool) -> None:
        if up:
            self._interrupt()

    def _interval(self) -> float:
        """QEMU's mitigation delay (A.11): the smallest non-zero of TADV x 4 (once a
        descriptor asked for a delay, IDE, and a transmit cause waits), RADV x 4
        (when RDTR is set and RXT0 waits) and ITR, in 256 ns units, at least
        500 (7813 interrupts/s at most); none set, no mitigation."""
        d = self.dev
        icr = d[E.ICR]
        c = [d[E.ITR]]
        if self.txstats[X_IDE] and icr & (E.ICR_TXQE | E.ICR_TXDW):
            c.append(d[E.TADV] * 4)
        if d[E.RDTR] and icr & E.ICR_RXT0:
            c.append(d[E.RADV] * 4)
        c = [v for v in c if v]
        if not c:
            return 0.0
        return max(min(c), MIT_FLOOR) * E.ITR_UNIT_NS * 1e-9

    def _interrupt(self) -> None:
        now = self.clock()
        if now - self._last_irq < self._interval():
            self._deferred = True          # inside the throttling interval: later
            return
        self._deferred = False
        self._last_irq = now
        self.interrupts += 1
        self.irq.ring()

    def deadline(self) -> float | None:
        t = []
        if self._deferred:
            t.append(self._last_irq + self._interval())
        if self.dev.phy.autoneg_due is not None:
            t.append(self.dev.phy.autoneg_due)
        return min(t) if t else None

    def timers(self) -> None:
        self.dev.tick()
        if self._deferred and self.dev.irq_pending():
            self._interrupt()
        elif self._deferred:
            self._deferred = False         # the guest took the causes meanwhile

    def info(self) -> dict:
        d = self.dev
        return {"kind": "e1000", "link": "up" if d.link_up() else "down",
                "bus_master": self.pci.bus_master(), "exits": self.server.exits,
                "accesses": self.server.accesses, "interrupts": self.interrupts,
                "refused": self.server.malformed + d.bad_accesses,
                "unknown_registers": sum(d.unknown.values()), "resets": d.resets,
                "tx": {n: int(v) for n, v in zip(TX_NAMES, self.txstats) if v},
                "rx": {n: int(v) for n, v in zip(RX_NAMES, self.rxstats) if v}}


class EmulatedPorts(PortKind):
    name = "emulated"

    def __init__(self):
        super().__init__()
        self.nics: dict[int, E1000Nic] = {}

    def attach(self, port, nic: E1000Nic) -> None:
        self.nics[port.port_id] = nic
        self.port_added(port)

    def port_removed(self, port) -> None:
        super().port_removed(port)
        self.nics.pop(port.port_id, None)

    def fds(self) -> list[int]:
        return [n.server.fileno() for n in self.nics.values() if not n.server.closed]

    def deadline(self) -> float | None:
        t = [d for d in (n.deadline() for n in self.nics.values()) if d is not None]
        return min(t) if t else None

    def port_info(self, port_id: int) -> dict | None:
        nic = self.nics.get(port_id)
        return nic.info() if nic is not None else None

    def warm(self) -> None:
        from switch.batch import PacketBatch
        from hypervisor.intercept import pair
        a, b = pair()
        try:
            nic = E1000Nic(np.zeros(1 << 16, np.uint8), b"\x02\x00\x00\x00\x00\x01", a, None)
            batch = PacketBatch(4, arena=2 * TX_MAX)
            e1000_transmit(nic.mem, nic.dev.reg, nic.txs, nic.txbuf, batch.meta,
                           batch.data, 0, 0, 0, nic.txstats)
            e1000_receive(nic.mem, nic.dev.reg, batch.meta, batch.data,
                          np.zeros((2, 1), np.int64), 0, 0, nic.scratch, nic.seglens,
                          nic.small, nic.rxstats)
            tx_failed_span(np.zeros((1, C.NCOLS), np.int64), 0, batch.meta,
                           np.zeros((2, 1), np.int64), 0, 0, C.DEST_NOT_CONNECTED)
        finally:
            a.close()
            b.close()

    def receive(self, batch) -> int:
        n, cursor = 0, 0
        for pid in self.port_ids.tolist():
            nic = self.nics[pid]
            nic.server.pump()                 # the exits waiting (doorbells among them)
            nic.timers()
            if not nic.pci.bus_master():
                continue                      # no DMA without Bus Master (A.1)
            n, cursor, causes, _ = e1000_transmit(nic.mem, nic.dev.reg, nic.txs, nic.txbuf,
                                                  batch.meta, batch.data, n, cursor, pid,
                                                  nic.txstats)
            if causes:
                nic.dev.set_cause(causes)
        batch.cursor = cursor
        return n

    def transmit(self, batch, plan, span) -> None:
        ctr = self.switch.counters.table
        for pid in self.port_ids.tolist():
            j0, j1 = int(span[pid, 0]), int(span[pid, 1])
            if j0 == j1:
                continue
            nic = self.nics[pid]
            if not nic.pci.bus_master():         # no DMA without Bus Master (A.1)
                tx_failed_span(ctr, pid, batch.meta, plan, j0, j1, C.DEST_NOT_CONNECTED)
                continue
            before = int(nic.rxstats[0])
            causes = e1000_receive(nic.mem, nic.dev.reg, batch.meta, batch.data, plan, j0,
                                   j1, nic.scratch, nic.seglens, nic.small, nic.rxstats)
            lost = (j1 - j0) - (int(nic.rxstats[0]) - before)
            if lost > 0:                      # filtered, no buffer, not ready...
                ctr[pid, C.DROP_OUT] += lost
                ctr[pid, C.DROP_OUT_BASE + C.TX_FULL] += lost
            if causes:
                nic.dev.set_cause(causes)
