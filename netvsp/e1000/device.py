"""The 82540EM device model's register file: BAR0 (MMIO), the BAR1 I/O window,
the EEPROM, the PHY, interrupt causes and the statistics, with the side effects
QEMU gives each register.

Reference: e1000_vfio.md A.1 (BARs, the I/O window), A.2 (offsets), A.3 (bits),
A.4 (side effects), A.5 (EEPROM), A.6 (PHY), A.11 (interrupt line), R1 (the set
implemented). Where hvnet differs from QEMU, R1 asks for it: CTRL.RST resets the
device, and the I/O window works (Linux resets the 82540 through it).

The guest is not trusted: an access that is not a whole, aligned register
inside the BAR is refused and counted (``bad_accesses``), unknown registers read
0 and ignore writes (counted in ``unknown``), and every value is masked to the
bits its register has. The descriptor engines (transmit on a TDT or TCTL write,
receive buffers on an RDT write) are reached through ``on_tx`` and ``on_rx``.
"""
from __future__ import annotations

import collections
import time

import numpy as np

from . import regs as E
from .eeprom import Microwire, eerd_read, image
from .phy import Phy

NREGS = E.MMIO_SIZE // 4


def _known() -> np.ndarray:
    """Which register indices exist (A.2): named registers, the filter and
    wake-up tables, the statistics."""
    k = np.zeros(NREGS, dtype=bool)
    scalars = [E.CTRL, E.CTRL_DUP, E.STATUS, E.EECD, E.EERD, E.CTRL_EXT, E.FLA, E.MDIC,
               E.SCTL, E.FCAL, E.FCAH, E.FCT, E.VET, E.ICR, E.ITR, E.ICS, E.IMS, E.IMC,
               E.RCTL, E.FCTTV, E.TXCW, E.RXCW, E.TCTL, E.TCTL_EXT, E.TIPG, E.AIT,
               E.LEDCTL, E.PBA, E.FCRTL, E.FCRTH, E.RDFH, E.RDFT, E.RDFHS, E.RDFTS,
               E.RDFPC, E.RDBAL, E.RDBAH, E.RDLEN, E.RDH, E.RDT, E.RDTR, E.RXDCTL, E.RADV,
               E.RSRPD, E.TDFH, E.TDFT, E.TDFHS, E.TDFTS, E.TDFPC, E.TDBAL, E.TDBAH,
               E.TDLEN, E.TDH, E.TDT, E.TIDV, E.TXDCTL, E.TADV, E.TSPMT, E.TARC0, E.RXCSUM,
               E.WUC, E.WUFC, E.WUS, E.MANC, E.IPAV, *E.STATS.values()]
    for off in scalars:
        k[off >> 2] = True
    for base, n in ((E.MTA, E.MTA_COUNT), (E.RA, 2 * E.RA_COUNT), (E.VFTA, E.VFTA_COUNT),
                    (E.IP4AT, 8), (E.IP6AT, 4), (E.WUPM, 32), (E.FFLT, 8)):
        k[base >> 2:(base >> 2) + n] = True
    return k


KNOWN = _known()
READ_ONLY = frozenset([E.STATUS >> 2] + [o >> 2 for o in E.STATS.values()])
_CLEAR_ON_READ = frozenset(E.STATS[n] >> 2 for n in E.STATS_CLEAR_ON_READ)
_PAIR_LOW = {E.STATS[h] >> 2: E.STATS[lo] >> 2 for h, lo in E.STATS_PAIRS.items()}
_MASK16 = frozenset(o >> 2 for o in E.MASK16)


