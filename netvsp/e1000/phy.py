"""The 82540EM's internal PHY (Marvell M88E1011-compatible), reached through MDIC.

Reference: e1000_vfio.md A.6 (address 1, the registers Linux uses, QEMU's
capability table and initial values, self-clearing BMCR bits and the autoneg
link drop) and A.4 (MDIC: READY at once, ERROR for other addresses or
registers, MDAC when INT_EN). Initial values are QEMU's phy_reg_init.
"""
from __future__ import annotations

from . import regs as E

ADDRESS = 1
BMCR, BMSR, PHYID1, PHYID2, ANAR, ANLPAR, ANER = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
CTRL1000, STAT1000 = 0x09, 0x0A
M88_SPEC_CTRL, M88_SPEC_STATUS, M88_EXT_SPEC_CTRL, M88_RX_ERR_CNTR = 0x10, 0x11, 0x14, 0x15
# BMCR / BMSR / ANLPAR bits
BMCR_RESET, BMCR_LOOPBACK, BMCR_ANENABLE, BMCR_ANRESTART = 0x8000, 0x4000, 0x1000, 0x0200
BMSR_LINK, BMSR_ANEGCOMPLETE = 0x0004, 0x0020
ANLPAR_ACK = 0x4000
AUTONEG_S = 0.5             # QEMU completes autonegotiation 500 ms after a restart

R, W = 1, 2
CAPS = {BMCR: R | W, BMSR: R, PHYID1: R, PHYID2: R, ANAR: R | W, ANLPAR: R, ANER: R,
        CTRL1000: R | W, STAT1000: R, M88_SPEC_CTRL: R | W, M88_SPEC_STATUS: R,
        M88_EXT_SPEC_CTRL: R | W, M88_RX_ERR_CNTR: R}
INIT = {BMCR: 0x1140, BMSR: 0x794D, PHYID1: 0x0141, PHYID2: 0x0C20, ANAR: 0x0DE1,
        ANLPAR: 0x01E0, CTRL1000: 0x0E00, STAT1000: 0x3C00, M88_SPEC_CTRL: 0x0360,
        M88_SPEC_STATUS: 0xAC00, M88_EXT_SPEC_CTRL: 0x0D60}


class Phy:
    """32 registers and the autonegotiation the guest restarts through BMCR.
    ``link_up`` is the cable (the switch port's link); ``autoneg_due`` is when a
    restarted negotiation completes (the device model's clock, in seconds)."""

    def __init__(self):
        self.reg = [0] * 32
        self.link_up = True
        self.autoneg_due: float | None = None
        self.reset()

    def reset(self) -> None:
        self.reg = [0] * 32
        for r, v in INIT.items():
            self.reg[r] = v
        if not self.link_up:
            self.reg[BMSR] &= ~BMSR_LINK

    def mdic(self, value: int, now: float) -> tuple[int, bool]:
        """The guest wrote MDIC: returns (MDIC as it reads back, link dropped).
        READY is set at once; ERROR for another PHY address, an unknown register
        or an access the register does not allow."""
        reg = (value >> E.MDIC_REG_SHIFT) & 0x1F
        addr = (value >> E.MDIC_PHY_SHIFT) & 0x1F
        out = value & ~(E.MDIC_ERROR | E.MDIC_READY)
        dropped = False
        if addr != ADDRESS:
            out |= E.MDIC_ERROR
        elif value & E.MDIC_OP_READ:
            if not CAPS.get(reg, 0) & R:
                out |= E.MDIC_ERROR
            else:
                out = (out & ~E.MDIC_DATA_MASK) | self.reg[reg]
        elif value & E.MDIC_OP_WRITE:
            if not CAPS.get(reg, 0) & W:
                out |= E.MDIC_ERROR
            elif reg == BMCR:
                dropped = self._bmcr(value & E.MDIC_DATA_MASK, now)
            else:
                self.reg[reg] = value & E.MDIC_DATA_MASK
        return out | E.MDIC_READY, dropped

    def _bmcr(self, v: int, now: float) -> bool:
        # RESET and ANRESTART clear themselves; a restart with autoneg on drops
        # the link until the negotiation completes (A.6).
        self.reg[BMCR] = v & ~(BMCR_RESET | BMCR_ANRESTART)
        if v & BMCR_ANRESTART and v & BMCR_ANENABLE:
            self.reg[BMSR] &= ~(BMSR_LINK | BMSR_ANEGCOMPLETE)
            self.autoneg_due = now + AUTONEG_S
            return True
        return False

    def tick(self, now: float) -> bool:
        """Complete a due negotiation: True when the link came (back) up."""
        if self.autoneg_due is None or now < self.autoneg_due:
            return False
        self.autoneg_due = None
        self.reg[BMSR] |= BMSR_ANEGCOMPLETE
        if not self.link_up:
            return False
        self.reg[BMSR] |= BMSR_LINK
        self.reg[ANLPAR] |= ANLPAR_ACK
        return True

    def set_link(self, up: bool) -> None:
        self.link_up = up
        if up and self.autoneg_due is None:
            self.reg[BMSR] |= BMSR_LINK
        elif not up:
            self.reg[BMSR] &= ~BMSR_LINK
