"""The 82540EM device model's registers (e1000_vfio.md A.1-A.6, R1): each register's
semantics as Linux's e1000 driver relies on them, the EEPROM read the way Linux
reads it on this part, the PHY through MDIC, and what a hostile guest's accesses
get."""
from __future__ import annotations

import pytest

from hypervisor.pci import CMD_BUS_MASTER, COMMAND, ConfigSpace
from netvsp.e1000 import eeprom as EE
from netvsp.e1000 import phy as PHY
from netvsp.e1000 import regs as E
from netvsp.e1000.rx import rx_buffer_size
from netvsp.e1000.device import E1000

MAC = bytes.fromhex("020000e10001")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def dev(**kw):
    return E1000(MAC, **kw)


# ---------------------------------------------------------------- PCI (A.1)
def test_pci_identity_and_bar_sizing():
    c = ConfigSpace(E.VENDOR_ID, E.DEVICE_ID, E.REVISION, E.CLASS_CODE,
                    [(E.MMIO_SIZE, False), (E.IO_SIZE, True)], cache_line=0x10)
    assert (c.read(0, 2), c.read(2, 2), c.read(8, 1)) == (0x8086, 0x100E, 3)
    assert c.read(8, 4) >> 8 == 0x020000 and c.read(0x3D, 1) == 1
    c.write(0x10, 0xFFFFFFFF)
    c.write(0x14, 0xFFFFFFFF)
    assert c.read(0x10) == 0xFFFE0000                  # 128 KiB memory BAR
    assert c.read(0x14) == 0xFFFFFFC1                  # 64-byte I/O BAR
    c.write(0x10, 0xFEB00000)
    assert c.bar(0) == 0xFEB00000
    assert not c.bus_master()
    c.write(COMMAND, CMD_BUS_MASTER | 0x3, 2)
    assert c.bus_master()
    c.write(0, 0x12345678)                             # identity is read-only
    assert c.read(0) == 0x100E8086
    assert c.read(0x3FF, 4) == 0xFFFFFFFF and c.read(0x11, 4) == 0xFFFFFFFF
    c.write(0x101, 1)
    assert c.writes_refused == 1


# ---------------------------------------------------------------- reset state (A.4)
def test_reset_values_and_mac_in_ral_rah():
    d = dev()
    assert d.mmio_read(E.STATUS) == 0x80080783
    assert d.mmio_read(E.STATUS) & E.STATUS_LU
    assert d.mmio_read(E.CTRL) == E.CTRL_SWDPIN2 | E.CTRL_SWDPIN0 | E.CTRL_SPD_1000 | E.CTRL_SLU
    assert (d.mmio_read(E.PBA), d.mmio_read(E.LEDCTL), d.mmio_read(E.VET)) == \
        (0x00100030, 0x602, 0x8100)
    assert d.mmio_read(E.MANC) & E.MANC_ARP_EN
    assert d.mmio_read(E.RAL(0)) == 0xE1000002 and d.mmio_read(E.RAH(0)) == 0x80000100
    assert d.mmio_read(E.RAL(1)) == 0 and d.mmio_read(E.RCTL) == 0


def test_ctrl_rst_resets_the_device_and_clears_itself():
    d = dev()
    d.mmio_write(E.RCTL, E.RCTL_EN | E.RCTL_BAM)
    d.mmio_write(E.IMS, E.IMS_ENABLE_MASK)
    d.mmio_write(E.RAL(0), 0x11223344)
    d.mmio_write(E.CTRL, d.mmio_read(E.CTRL) | E.CTRL_RST)
    assert not d.mmio_read(E.CTRL) & E.CTRL_RST
    assert d.mmio_read(E.RCTL) == 0 and d.mmio_read(E.IMS) == 0
    assert d.mmio_read(E.RAL(0)) == 0xE1000002 and d.resets == 2
    d.mmio_write(E.CTRL_DUP, E.CTRL_SLU | E.CTRL_FD)            # the alias writes CTRL
    assert d.mmio_read(E.CTRL) == d.mmio_read(E.CTRL_DUP) == E.CTRL_SLU | E.CTRL_FD