class E1000:
    def __init__(self, mac: bytes, clock=time.monotonic):
        if len(mac) != 6 or mac[0] & 1:
            raise ValueError(f"MAC {bytes(mac).hex(':')}: a unicast address of 6 bytes")
        self.mac = bytes(mac)
        self.clock = clock
        self.reg = np.zeros(NREGS, dtype=np.uint32)
        self.eeprom = image(self.mac)
        self.microwire = Microwire(self.eeprom)
        self.phy = Phy()
        self.ioaddr = 0
        self.bad_accesses = 0
        self.unknown: collections.Counter = collections.Counter()   # offset -> accesses
        self.resets = 0
        self.on_tx = None          # called after a TDT write, or a TCTL write with EN
        self.on_rx = None          # called after an RDT write (buffers were given)
        self.on_irq = None         # called with True/False when the line changes
        self._line = False
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Power-on / CTRL.RST state (A.4): registers zero but the QEMU defaults,
        RAL0/RAH0 the MAC with AV, the PHY and the EEPROM interface reset."""
        self.reg[:] = 0
        for off, v in E.RESET.items():
            self.reg[off >> 2] = v
        m = self.mac
        self.reg[E.RAL(0) >> 2] = m[0] | m[1] << 8 | m[2] << 16 | m[3] << 24
        self.reg[E.RAH(0) >> 2] = m[4] | m[5] << 8 | E.RAH_AV
        self.phy.reset()
        if not self.phy.link_up:
            self.reg[E.STATUS >> 2] &= np.uint32(~E.STATUS_LU & 0xFFFFFFFF)
        self.microwire = Microwire(self.eeprom)
        self.resets += 1
        self._update_irq()

    def __getitem__(self, offset: int) -> int:
        """A register's stored value, without read side effects (for the engines)."""
        return int(self.reg[offset >> 2])

    def __setitem__(self, offset: int, value: int) -> None:
        self.reg[offset >> 2] = value & 0xFFFFFFFF

    # ------------------------------------------------------------------ interrupts
    def irq_pending(self) -> int:
        return int(self.reg[E.ICR >> 2] & self.reg[E.IMS >> 2])

    def set_cause(self, bits: int) -> None:
        """Raise interrupt causes (ICS semantics)."""
        self.reg[E.ICR >> 2] |= bits & 0xFFFFFFFF
        self._update_irq()

    def _update_irq(self) -> None:
        line = self.irq_pending() != 0
        if line != self._line:
            self._line = line
            if self.on_irq is not None:
                self.on_irq(line)

    # ------------------------------------------------------------------ link
    def set_link(self, up: bool) -> None:
        """The cable (the switch port) went up or down: STATUS.LU, the PHY's
        link bit, and a link status change interrupt."""
        self.phy.set_link(up)
        if up and self.phy.autoneg_due is None:
            self.reg[E.STATUS >> 2] |= E.STATUS_LU
        elif not up:
            self.reg[E.STATUS >> 2] &= np.uint32(~E.STATUS_LU & 0xFFFFFFFF)
        self.set_cause(E.ICR_LSC)

    def tick(self) -> None:
        """Timers: a restarted autonegotiation completes (link up, LSC)."""
        if self.phy.tick(self.clock()):
            self.reg[E.STATUS >> 2] |= E.STATUS_LU
            self.set_cause(E.ICR_LSC)

    def link_up(self) -> bool:
        return bool(self.reg[E.STATUS >> 2] & E.STATUS_LU)

    # ------------------------------------------------------------------ BAR0
    def _index(self, offset: int, size: int) -> int:
        if size != 4 or offset & 3 or not 0 <= offset < E.MMIO_SIZE:
            self.bad_accesses += 1
            return -1
        i = offset >> 2
        if not KNOWN[i]:
            self.unknown[offset] += 1
            return -1
        return i

    def mmio_read(self, offset: int, size: int = 4) -> int:
        i = self._index(offset, size)
        if i < 0:
            return 0
        off = i << 2
        if off == E.ICR:
            v = int(self.reg[i])
            self.reg[i] = 0            # read to clear
            self._update_irq()
            return v
        if off == E.ICS:
            return int(self.reg[E.ICR >> 2])     # readable mirror, not cleared
        if off == E.IMC:
            return 0                   # write-only
        if off == E.EECD:
            return self.microwire.read()
        if off == E.EERD:
            return eerd_read(self.eeprom, int(self.reg[i]))
        if off == E.CTRL_DUP:
            return int(self.reg[E.CTRL >> 2])
        v = int(self.reg[i])
        if i in _CLEAR_ON_READ:
            self.reg[i] = 0
        elif i in _PAIR_LOW:           # a 64-bit counter: the high read clears both
            self.reg[i] = 0
            self.reg[_PAIR_LOW[i]] = 0
        return v

    def mmio_write(self, offset: int, value: int, size: int = 4) -> None:
        i = self._index(offset, size)
        if i < 0 or i in READ_ONLY:
            return
        value &= 0xFFFFFFFF
        off = i << 2
        if off in (E.CTRL, E.CTRL_DUP):
            if value & E.CTRL_RST:
                self.reset()           # R1: RST performs the reset, then self-clears
                return
            self.reg[E.CTRL >> 2] = value
        elif off == E.ICR:
            self.reg[i] &= ~np.uint32(value)     # write 1 to clear
            self._update_irq()
        elif off == E.ICS:
            self.set_cause(value)
        elif off == E.IMS:
            self.reg[i] |= np.uint32(value)
            self._update_irq()
        elif off == E.IMC:
            self.reg[E.IMS >> 2] &= ~np.uint32(value)
            self._update_irq()
        elif off == E.EECD:
            self.microwire.write(value)
            self.reg[i] = self.microwire.eecd
        elif off == E.MDIC:
            out, dropped = self.phy.mdic(value, self.clock())
            self.reg[i] = out
            if dropped:
                self.reg[E.STATUS >> 2] &= np.uint32(~E.STATUS_LU & 0xFFFFFFFF)
            if value & E.MDIC_INT_EN:
                self.set_cause(E.ICR_MDAC)
        elif off in (E.RDLEN, E.TDLEN):
            self.reg[i] = value & E.DLEN_MASK
        elif i in _MASK16:
            self.reg[i] = value & 0xFFFF
            if off == E.TDT and self.on_tx is not None:
                self.on_tx()
            elif off == E.RDT and self.on_rx is not None:
                self.on_rx()
        elif off == E.TCTL:
            self.reg[i] = value
            if value & E.TCTL_EN and self.on_tx is not None:
                self.on_tx()
        else:
            self.reg[i] = value

    # ------------------------------------------------------------------ BAR1
    def io_read(self, offset: int, size: int = 4) -> int:
        """The I/O window (A.1): IOADDR selects a BAR0 register, IODATA reaches it."""
        if size != 4 or offset not in (E.IOADDR, E.IODATA):
            self.bad_accesses += 1
            return 0
        if offset == E.IOADDR:
            return self.ioaddr
        return self.mmio_read(self.ioaddr)

    def io_write(self, offset: int, value: int, size: int = 4) -> None:
        if size != 4 or offset not in (E.IOADDR, E.IODATA):
            self.bad_accesses += 1
            return
        if offset == E.IOADDR:
            self.ioaddr = value & (E.MMIO_SIZE - 1)
        else:
            self.mmio_write(self.ioaddr, value)

    # ------------------------------------------------------------------ statistics
    def count(self, name: str, n: int = 1) -> None:
        """Add to a statistics register, saturating at 2^32 - 1 (A.4)."""
        i = E.STATS[name] >> 2
        self.reg[i] = min(0xFFFFFFFF, int(self.reg[i]) + n)

    def count64(self, low: str, n: int) -> None:
        """Add to a 64-bit counter kept as a low/high pair (GORC, GOTC, TOR, TOT)."""
        lo, hi = E.STATS[low] >> 2, E.STATS[low[:-1] + "H"] >> 2
        v = min((1 << 64) - 1, (int(self.reg[hi]) << 32 | int(self.reg[lo])) + n)
        self.reg[lo] = v & 0xFFFFFFFF
        self.reg[hi] = v >> 32
