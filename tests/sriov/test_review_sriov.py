"""The host side against a hostile guest (vfio-user server, VF registers and
mailbox, ring engines, NIC data path, embedded switch): whatever the guest does,
the host must not crash, hang, raise out of ``serve``/``poll``, leak a descriptor
it was sent, touch memory outside what was granted, or mix up two VFs' traffic."""
from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from scapy.all import Dot1Q, Ether, IP, UDP, raw

from sriov import ixgbevf as X
from sriov import ixgbevf_rings as R
from sriov import vfio_user as U
from sriov.eswitch import PF, WIRE, EmbeddedSwitch, EswitchError, vf_function
from sriov.nic import SriovNic
from sriov.vfio import lib
from switch.batch import PacketBatch
from switch.parse import parse_batch
from switch.port import mac_to_int

MSIX = lib.VFIO_PCI_MSIX_IRQ_INDEX
MAC0, MAC1 = bytes.fromhex("02000000a000"), bytes.fromhex("02000000a001")


def sealed_ram(size: int = 1 << 16) -> int:               # as GuestMemory makes it
    fd = os.memfd_create("review-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


class Rig:
    """``dev`` served in a thread; what ``serve`` raises is kept in ``raised``."""

    def __init__(self, dev, **kw):
        self.sock, b = socket.socketpair()
        self.dev, self.srv, self.raised = dev, U.Server(b, dev, **kw), []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        self.cl = U.Client(self.sock, timeout=5)
        self.cl.version()

    def _run(self):
        try:
            self.srv.serve()
        except BaseException as e:                       # noqa: BLE001 - recorded
            self.raised.append(repr(e))

    def send(self, cmd, payload=b"", flags=0, size=None, fds=()):
        size = U.HEADER.size + len(payload) if size is None else size
        data = U.HEADER.pack(7, cmd, size, flags, 0) + payload
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)

    def call(self, *a, **kw):
        self.send(*a, **kw)
        return U.Connection(self.sock).recv()                 # the socket has a timeout


@pytest.fixture
def rig():
    made = []

    def make(**kw):
        made.append(Rig(X.Ixgbevf(0, X.VfPolicy(MAC0)), **kw))
        return made[-1]
    yield make
    for r in made:
        r.cl.close()
        r.t.join(5)
        assert not r.t.is_alive(), "serve() did not return after the client went"
        r.dev.close()


def all_closed(r: int) -> bool:
    """A pipe's read end ``r``, its write end sent to the server and ours closed: EOF
    only once every copy of the write end (the server's too) is closed."""
    try:
        return bool(select.select([r], [], [], 0.5)[0]) and os.read(r, 1) == b""
    finally:
        os.close(r)


# ---- vfio_user.Server ---------------------------------------------------------------

@pytest.mark.parametrize("offset,size", [(0, 2 << 16), (1, 4096)])
def test_a_dma_map_whose_fd_cannot_be_mapped_is_refused_and_serving_goes_on(rig, offset, size):
    """The mmap fails (past the file's end, unaligned offset): EINVAL, not a second
    close of the fd (EBADF out of serve(), or closing a descriptor another thread
    just opened under the same number)."""
    r = rig()
    ram = sealed_ram()
    try:
        _, _, flags, err, _, _ = r.call(U.DMA_MAP, U.DMA_MAP_S.pack(32, 3, offset, 0, size),
                                        fds=[ram])
    except EOFError:
        pytest.fail(f"the server hung up; serve() raised {r.raised}")
    os.close(ram)
    assert flags & U.F_ERROR and err == errno.EINVAL
    assert r.cl.info()["num_regions"] == lib.VFIO_PCI_NUM_REGIONS and r.raised == []


@pytest.mark.parametrize("cmd,payload", [
    (U.DEVICE_GET_INFO, U.DEVICE_INFO.pack(16, 0, 0, 0)),
    (U.REGION_READ, U.REGION_RW.pack(0, lib.VFIO_PCI_CONFIG_REGION_INDEX, 4)),
    (U.DEVICE_RESET, b"")], ids=["GET_INFO", "REGION_READ", "RESET"])