def test_reset_through_the_io_window_as_linux_does_on_the_82540():
    d = dev()
    d.mmio_write(E.RCTL, E.RCTL_EN)
    d.io_write(E.IOADDR, E.CTRL)
    assert d.io_read(E.IOADDR) == E.CTRL
    ctrl = d.io_read(E.IODATA)
    assert ctrl == d.mmio_read(E.CTRL)
    d.io_write(E.IODATA, ctrl | E.CTRL_RST)
    assert d.mmio_read(E.RCTL) == 0 and d.resets == 2
    d.io_write(E.IOADDR, E.RDLEN)
    d.io_write(E.IODATA, 4096 + 5)
    assert d.mmio_read(E.RDLEN) == 4096


# ---------------------------------------------------------------- interrupts (A.4, A.11)
def test_icr_ics_ims_imc():
    d = dev()
    line = []
    d.on_irq = line.append
    d.mmio_write(E.ICS, E.ICR_LSC | E.ICR_RXT0)
    assert d.mmio_read(E.ICS) == E.ICR_LSC | E.ICR_RXT0          # readable mirror
    assert line == []                                            # masked
    d.mmio_write(E.IMS, 0)                                       # IMS=0 changes nothing
    d.mmio_write(E.IMS, E.IMS_ENABLE_MASK)
    assert d.mmio_read(E.IMS) == E.IMS_ENABLE_MASK and line == [True]
    d.mmio_write(E.IMC, 0xFFFFFFFF)                              # Linux's disable
    assert d.mmio_read(E.IMS) == 0 and line == [True, False]
    d.mmio_write(E.IMS, E.IMS_ENABLE_MASK)
    assert d.mmio_read(E.ICR) == E.ICR_LSC | E.ICR_RXT0          # read ...
    assert d.mmio_read(E.ICR) == 0 and line == [True, False, True, False]   # ... clears
    d.set_cause(E.ICR_TXDW | E.ICR_TXQE)
    d.mmio_write(E.ICR, E.ICR_TXDW)                              # write 1 to clear
    assert d.mmio_read(E.ICS) == E.ICR_TXQE
    assert d.mmio_read(E.IMC) == 0                               # write-only


# ---------------------------------------------------------------- EEPROM (A.5)
def test_eeprom_image_checksum_and_mac():
    w = EE.image(MAC)
    assert len(w) == 64 and sum(w) & 0xFFFF == 0xBABA and EE.checksum_ok(w)
    assert w[0:3] == [0x0002, 0xE100, 0x0100]            # low byte first
    assert (w[0x0B], w[0x0C], w[0x0D], w[0x0E]) == (0x100E, 0x8086, 0x100E, 0x8086)
    with pytest.raises(ValueError):
        EE.image(b"\x02\x00")


def linux_read_word(d, addr):
    """Linux e1000's Microwire read on the 82540 (L-HW): acquire (REQ, wait for
    GNT), CS, shift out READ (110) and 6 address bits MSB first on DI, each with a
    clock pulse, then 16 clock pulses reading DO, then deselect."""
    eecd = d.mmio_read(E.EECD)
    d.mmio_write(E.EECD, eecd | E.EECD_REQ)
    assert d.mmio_read(E.EECD) & E.EECD_GNT and d.mmio_read(E.EECD) & E.EECD_PRES
    eecd = d.mmio_read(E.EECD) & ~(E.EECD_DI | E.EECD_SK | E.EECD_DO | E.EECD_GNT |
                                   E.EECD_PRES)
    eecd |= E.EECD_CS
    d.mmio_write(E.EECD, eecd)
    bits = (EE.READ_OPCODE << 6) | addr
    for k in range(8, -1, -1):
        di = E.EECD_DI if bits >> k & 1 else 0
        d.mmio_write(E.EECD, eecd | di)
        d.mmio_write(E.EECD, eecd | di | E.EECD_SK)
        d.mmio_write(E.EECD, eecd | di)
    word = 0
    for _ in range(16):
        d.mmio_write(E.EECD, eecd | E.EECD_SK)
        word = word << 1 | (1 if d.mmio_read(E.EECD) & E.EECD_DO else 0)
        d.mmio_write(E.EECD, eecd)
    d.mmio_write(E.EECD, eecd & ~(E.EECD_CS | E.EECD_REQ))
    return word


def test_eeprom_by_microwire_bit_banging_as_linux_reads_it():
    d = dev()
    words = [linux_read_word(d, a) for a in range(64)]
    assert words == EE.image(MAC) and sum(words) & 0xFFFF == 0xBABA
    assert not d.mmio_read(E.EECD) & E.EECD_SIZE                # 64 words, 6 address bits


