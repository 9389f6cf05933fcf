"""The 82599 VF model and its PF mailbox, driven as ixgbevf drives it, through
vfio-user over a real socket pair: reset and RSTD, VF_RESET with the assigned MAC,
API negotiation, queues, the PF's policy on MAC and VLAN changes (and the filters it
sets in the embedded switch), and a guest that breaks the rules."""
from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest

from sriov import ixgbevf as X
from sriov import vfio_user as U
from sriov.eswitch import DEFAULT_VPORT, EmbeddedSwitch
from sriov.vfio import lib
from switch.port import mac_to_int
from switch.rxfilter import VLAN_UNTAGGED_OR_ZERO

MAC = bytes.fromhex("02000000a001")


@pytest.fixture
def vf():
    def make(mac=MAC, vlan=0, trust=False):
        es = EmbeddedSwitch(num_vfs=1)
        v = es.create_vport(vf=0)
        if mac is not None:
            es.set_filter(v, int.from_bytes(mac, "big"))
        dev = X.Ixgbevf(0, X.VfPolicy(mac, vlan, trust), es)
        a, b = socket.socketpair()
        srv = U.Server(b, dev)
        t = threading.Thread(target=srv.serve, daemon=True)
        t.start()
        cl = U.Client(a)
        cl.version()
        made.append((cl, t, dev))
        return cl, dev, es, v
    made = []
    yield make
    for cl, t, dev in made:
        cl.close()
        t.join(5)
        dev.close()


def test_mac_word_layout_is_linuxs_memcpy():
    assert X.mac_words(bytes.fromhex("001122334455")) == (0x33221100, 0x5544)
    assert X.words_mac(0x33221100, 0x5544) == bytes.fromhex("001122334455")


def test_bring_up_as_ixgbevf_does(vf):
    cl, dev, es, v = vf()
    assert cl.config_read(0, 4) == struct.pack("<HH", 0x8086, 0x10ED)
    mb = X.Mailbox(cl)
    assert mb.reset_vf() == MAC
    assert mb.negotiate() == X.API_13
    r = mb.request([X.GET_QUEUES])
    assert r[0] == X.GET_QUEUES | X.MSG_ACK | X.MSG_CTS and r[1:5] == [1, 1, 0, 0]
    links = struct.unpack("<I", cl.region_read(0, X.VFLINKS, 4))[0]
    assert links & X.LINKS_UP
    # The 2.0 API (Solaris) and an unknown one are refused.
    assert mb.request([X.API_NEGOTIATE, X.API_20])[0] & X.MSG_NACK
    assert mb.request([X.API_NEGOTIATE, 99])[0] & X.MSG_NACK


def test_read_to_clear_and_reset_bits(vf):
    cl, dev, es, v = vf()
    rd = lambda off: struct.unpack("<I", cl.region_read(0, off, 4))[0]   # noqa: E731
    cl.region_write(0, X.VFCTRL, struct.pack("<I", X.CTRL_RST))
    assert rd(X.VFMAILBOX) & X.MB_RSTD
    assert not rd(X.VFMAILBOX) & X.MB_RSTD                  # cleared by the read


def test_nothing_but_vf_reset_before_vf_reset(vf):
    cl, dev, es, v = vf()
    mb = X.Mailbox(cl)
    assert mb.request([X.API_NEGOTIATE, X.API_13])[0] & X.MSG_NACK
    assert mb.request([X.SET_MAC_ADDR, *X.mac_words(MAC)])[0] & X.MSG_NACK
    assert dev.stats["nacked"] == 2


def test_a_vf_without_an_assigned_mac_is_nacked_and_picks_its_own(vf):
    cl, dev, es, v = vf(mac=None, trust=True)
    mb = X.Mailbox(cl)
    assert mb.reset_vf() is None
    own = bytes.fromhex("02aabbccddee")
    assert mb.request([X.SET_MAC_ADDR, *X.mac_words(own)])[0] & X.MSG_ACK
    assert es.filters(v) == [(0, mac_to_int("02:aa:bb:cc:dd:ee"), VLAN_UNTAGGED_OR_ZERO)]


