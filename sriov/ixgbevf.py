"""The Intel 82599 VF (ixgbevf) as the software SR-IOV NIC presents it: BAR0's
registers and the VF <-> PF mailbox, with the PF's side of the mailbox (e1000_vfio.md
B.10; Linux's ixgbevf mbx.h/vf.c and ixgbe's ixgbe_sriov.c for the message formats).

Registers are trapped (served by vfio-user REGION_READ/WRITE, 32-bit accesses):
VFCTRL.RST resets the VF (RSTI while it runs, RSTD when done, both in
VFMAILBOX); VFMAILBOX's PFSTS, PFACK and RSTD clear when read (R2C_BITS).

The mailbox: the VF takes the buffer (VFU), writes up to 16 words to VFMBMEM and
sets REQ; the PF answers at once here: PFACK for the request, then its reply in
VFMBMEM with PFSTS; the VF reads it and writes ACK. Word 0 is the opcode with ACK,
NACK and CTS in its top bits and MSGINFO in bits 16-23.

The PF's policy, as ixgbe's: nothing but VF_RESET is served before a VF_RESET
(clear to send); VF_RESET answers the MAC the host assigned (NACK and zeros when
none); SET_MAC_ADDR for another MAC needs trust; SET_VLAN is refused while the
host set a port VLAN; API_NEGOTIATE takes 1.0-1.3; anything else is NACKed. A
MAC or VLAN the PF accepts becomes a filter of the VF's VPort in the embedded
switch (sriov/eswitch.py).
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading

import numpy as np

from switch.kernel import kernel
from switch.rxfilter import VLAN_UNTAGGED_OR_ZERO
from switch.syscalls import poll, write

from .eswitch import EmbeddedSwitch, EswitchError
from . import ixgbevf_rings as R
from .ixgbevf_rings import QREGS, QREGS_SIZE, TX_BASE, R_TAIL
from .vfio import lib
from .vfio_user import CommandError, UserDevice

# BAR0 registers (B.10)
VFCTRL, VFSTATUS, VFLINKS = 0x0000, 0x0008, 0x0010
VTEICR, VTEICS, VTEIMS, VTEIMC = 0x0100, 0x0104, 0x0108, 0x010C
VFMBMEM, VFMAILBOX = 0x0200, 0x02FC
BAR0_SIZE = 16 * 1024
CTRL_RST = 1 << 26
LINKS_UP = 1 << 30
LINKS_SPEED_10G = 3 << 28

# VFMAILBOX bits
MB_REQ, MB_ACK, MB_VFU, MB_PFU = 0x01, 0x02, 0x04, 0x08
MB_PFSTS, MB_PFACK, MB_RSTI, MB_RSTD = 0x10, 0x20, 0x40, 0x80
MB_R2C = 0xB0
MB_WORDS = 16

# Message word 0
MSG_ACK, MSG_NACK, MSG_CTS = 0x80000000, 0x40000000, 0x20000000
MSGINFO_SHIFT = 16
VF_RESET, SET_MAC_ADDR, SET_MULTICAST, SET_VLAN = 0x01, 0x02, 0x03, 0x04
SET_LPE, SET_MACVLAN, API_NEGOTIATE, GET_QUEUES = 0x05, 0x06, 0x08, 0x09
# enum ixgbe_pfvf_api_rev: 1.0 = 0, 2.0 = 1 (Solaris), 1.1 = 2, 1.2 = 3, 1.3 = 4
API_10, API_20, API_11, API_12, API_13 = 0, 1, 2, 3, 4
SUPPORTED_APIS = (API_10, API_11, API_12, API_13)
MAX_VLANS = 32          # VLAN filters one VF may add: the switch's table is shared
PCI_VENDOR, PCI_DEVICE = 0x8086, 0x10ED        # 82599 Virtual Function


def mac_words(mac: bytes) -> tuple[int, int]:
    """Six MAC bytes as mailbox words 1-2 (memcpy into u32s, little-endian)."""
    w1, w2 = struct.unpack("<IH", mac)
    return w1, w2


def words_mac(w1: int, w2: int) -> bytes:
    return struct.pack("<IH", w1 & 0xFFFFFFFF, w2 & 0xFFFF)


class VfPolicy:
    """What the host decided for one VF (B.9's VF settings)."""

    def __init__(self, mac: bytes | None = None, vlan: int = 0, trust: bool = False):
        self.mac, self.vlan, self.trust = mac, vlan, trust


POLLOUT = 4


@kernel
def signal_if_writable(fd, pfd, one):
    """Add 1 to the eventfd ``fd`` only if that cannot block (poll() says POLLOUT):
    one compiled call, where a select() and a write from Python cost several
    microseconds per interrupt. Returns what write() returned, or 0."""
    pfd[0] = fd
    pfd[1] = POLLOUT
    if poll(pfd.ctypes.data, 1, 0) != 1 or not (pfd[1] >> 16) & POLLOUT:
        return 0
    return write(fd, one.ctypes.data, 8)


class Ixgbevf(UserDevice):
    """VF ``vf`` of the software NIC, with the PF's mailbox policy ``policy``."""

    def __init__(self, vf: int, policy: VfPolicy, eswitch: EmbeddedSwitch | None = None):
        self.vf, self.policy, self.eswitch = vf, policy, eswitch
        self.regs = np.zeros(BAR0_SIZE // 4, np.uint32)        # trapped: the host's own
        # The queue-register pages live in memory the driver maps and writes (its
        # doorbells), so they are a memfd of their own: the trapped registers are
        # never in memory the guest holds. The file starts at BAR0's offset 0 so the
        # pages sit at their BAR offsets; the first page of it is unused.
        self._queue_pages()
        self.icr = np.zeros(1, np.int64)                         # VTEICR, for the engines
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, PCI_VENDOR, PCI_DEVICE)
        self.irqs: list[int] = []
        self.irq_lock = threading.Lock()          # the data path rings, the server sets
        self._pfd = np.zeros(2, np.int32)
        self._one = np.array([1], np.uint64).view(np.uint8)
        self.txs = np.zeros(R.NTXS, np.int64)     # a frame being gathered, offload context
        self.stats = {"bad_access": 0, "nacked": 0, "messages": 0, "irq_lost": 0}
        self.api = API_10
        self._reset_state()

    # ---- state -------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.regs[:] = 0
        self.q[:] = 0
        self.icr[0] = 0
        self.txs[:] = 0
        self.vlans: set[int] = set()
        self.regs[VFLINKS // 4] = LINKS_UP | LINKS_SPEED_10G
        self.regs[VFMAILBOX // 4] = MB_RSTD               # reset done, not yet read
        self.clear_to_send = False
        self.api = API_10

    def reset(self) -> None:
        self._reset_state()

    def _queue_pages(self) -> None:
        """New queue-register pages and TDT doorbell (what the guest maps and holds)."""
        self.qfd = os.memfd_create(f"ixgbevf{self.vf}-qregs",
                                   os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(self.qfd, QREGS + QREGS_SIZE)
        # The guest gets this fd: sealed, so it cannot shrink the file under our
        # mapping (a SIGBUS in the host) or grow it.
        fcntl.fcntl(self.qfd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self._qmap = mmap.mmap(self.qfd, QREGS + QREGS_SIZE)
        self.q = np.frombuffer(self._qmap, np.uint32)[QREGS // 4:]
        self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def renew(self) -> None:
        """Reset for a new owner (the VF freed, maybe assigned to another VM next):
        new queue-register pages and doorbell, so whoever held the old ones (a
        guest may keep a mapping or a copy of the fd past its removal) writes only
        to memory no engine reads any more."""
        old = self._qmap, self.qfd, self.doorbell
        self._queue_pages()
        self._reset_state()
        qmap, qfd, bell = old
        try:
            qmap.close()
        except BufferError:                      # an engine's view: freed with it
            pass
        os.close(qfd)
        os.close(bell)

    # ---- vfio-user device ----------------------------------------------------------------
    def info(self):
        return lib.VFIO_DEVICE_FLAGS_PCI | lib.VFIO_DEVICE_FLAGS_RESET, \
            lib.VFIO_PCI_NUM_REGIONS, lib.VFIO_PCI_MSIX_IRQ_INDEX + 1

    def region_info(self, index):
        rw = lib.VFIO_REGION_INFO_FLAG_READ | lib.VFIO_REGION_INFO_FLAG_WRITE
        if index == lib.VFIO_PCI_BAR0_REGION_INDEX:
            # Trapped, but for the queue-register pages (sparse mmap): the mailbox,
            # reset and interrupt registers have effects the model must see.
            return rw | lib.VFIO_REGION_INFO_FLAG_MMAP, BAR0_SIZE, self.qfd, \
                [(QREGS, QREGS_SIZE)]
        if index == lib.VFIO_PCI_CONFIG_REGION_INDEX:
            return rw, len(self.config), None
        return 0, 0, None

    def region_read(self, index, offset, count):
        if index == lib.VFIO_PCI_CONFIG_REGION_INDEX:
            return bytes(self.config[offset:offset + count])
        return struct.pack("<I", self.read32(self._reg(offset, count)))

    def region_write(self, index, offset, data):
        if index == lib.VFIO_PCI_CONFIG_REGION_INDEX:
            # Only the command register (bus master, memory space) is writable.
            if offset == 4 and len(data) == 2:
                self.config[4:6] = data
            return
        self.write32(self._reg(offset, len(data)), struct.unpack("<I", data)[0])

    def _reg(self, offset: int, count: int) -> int:
        if count != 4 or offset % 4:
            self.stats["bad_access"] += 1
            raise CommandError(errno.EINVAL, f"BAR0 access of {count} bytes at {offset:#x}: "
                               f"the VF's registers take aligned 32-bit accesses")
        return offset

    def region_io_fds(self, index):
        """TDT's ioeventfd: the driver signals it after moving the tail (as KVM would
        on its MMIO write), which wakes the host's data path."""
        if index == lib.VFIO_PCI_BAR0_REGION_INDEX:
            return [(QREGS + TX_BASE + R_TAIL, 4, self.doorbell)]
        return []

    def irq_info(self, index):
        if index == lib.VFIO_PCI_MSIX_IRQ_INDEX:
            return lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_NORESIZE, 3
        return 0, 0

    def set_irqs(self, index, flags, start, count, fds):
        if index != lib.VFIO_PCI_MSIX_IRQ_INDEX:
            raise CommandError(errno.EINVAL, "the VF has MSI-X only")
        for fd in fds:                             # eventfds only, never blocking us
            try:
                kind = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                kind = ""
            if kind != "anon_inode:[eventfd]":
                raise CommandError(errno.EINVAL, f"an MSI-X vector's fd is {kind or 'gone'}, "
                                   f"not an eventfd")
            os.set_blocking(fd, False)
        with self.irq_lock:
            old, self.irqs = self.irqs, list(fds)
        for fd in old:
            os.close(fd)

    def disconnected(self):
        with self.irq_lock:
            old, self.irqs = self.irqs, []
        for fd in old:
            if fd >= 0:
                os.close(fd)

    def interrupt(self) -> None:
        """MSI-X vector 0 (queue 0 and the mailbox share it here), if unmasked and
        wired; VTEICR already holds the cause. The eventfd is the guest's too: one
        it filled (or made blocking again) loses the interrupt, never stalls us."""
        if not int(self.regs[VTEIMS // 4]) & 1:
            return
        with self.irq_lock:
            if not self.irqs or self.irqs[0] < 0:
                return
            if signal_if_writable(self.irqs[0], self._pfd, self._one) != 8:
                self.stats["irq_lost"] += 1

    def close(self) -> None:
        self.disconnected()
        self.q = None
        try:
            self._qmap.close()
        except BufferError:
            pass
        os.close(self.qfd)
        os.close(self.doorbell)

    # ---- registers ---------------------------------------------------------------------
    def read32(self, off: int) -> int:
        if QREGS <= off < QREGS + QREGS_SIZE:
            return int(self.q[(off - QREGS) // 4])
        if off == VTEICR:
            v = int(self.regs[off // 4]) | int(self.icr[0])
            self.regs[off // 4] = 0
            self.icr[0] = 0
            return v
        v = int(self.regs[off // 4])
        if off == VFMAILBOX:
            self.regs[off // 4] = v & ~MB_R2C              # read to clear
        return v

    def write32(self, off: int, v: int) -> None:
        if QREGS <= off < QREGS + QREGS_SIZE:
            self.q[(off - QREGS) // 4] = v
            return
        if off == VFCTRL:
            if v & CTRL_RST:
                self._reset_state()                       # RSTI then RSTD, at once here
            return
        if off == VFMAILBOX:
            self._mailbox_write(v)
            return
        if VFMBMEM <= off < VFMBMEM + 4 * MB_WORDS:
            self.regs[off // 4] = v
            return
        if off in (VTEIMS, VTEIMC, VTEICS):
            self.regs[off // 4] = v
            return
        if off in (VFSTATUS, VFLINKS, VTEICR):
            return                                        # read-only
        self.regs[off // 4] = v                           # queue registers and the rest

    # ---- the mailbox ---------------------------------------------------------------------
    def _mailbox_write(self, v: int) -> None:
        mb = int(self.regs[VFMAILBOX // 4])
        if v & MB_VFU:
            mb |= MB_VFU
        else:
            mb &= ~MB_VFU
        self.regs[VFMAILBOX // 4] = mb
        if v & MB_REQ:
            msg = [int(x) for x in self.regs[VFMBMEM // 4:VFMBMEM // 4 + MB_WORDS]]
            reply = self._pf_handle(msg)
            self.regs[VFMBMEM // 4:VFMBMEM // 4 + len(reply)] = reply
            self.regs[VFMAILBOX // 4] |= MB_PFACK | MB_PFSTS
        # ACK from the VF: it has read the PF's message; nothing to keep.

    def _pf_handle(self, msg: list[int]) -> list[int]:
        """The PF's answer to a VF request (ixgbe_rcv_msg_from_vf)."""
        self.stats["messages"] += 1
        op = msg[0] & 0xFFFF
        p = self.policy
        if op == VF_RESET:
            self.clear_to_send = True
            self.api = API_10
            if p.mac is None:
                self.stats["nacked"] += 1
                return [VF_RESET | MSG_NACK, 0, 0, 0]
            w1, w2 = mac_words(p.mac)
            return [VF_RESET | MSG_ACK, w1, w2, 0]
        if not self.clear_to_send:
            self.stats["nacked"] += 1
            return [op | MSG_NACK]
        ok, extra = False, []
        if op == SET_MAC_ADDR:
            mac = words_mac(msg[1], msg[2])
            ok = mac[0] & 1 == 0 and mac != bytes(6) and (p.trust or mac == p.mac)
            if ok and mac != p.mac:
                ok = self._refilter(p.mac, mac)
                if ok:
                    p.mac = mac
        elif op == SET_VLAN:
            add, vid = (msg[0] >> MSGINFO_SHIFT) & 0xFF, msg[1] & 0xFFF
            ok = (p.vlan == 0 and 1 <= vid <= 4094
                  and (not add or vid in self.vlans or len(self.vlans) < MAX_VLANS))
            if ok:
                ok = self._vlan_filter(vid, bool(add))
        elif op == API_NEGOTIATE:
            ok = msg[1] in SUPPORTED_APIS
            if ok:
                self.api = msg[1]
        elif op == GET_QUEUES:
            ok = self.api >= API_11
            extra = [1, 1, 1 if p.vlan else 0, 0]        # tx, rx, port VLAN, default queue
        elif op in (SET_MULTICAST, SET_LPE):
            ok = True                                     # accepted, nothing to filter here
        if not ok:
            self.stats["nacked"] += 1
        return [op | (MSG_ACK if ok else MSG_NACK) | MSG_CTS] + (extra if ok else [])

    def _refilter(self, old: bytes | None, new: bytes) -> bool:
        """The VPort's filter follows the new MAC: set first, the old one cleared
        after, so a full table refuses the change instead of losing the MAC."""
        es = self.eswitch
        if es is None or (v := es.vport_of(self.vf)) is None:
            return True
        stale = [f for f, mac, _ in es.filters(v)
                 if old is not None and mac == int.from_bytes(old, "big")]
        try:
            es.set_filter(v, int.from_bytes(new, "big"),
                          self.policy.vlan or VLAN_UNTAGGED_OR_ZERO)
        except EswitchError:
            return False
        for f in stale:
            es.clear_filter(f)
        return True

    def _vlan_filter(self, vid: int, add: bool) -> bool:
        es, mac = self.eswitch, self.policy.mac
        if es is None or mac is None or (v := es.vport_of(self.vf)) is None:
            return True
        m = int.from_bytes(mac, "big")
        mine = [f for f, fm, fv in es.filters(v) if fm == m and fv == vid]
        if add and not mine:
            try:
                es.set_filter(v, m, vid)
            except EswitchError:               # the shared table is full: refused
                return False
        elif not add:
            for f in mine:
                es.clear_filter(f)
        (self.vlans.add if add else self.vlans.discard)(vid)
        return True


class Mailbox:
    """The VF driver's side of the mailbox (ixgbevf's write_posted/read_posted), over
    any device with ``region_read``/``region_write`` of BAR0 (kernel vfio or
    vfio-user)."""

    def __init__(self, dev, tries: int = 2000):
        self.dev, self.tries = dev, tries

    def _rd(self, off: int) -> int:
        return struct.unpack("<I", self.dev.region_read(lib.VFIO_PCI_BAR0_REGION_INDEX,
                                                        off, 4))[0]

    def _wr(self, off: int, v: int) -> None:
        self.dev.region_write(lib.VFIO_PCI_BAR0_REGION_INDEX, off, struct.pack("<I", v))

    def _poll(self, bit: int) -> None:
        for _ in range(self.tries):
            if self._rd(VFMAILBOX) & bit:
                return
        raise TimeoutError(f"mailbox: bit {bit:#x} never came")

    def request(self, words: list[int]) -> list[int]:
        if not 1 <= len(words) <= MB_WORDS:
            raise ValueError(f"{len(words)} words: 1..{MB_WORDS}")
        self._wr(VFMAILBOX, MB_VFU)                       # take the buffer
        if not self._rd(VFMAILBOX) & MB_VFU:
            raise TimeoutError("mailbox: the PF holds the buffer")
        for k, w in enumerate(words):
            self._wr(VFMBMEM + 4 * k, w)
        self._wr(VFMAILBOX, MB_REQ)
        # PFACK and PFSTS are read-to-clear and may come in one read: keep both.
        seen = 0
        for _ in range(self.tries):
            seen |= self._rd(VFMAILBOX)
            if seen & MB_PFACK and seen & MB_PFSTS:
                break
        else:
            raise TimeoutError("mailbox: no answer from the PF")
        reply = [self._rd(VFMBMEM + 4 * k) for k in range(MB_WORDS)]
        self._wr(VFMAILBOX, MB_ACK)
        return reply

    def reset_vf(self) -> bytes | None:
        """VFCTRL.RST, wait for RSTD, then VF_RESET: the MAC the PF assigned, or None
        (NACK: the driver then picks its own and asks SET_MAC_ADDR)."""
        self._wr(VFCTRL, CTRL_RST)
        self._poll(MB_RSTD)
        r = self.request([VF_RESET])
        if r[0] & 0xFFFF != VF_RESET:
            raise OSError(errno.EPROTO, f"VF_RESET answered with {r[0]:#x}")
        return words_mac(r[1], r[2]) if r[0] & MSG_ACK else None

    def negotiate(self, apis=(API_13, API_12, API_11, API_10)) -> int:
        for api in apis:
            if self.request([API_NEGOTIATE, api])[0] & MSG_ACK:
                return api
        raise OSError(errno.EPROTO, "the PF takes none of the mailbox API versions")