def test_eeprom_through_eerd():
    d = dev()
    d.mmio_write(E.EERD, E.EERD_START | (1 << E.EERD_ADDR_SHIFT))
    v = d.mmio_read(E.EERD)
    assert v & E.EERD_DONE and v >> 16 == 0xE100 and not v & E.EERD_START
    d.mmio_write(E.EERD, E.EERD_START | (0x40 << E.EERD_ADDR_SHIFT))
    assert d.mmio_read(E.EERD) >> 16 == 0 and d.mmio_read(E.EERD) & E.EERD_DONE


# ---------------------------------------------------------------- PHY through MDIC (A.6)
def mdic(d, reg, op=E.MDIC_OP_READ, data=0, addr=1, extra=0):
    d.mmio_write(E.MDIC, op | extra | reg << E.MDIC_REG_SHIFT | addr << E.MDIC_PHY_SHIFT | data)
    return d.mmio_read(E.MDIC)


def test_mdic_phy_identity_and_errors():
    d = dev()
    v = mdic(d, PHY.PHYID1)
    assert v & E.MDIC_READY and not v & E.MDIC_ERROR and v & 0xFFFF == 0x0141
    assert mdic(d, PHY.PHYID2) & 0xFFFF == 0x0C20             # M88E1011_I_PHY_ID 0x01410C20
    assert mdic(d, PHY.BMSR) & PHY.BMSR_LINK
    assert mdic(d, PHY.PHYID1, addr=2) & E.MDIC_ERROR          # another PHY address
    assert mdic(d, 0x1F) & E.MDIC_ERROR                        # no such register
    assert mdic(d, PHY.PHYID1, E.MDIC_OP_WRITE, 0x1234) & E.MDIC_ERROR   # read-only
    assert mdic(d, PHY.ANAR, E.MDIC_OP_WRITE, 0x0DE1) & E.MDIC_READY
    assert mdic(d, PHY.M88_EXT_SPEC_CTRL, E.MDIC_OP_WRITE, 0x0D62) & E.MDIC_READY
    assert mdic(d, PHY.M88_EXT_SPEC_CTRL) & 0xFFFF == 0x0D62
    assert not d.mmio_read(E.ICS) & E.ICR_MDAC
    mdic(d, PHY.PHYID1, extra=E.MDIC_INT_EN)
    assert d.mmio_read(E.ICS) & E.ICR_MDAC


def test_bmcr_reset_clears_itself_and_autoneg_restart_drops_the_link_for_500ms():
    clock = Clock()
    d = dev(clock=clock)
    mdic(d, PHY.BMCR, E.MDIC_OP_WRITE, 0x1140 | PHY.BMCR_RESET)
    assert mdic(d, PHY.BMCR) & 0xFFFF == 0x1140
    mdic(d, PHY.BMCR, E.MDIC_OP_WRITE, PHY.BMCR_ANENABLE | PHY.BMCR_ANRESTART | 0x140)
    assert not mdic(d, PHY.BMCR) & PHY.BMCR_ANRESTART
    assert not d.mmio_read(E.STATUS) & E.STATUS_LU and not mdic(d, PHY.BMSR) & PHY.BMSR_LINK
    clock.t += 0.4
    d.tick()
    assert not d.link_up()
    clock.t += 0.2
    d.tick()
    assert d.link_up() and d.mmio_read(E.ICS) & E.ICR_LSC
    bmsr = mdic(d, PHY.BMSR)
    assert bmsr & PHY.BMSR_LINK and bmsr & PHY.BMSR_ANEGCOMPLETE
    assert mdic(d, PHY.ANLPAR) & PHY.ANLPAR_ACK


def test_link_down_and_up_from_the_switch():
    d = dev()
    d.set_link(False)
    assert not d.link_up() and not mdic(d, PHY.BMSR) & PHY.BMSR_LINK
    assert d.mmio_read(E.ICR) & E.ICR_LSC
    d.set_link(True)
    assert d.link_up() and d.mmio_read(E.ICR) & E.ICR_LSC