def test_descriptors_sent_with_a_command_that_takes_none_are_closed(rig, cmd, payload):
    r = rig()
    rd, wr = os.pipe()
    _, _, flags, _, _, _ = r.call(cmd, payload, fds=[wr])
    os.close(wr)
    assert not flags & U.F_ERROR
    r.cl.info()                                          # the server is past that message
    assert all_closed(rd), "the server kept the client's descriptor (fd leak)"


def test_descriptors_of_a_message_cut_short_by_a_disconnect_are_closed(rig):
    r = rig()
    rd, wr = os.pipe()
    r.send(U.DEVICE_GET_INFO, U.DEVICE_INFO.pack(16, 0, 0, 0)[:10], size=16 + 64, fds=[wr])
    os.close(wr)
    r.sock.close()                                       # gone mid-payload
    r.t.join(5)
    assert not r.t.is_alive() and r.raised == []
    assert all_closed(rd), "the descriptor of the unfinished message leaked"


def test_a_reply_or_a_frame_too_big_closes_its_descriptors(rig):
    r = rig()
    rd, wr = os.pipe()
    _, _, flags, err, _, _ = r.call(U.DEVICE_GET_INFO, U.DEVICE_INFO.pack(16, 0, 0, 0),
                                    flags=U.T_REPLY, fds=[wr])
    os.close(wr)
    assert flags & U.F_ERROR and err == errno.EINVAL and all_closed(rd)
    rd, wr = os.pipe()
    r.send(U.DEVICE_GET_INFO, size=0xFFFFFFFF, fds=[wr])  # cannot be framed: hang up
    os.close(wr)
    with pytest.raises(EOFError):
        U.Connection(r.sock).recv()
    assert all_closed(rd) and r.raised == []


def test_a_client_that_stops_reading_does_not_make_serve_raise(rig):
    """The reply cannot be sent (EPIPE: the client shut its reading side, or went
    while its command was served): serve() must end quietly, not raise."""
    r = rig()
    r.sock.shutdown(socket.SHUT_RD)
    r.send(U.DEVICE_GET_INFO, U.DEVICE_INFO.pack(16, 0, 0, 0))
    r.sock.close()
    r.t.join(5)
    assert not r.t.is_alive() and r.raised == []


def test_dma_map_ranges_and_the_mapping_budget(rig):
    r = rig(max_dma_maps=1)
    ram = sealed_ram()
    for address, size in ((2**64 - 4096, 8192), (0x1000, 0)):          # wraps; empty
        _, _, flags, err, _, _ = r.call(U.DMA_MAP, U.DMA_MAP_S.pack(32, 3, 0, address, size),
                                        fds=[ram])
        assert flags & U.F_ERROR and err == errno.EINVAL
    r.cl.dma_map(ram, 0, 0x10000, 4096)
    with pytest.raises(U.CommandError) as e:
        r.cl.dma_map(ram, 4096, 0x20000, 4096)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(U.CommandError):
        r.cl.dma_unmap(0x10000, 8192)                    # bigger than the mapping
    with pytest.raises(OSError):
        r.srv.dma_read(0x10000 + 4095, 2)
    os.close(ram)
    assert r.raised == []


UNSEALED = r"""
import os, socket, sys, threading
from sriov import vfio_user as U
a, b = socket.socketpair()
srv = U.Server(b, U.UserDevice())
threading.Thread(target=srv.serve, daemon=True).start()
cl = U.Client(a, timeout=5)
cl.version()
ram = os.memfd_create("unsealed")
os.ftruncate(ram, 1 << 16)
try:
    cl.dma_map(ram, 0, 0, 1 << 16)
except U.CommandError:
    sys.exit(0)                     # refused: it could shrink under the host
os.ftruncate(ram, 0)                # the guest shrinks its RAM under the mapping
try:
    srv.dma_read(0x8000, 16)        # the device model's (or the ring engine's) next read
except OSError:
    pass
"""


def test_guest_memory_that_can_shrink_under_the_mapping_cannot_kill_the_host():
    """A DMA_MAP of an fd the client can still truncate: the host's next access to
    the mapping is a SIGBUS, which kills the whole process (every VF)."""
    p = subprocess.run([sys.executable, "-c", UNSEALED], capture_output=True, timeout=20,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                       env={**os.environ, "PYTHONPATH": "."})
    assert p.returncode == 0, f"the host process died (returncode {p.returncode})"