def test_the_pf_keeps_an_untrusted_vf_to_its_mac_and_its_vlan(vf):
    cl, dev, es, v = vf()
    mb = X.Mailbox(cl)
    mb.reset_vf()
    other = bytes.fromhex("02000000beef")
    assert mb.request([X.SET_MAC_ADDR, *X.mac_words(other)])[0] & X.MSG_NACK
    assert mb.request([X.SET_MAC_ADDR, *X.mac_words(bytes.fromhex("0100000000ff"))])[0] \
        & X.MSG_NACK                                          # multicast, never
    assert mb.request([X.SET_MAC_ADDR, *X.mac_words(MAC)])[0] & X.MSG_ACK   # its own
    # VLANs: added and removed as filters of its VPort.
    assert mb.request([X.SET_VLAN | 1 << X.MSGINFO_SHIFT, 100])[0] & X.MSG_ACK
    assert (mac_to_int("02:00:00:00:a0:01"), 100) in [(m, vl) for _, m, vl in es.filters(v)]
    assert mb.request([X.SET_VLAN, 100])[0] & X.MSG_ACK
    assert all(vl != 100 for _, _, vl in es.filters(v))
    assert mb.request([X.SET_VLAN | 1 << X.MSGINFO_SHIFT, 4095])[0] & X.MSG_NACK
    assert mb.request([0x7F])[0] & X.MSG_NACK                 # an opcode nobody knows
    assert es.filters(DEFAULT_VPORT) == []


def test_a_port_vlan_set_by_the_host_cannot_be_changed_from_the_guest(vf):
    cl, dev, es, v = vf(vlan=7)
    mb = X.Mailbox(cl)
    mb.reset_vf()
    assert mb.request([X.SET_VLAN | 1 << X.MSGINFO_SHIFT, 8])[0] & X.MSG_NACK
    mb.negotiate()
    assert mb.request([X.GET_QUEUES])[3] == 1                 # port VLAN: transparent


def test_hostile_register_accesses_are_refused_not_served(vf):
    cl, dev, es, v = vf()
    for off, n in ((2, 4), (0x100, 2), (X.BAR0_SIZE - 2, 4), (X.BAR0_SIZE, 4)):
        with pytest.raises(U.CommandError) as e:
            cl.region_read(0, off, n)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(U.CommandError):
        cl.region_write(0, 1, b"\0\0\0\0")
    # Read-only registers stay as they are; the mailbox buffer is only 16 words.
    cl.region_write(0, X.VFLINKS, struct.pack("<I", 0))
    assert struct.unpack("<I", cl.region_read(0, X.VFLINKS, 4))[0] & X.LINKS_UP
    with pytest.raises(ValueError):
        X.Mailbox(cl).request([0] * 17)
    # Unaligned and short ones reach the model and are counted there; the two past
    # BAR0's end never reach it (the vfio-user server checks the region's bounds).
    assert dev.stats["bad_access"] == 3


def test_only_the_queue_pages_are_mapped_and_the_tail_has_a_doorbell(vf):
    """BAR0 is trapped but for its queue-register pages (sparse mmap): the driver
    writes its tails there, and signals TDT's ioeventfd as KVM would."""
    import os
    from sriov import ixgbevf_rings as RG
    cl, dev, es, v = vf()
    r = cl.region(lib.VFIO_PCI_BAR0_REGION_INDEX)
    assert r.mappable and r.sparse == ((RG.QREGS, RG.QREGS_SIZE),)
    m = cl.map_region(r)
    assert len(m) == RG.QREGS_SIZE
    trapped = dev.regs.copy()
    m[:] = b"\xff" * len(m)                              # all the guest can reach ...
    assert (dev.regs == trapped).all()                    # ... leaves the mailbox etc. be
    struct.pack_into("<I", m, RG.TX_BASE + RG.R_TAIL, 17)
    assert int(dev.q[(RG.TX_BASE + RG.R_TAIL) // 4]) == 17
    assert struct.unpack("<I", cl.region_read(0, RG.QREGS + RG.TX_BASE + RG.R_TAIL, 4))[0] \
        == 17                                             # the same register, trapped
    (off, size, fd), = cl.region_io_fds(lib.VFIO_PCI_BAR0_REGION_INDEX)
    assert (off, size) == (RG.QREGS + RG.TX_BASE + RG.R_TAIL, 4)
    os.eventfd_write(fd, 1)
    assert os.eventfd_read(dev.doorbell) == 1             # the host's side of it
    os.close(fd)