# ---------------------------------------------------------------- rings and doorbells (A.4)
def test_ring_registers_masks_and_doorbells():
    d = dev()
    tx, rx = [], []
    d.on_tx = lambda: tx.append(d[E.TDT])
    d.on_rx = lambda: rx.append(d[E.RDT])
    d.mmio_write(E.TDLEN, 256 * 16 + 100)
    d.mmio_write(E.RDLEN, 0xFFFFFFFF)
    assert d.mmio_read(E.TDLEN) == 4096 and d.mmio_read(E.RDLEN) == 0xFFF80
    d.mmio_write(E.TDT, 0x12345)
    d.mmio_write(E.RDT, 0xABCDE)
    assert tx == [0x2345] and rx == [0xBCDE]
    d.mmio_write(E.TCTL, E.TCTL_PSP)                     # not enabled: no transmit
    d.mmio_write(E.TCTL, E.TCTL_PSP | E.TCTL_EN)
    assert tx == [0x2345, 0x2345]
    for r in (E.RDH, E.TDH, E.RDTR, E.RADV, E.TADV, E.ITR):
        d.mmio_write(r, 0xFFFFFFFF)
        assert d.mmio_read(r) == 0xFFFF
    d.mmio_write(E.TIDV, 0xFFFFFFFF)
    assert d.mmio_read(E.TIDV) == 0xFFFFFFFF


@pytest.mark.parametrize("rctl,size", [(0, 2048), (1 << 16, 1024), (2 << 16, 512),
                                       (3 << 16, 256), (E.RCTL_BSEX, 2048),
                                       (E.RCTL_BSEX | 1 << 16, 16384),
                                       (E.RCTL_BSEX | 2 << 16, 8192),
                                       (E.RCTL_BSEX | 3 << 16, 4096)])
def test_receive_buffer_size_decoding(rctl, size):
    assert rx_buffer_size(rctl) == size


# ---------------------------------------------------------------- statistics (A.4)
def test_statistics_clear_on_read_and_64_bit_pairs():
    d = dev()
    d.count("GPRC", 5)
    d.count("CRCERRS", 2)
    d.count64("GORCL", (3 << 32) + 7)
    assert d.mmio_read(E.STATS["GPRC"]) == 5 and d.mmio_read(E.STATS["GPRC"]) == 0
    assert d.mmio_read(E.STATS["CRCERRS"]) == 2 == d.mmio_read(E.STATS["CRCERRS"])
    assert d.mmio_read(E.STATS["GORCL"]) == 7                  # the low read keeps it
    assert d.mmio_read(E.STATS["GORCH"]) == 3                  # the high read clears both
    assert d.mmio_read(E.STATS["GORCL"]) == 0 and d.mmio_read(E.STATS["GORCH"]) == 0
    d.count("MPC", 0xFFFFFFF0)
    d.count("MPC", 0x100)
    assert d.mmio_read(E.STATS["MPC"]) == 0xFFFFFFFF           # saturates
    d.mmio_write(E.STATS["MPC"], 0)                            # read-only
    assert d.mmio_read(E.STATS["MPC"]) == 0xFFFFFFFF


# ---------------------------------------------------------------- hostile accesses
@pytest.mark.parametrize("offset,size", [(0x02, 4), (E.MMIO_SIZE, 4), (-4, 4),
                                         (E.CTRL, 2), (E.CTRL, 8), (1 << 40, 4)])
def test_bad_accesses_are_refused_and_counted(offset, size):
    d = dev()
    before = d.mmio_read(E.CTRL)
    assert d.mmio_read(offset, size) == 0
    d.mmio_write(offset, 0xFFFFFFFF, size)
    assert d.bad_accesses == 2 and d.mmio_read(E.CTRL) == before


def test_unknown_and_read_only_registers():
    d = dev()
    d.mmio_write(0x0F00, 0xDEADBEEF)                           # no register there
    assert d.mmio_read(0x0F00) == 0 and d.unknown[0x0F00] == 2
    d.mmio_write(E.STATUS, 0)
    assert d.link_up()
    d.mmio_write(E.ICS, 1 << 40 | 1)                           # wider than 32 bits
    assert d.mmio_read(E.ICR) == 1
    assert d.io_read(0x08) == 0 and d.bad_accesses == 1        # outside the I/O window
    d.io_write(E.IOADDR, 0xFFFFFFFF)                           # an address past BAR0
    assert d.io_read(E.IOADDR) < E.MMIO_SIZE
    with pytest.raises(ValueError):
        E1000(bytes.fromhex("030000000001"))                   # multicast