# ---- ixgbevf.Ixgbevf ---------------------------------------------------------------

def test_the_queue_register_memfd_given_to_the_guest_cannot_shrink(rig):
    """BAR0's mmap-able pages are the device's memfd, handed to the client: if it
    can ftruncate it, the host's next register access (or ring run) is a SIGBUS."""
    r = rig()
    r.cl.region(lib.VFIO_PCI_BAR0_REGION_INDEX)
    fd = r.cl.region_fds[lib.VFIO_PCI_BAR0_REGION_INDEX]
    size = os.fstat(fd).st_size
    try:
        os.ftruncate(fd, 0)
    except PermissionError:
        return                                                # sealed: good
    os.ftruncate(fd, size)                                    # undone before any access
    pytest.fail("the guest could truncate the host's queue-register memfd")


def _interrupt_with(rig, fd, before=lambda: None):
    """MSI-X vector 0 wired to ``fd`` by the client and unmasked; then the data
    path's ``interrupt()`` in a thread: ('ok' or what it raised, still blocked?)."""
    r = rig()
    try:
        r.cl.set_irq_eventfds(MSIX, [fd])
    except U.CommandError:
        pass                                    # refused at SET_IRQS: just as good
    r.cl.region_write(0, X.VTEIMS, struct.pack("<I", 1))
    before()
    out = []

    def go():
        try:
            out.append(r.dev.interrupt() or "ok")
        except BaseException as e:                               # noqa: BLE001
            out.append(repr(e))
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(0.5)
    return out, t


def test_an_msix_fd_that_is_not_a_writable_eventfd_cannot_break_the_data_path(rig):
    rd, wr = os.pipe()
    out, _ = _interrupt_with(rig, rd)                        # the read end of a pipe
    os.close(rd)
    os.close(wr)
    assert out == ["ok"], f"interrupt() (called from SriovNic.poll) raised: {out}"


def test_an_msix_eventfd_the_guest_filled_cannot_block_the_data_path(rig):
    ev = os.eventfd(0)                                       # blocking, shared with the host
    _, t = _interrupt_with(rig, ev, lambda: os.eventfd_write(ev, 0xFFFFFFFFFFFFFFFE))
    hung = t.is_alive()
    os.eventfd_read(ev)                                      # let the host's write through
    t.join(2)
    os.close(ev)
    assert not hung, "interrupt() blocked in write(): the poll loop of every VF stops"


def _mbx(dev, *words):
    """One mailbox request as the trapped register writes make it; the reply's word 0."""
    for k, w in enumerate(words):
        dev.write32(X.VFMBMEM + 4 * k, w)
    dev.write32(X.VFMAILBOX, X.MB_REQ)                      # REQ without VFU: served anyway
    return int(dev.regs[X.VFMBMEM // 4])


def test_mailbox_abuse_is_nacked_and_leaves_the_filters_be():
    es = EmbeddedSwitch(num_vfs=1)
    v = es.create_vport(vf=0)
    es.set_filter(v, int.from_bytes(MAC0, "big"))
    dev = X.Ixgbevf(0, X.VfPolicy(MAC0, trust=True), es)
    try:
        assert _mbx(dev, X.SET_VLAN | 1 << 16, 10) & X.MSG_NACK          # before VF_RESET
        assert _mbx(dev, X.VF_RESET) & X.MSG_ACK
        before = es.filters(v)
        for mac in (bytes(6), b"\xff" * 6, bytes.fromhex("330000000001")):
            assert _mbx(dev, X.SET_MAC_ADDR, *X.mac_words(mac)) & X.MSG_NACK
        for vid in (0, 4095):
            assert _mbx(dev, X.SET_VLAN | 1 << 16, vid) & X.MSG_NACK
        for api in (0xFFFFFFFF, X.API_20, 5):
            assert _mbx(dev, X.API_NEGOTIATE, api) & X.MSG_NACK
        assert _mbx(dev, 0xFFFF | X.MSG_ACK) & X.MSG_NACK                # garbage opcode
        assert es.filters(v) == before and dev.policy.mac == MAC0
        dev.write32(X.VFMAILBOX, 0xFFFFFFFF)                             # every bit at once
        dev.write32(X.VFCTRL, X.CTRL_RST)                                # reset mid-talk
        assert _mbx(dev, X.SET_VLAN | 1 << 16, 10) & X.MSG_NACK          # CTS again needed
        assert es.filters(v) == before
    finally:
        dev.close()


def test_one_vf_cannot_take_every_receive_filter_of_the_switch():
    """SET_VLAN adds a filter per VLAN, with no per-VF limit, in a table every VF and
    the PF share: VF 0 alone can fill it, and VF 1's filters cannot be set any more."""
    es = EmbeddedSwitch(num_vfs=2)
    v0, v1 = es.create_vport(vf=0), es.create_vport(vf=1)
    es.set_filter(v0, int.from_bytes(MAC0, "big"))
    dev = X.Ixgbevf(0, X.VfPolicy(MAC0), es)
    try:
        _mbx(dev, X.VF_RESET)
        for vid in range(1, 400):
            try:
                _mbx(dev, X.SET_VLAN | 1 << 16, vid)
            except EswitchError:
                break                                    # the table is full
        es.set_filter(v1, int.from_bytes(MAC1, "big"))   # the host sets VF 1's MAC
    except EswitchError as e:
        pytest.fail(f"VF 0 exhausted the shared filter table ({len(es.filters(v0))} "
                    f"filters): {e}")
    finally:
        dev.close()


# ---- ixgbevf_rings ---------------------------------------------------------------

IOVA, RAM, RING, BUFS = 0x10_0000_0000, 1 << 16, 0x1000, 0x4000


def ring(base, ndesc=8, srrctl=0):
    regs = np.zeros(R.QREGS_SIZE // 4, np.uint32)
    for off, v in {R.R_BAL: (IOVA + RING) & 0xFFFFFFFF, R.R_BAH: (IOVA + RING) >> 32,
                   R.R_LEN: ndesc * 16, R.R_DCTL: R.DCTL_ENABLE, R.R_SRRCTL: srrctl}.items():
        regs[(base + off) // 4] = v
    guard = np.full(RAM + 2 * 4096, 0xA5, np.uint8)
    guard[4096:4096 + RAM] = 0
    return regs, guard, guard[4096:4096 + RAM]


def intact(guard):
    return (guard[:4096] == 0xA5).all() and (guard[4096 + RAM:] == 0xA5).all()


def test_a_receive_buffer_over_the_next_descriptor_cannot_steer_the_copy_out_of_memory():
    """Descriptor 0's buffer lies on descriptor 1: copying the frame's first chunk
    rewrites descriptor 1's address (with bytes the sender chose) after it was
    checked. The address must not be fetched again unchecked (nor raced by a vCPU)."""
    regs, guard, mem = ring(R.RX_BASE, srrctl=1)                        # 1 KiB buffers
    mem[RING:RING + 32] = np.frombuffer(struct.pack("<QQQQ", IOVA + RING + 16, 0,
                                                    IOVA + BUFS, 0), np.uint8)
    regs[(R.RX_BASE + R.R_TAIL) // 4] = 2
    frame = struct.pack("<Q", IOVA + RAM + 64) + bytes(2000 - 8)       # 2 chunks
    b = PacketBatch(4, 1 << 16)
    b.append_frames([frame], src_port=1)
    R.vf_receive(mem, IOVA, RAM, regs, np.zeros(1, np.int64), b.meta, b.data,
                 np.zeros((2, 1), np.int64), 0, 1, np.zeros(R.NSTATS, np.int64))
    assert intact(guard), "vf_receive wrote past the end of guest memory"


def _txd(mem, k, addr, data, cmd):
    mem[addr - IOVA:addr - IOVA + len(data)] = np.frombuffer(data, np.uint8)
    ctl = len(data) | R.TXD_DTYP_DATA << R.TXD_DTYP_SHIFT | R.TXD_CMD_DEXT | cmd
    mem[RING + 16 * k:RING + 16 * k + 16] = np.frombuffer(struct.pack("<QII", addr, ctl, 0),
                                                          np.uint8)


def test_a_frame_gathered_across_calls_is_the_frame_the_guest_wrote():
    """TDT stops inside a frame (its EOP comes later): the next call (a fresh batch,
    cursor 0, as SriovNic.poll makes it; other VFs' frames in between) must still
    deliver the guest's bytes, not what the batch arena holds at that offset."""
    regs, guard, mem = ring(R.TX_BASE)
    a, b_ = bytes([0xAA]) * 100, bytes(range(256)) + bytes(44)
    _txd(mem, 0, IOVA + BUFS, a, R.TXD_CMD_EOP)
    _txd(mem, 1, IOVA + BUFS + 0x800, b_[:150], 0)
    regs[(R.TX_BASE + R.R_TAIL) // 4] = 2
    txs, st, batch = np.zeros(R.NTXS, np.int64), np.zeros(R.NSTATS, np.int64), PacketBatch(8, 1 << 16)

    def run():
        batch.reset()
        batch.n, batch.cursor, _ = R.vf_transmit(mem, IOVA, RAM, regs, np.zeros(1, np.int64),
                                                 txs, batch.meta, batch.data, 0, 0, 2, st)
        return batch.frames()
    assert run() == [a]
    _txd(mem, 2, IOVA + BUFS + 0x1000, b_[150:], R.TXD_CMD_EOP)
    regs[(R.TX_BASE + R.R_TAIL) // 4] = 3
    assert run() == [b_], "the frame's first part came from the batch arena, not the guest"
    assert intact(guard)


# ---- nic.SriovNic / eswitch ---------------------------------------------------------

@pytest.mark.parametrize("address,write", [(0, False), (2**64 - (1 << 16), True)],
                         ids=["read-only mapping", "mapping above 2**63"])
def test_a_dma_mapping_the_engines_cannot_take_does_not_break_poll(address, write):
    n = SriovNic(1, [X.VfPolicy(MAC0)])
    a, b = socket.socketpair()
    n.serve(0, b)
    cl = U.Client(a, timeout=5)
    ram = sealed_ram()
    err = None
    try:
        cl.version()
        try:
            cl.dma_map(ram, 0, address, 1 << 16, write=write)  # accepted, or ...
        except U.CommandError as e:                            # ... refused outright
            assert address >= 1 << 63 and e.errno == errno.EINVAL
        n.vfs[0].q[(R.TX_BASE + R.R_DCTL) // 4] = R.DCTL_ENABLE
        try:
            n.poll()
        except Exception as e:                                # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:120]}"
    finally:
        cl.close()
        n.close()
        os.close(ram)
    assert err is None, f"SriovNic.poll raised for every VF: {err}"


def _steer(es, src, *specs):
    b = PacketBatch(16)
    b.append_frames([raw((Ether(src=s, dst=d) / Dot1Q(vlan=v) if v is not None
                          else Ether(src=s, dst=d)) / IP() / UDP()) for s, d, v in specs],
                    src_port=1)
    parse_batch(b.meta, b.data, 0, b.n)
    dest = np.zeros(b.n, np.int64)
    es.steer(b, src, dest)
    return [int(x) for x in dest]


def test_a_broadcast_or_multicast_on_a_vlan_reaches_only_vfs_filtering_that_vlan():
    """VF 0 takes untagged/VLAN 0 only, VF 1 VLAN 5 only: a VLAN 7 broadcast from
    the wire (delivered with its tag stripped, so the guest cannot even tell), or VF
    1's VLAN 5 multicast, must not reach VF 0."""
    es = EmbeddedSwitch(num_vfs=2)
    vm0, vm1, other = "02:00:00:00:a0:00", "02:00:00:00:a0:01", "02:00:00:00:00:99"
    es.set_filter(es.create_vport(vf=0), mac_to_int(vm0))
    es.set_filter(es.create_vport(vf=1), mac_to_int(vm1), vlan=5)
    vf0, vf1 = 1 << vf_function(0), 1 << vf_function(1)
    bc, mc = _steer(es, WIRE, (other, "ff:ff:ff:ff:ff:ff", 7), (other, "01:00:5e:00:00:01", 7))
    assert not bc & (vf0 | vf1) and not mc & (vf0 | vf1), (hex(bc), hex(mc))
    (m,) = _steer(es, vf_function(1), (vm1, "33:33:00:00:00:01", 5))
    assert m & (1 << WIRE) and m & (1 << PF) and not m & vf0, hex(m)
