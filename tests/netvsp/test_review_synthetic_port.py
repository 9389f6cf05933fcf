"""Review of the synthetic port (netvsp/synthetic_port.py) gluing NetVSP's control
path to its compiled data path: the state the control path keeps (revoked
buffers, RNDIS state, packet filter, GPADL teardown) against what the data path
does. Host (VmbusServer, NetvspDevice, Switch with a synthetic port and a memory
port) in a thread, guest = netvsp.netvsc.Netvsc in the test, as in
test_synthetic_port.py.

Written in a hostile-input review. Tests whose docstring cites file:line
were its findings, fixed in the same change: the docstring tells what went
wrong before; the test asserts what must hold. The others pin hostile cases
the review found handled but untested.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp import nvsp as N
from netvsp import rndis as R
from netvsp.netvsc import Netvsc
from netvsp.netvsc_datapath import HEADROOM, netvsc_transmit
from netvsp.netvsp import NetvspDevice
from netvsp.synthetic_port import SyntheticPorts
from netvsp.vmbus import channel_msg as M
from netvsp.vmbus import packet as P
from netvsp.vmbus.client import GuestPages, VmbusClient
from netvsp.vmbus.server import VmbusServer
from switch.batch import PacketBatch, init_packet
from switch.memport import MemoryPorts
from switch.switch import Switch

VM_MAC, PEER_MAC = "02:00:00:00:0a:01", "02:00:00:00:0a:02"


class Host:
    def __init__(self, ram):
        self.ram = ram
        self.port, self.guest_port = MessagePort.pair()
        self.server = VmbusServer(self.port, ram)
        self.dev = NetvspDevice(ram, self.server, int(VM_MAC.replace(":", ""), 16))
        self.sw = Switch("review")
        self.syn = self.sw.add_kind(SyntheticPorts())
        self.mem = self.sw.add_kind(MemoryPorts())
        self.vm_port = self.sw.add_port("vm.eth0", "synthetic", mac=VM_MAC, kind=self.syn)
        self.syn.attach(self.vm_port, self.dev)
        self.peer = self.sw.add_port("peer", "synthetic", mac=PEER_MAC, kind=self.mem)
        self.got = []
        self.errors = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stop.is_set():
            with self.lock:
                try:
                    self.server.pump()
                    self.sw.poll()
                    self.got += self.mem.collect(self.peer)
                except Exception as e:          # the host must never raise
                    self.errors.append(repr(e))
            time.sleep(0.0005)

    def to_guest(self) -> dict:
        return self.syn.port_info(self.vm_port.port_id)["to_guest"]

    def close(self):
        self.stop.set()
        self.t.join(5)
        self.guest_port.close()


def start(ram_mib=64):
    ram = GuestMemory(ram_mib << 20)
    host = Host(ram)
    client = VmbusClient(host.guest_port, timeout=30)
    client.connect()
    client.request_offers()
    pages = GuestPages(ram.size)
    return host, ram, client, pages


@pytest.fixture
def vm():
    host, ram, client, pages = start()
    nic = Netvsc(ram, client, pages, timeout=30)
    nic.bring_up()
    try:
        yield host, nic, ram, pages
    finally:
        host.close()
        assert not host.errors, host.errors
        ram.close()


def wait(pred, what, t=20):
    end = time.monotonic() + t
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def settle(host, t=0.3):
    """Let the host loop run a while (for 'nothing happens' checks)."""
    time.sleep(t)
    with host.lock:
        pass


def peer_frames(n=4, size=200):
    return [raw(Ether(src=PEER_MAC, dst=VM_MAC) / IP(src="10.0.0.2", dst="10.0.0.1") / UDP()
                / bytes(size + k)) for k in range(n)]


def guest_send(nic, ram, pages, frames):
    """The guest's transmit kernel, sections from the send buffer (f.3)."""
    slot = 4096
    tx = pages.alloc(slot * len(frames))
    b = PacketBatch(len(frames), arena=slot * len(frames))
    b.data = ram.mem[tx:tx + slot * len(frames)]
    for i, f in enumerate(frames):
        at = i * slot + HEADROOM
        b.data[at:at + len(f)] = np.frombuffer(f, np.uint8)
        init_packet(b.meta, i, at, len(f), 0, 0)
    count = nic.send_section_count
    nxt, _ = netvsc_transmit(ram.mem, nic.out.base, nic.out.datasize, b.meta, b.data, tx,
                             len(frames), 0, nic.send_gpa, nic.send_section_size,
                             np.arange(count, dtype=np.int64), np.array([count], np.int64),
                             np.zeros(count, np.uint8), np.zeros((1, 2), np.int64),
                             np.zeros(16, np.uint8), np.zeros(4, np.int64))
    assert nxt == len(frames)
    os.eventfd_write(nic.signal, 1)


def guest_frames(nic, ram) -> int:
    """Data frames the host put in the guest's receive buffer since last time
    (the guest side's view: transfer-page packets on its ring), completed."""
    got = 0
    nic.inr.rpos = None
    while (p := nic.inr.read_packet()) is not None:
        if p.type == P.VM_PKT_DATA_USING_XFER_PAGES:
            t, f = N.decode_message(p.payload)
            if int(f["channel_type"]) == N.CHANNEL_TYPE_DATA:
                got += 1
            nic.out.write_packet(P.VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(), p.trans_id)
    nic.inr.commit_read()
    os.eventfd_write(nic.signal, 1)
    return got


# =============================================================================== findings

def test_egress_stops_at_a_revoked_receive_buffer(vm):
    """synthetic_port.py:164-165: once made, a channel's data path is kept while
    ``cd.nc is nc``, whatever the control path did since. After REVOKE_RECV_BUF
    (netvsp.py:675-685 drops recv_buf, state 'revoked': "nothing more goes to
    the guest", d.5), the GPADL can be torn down without a violation
    (gpadl_teardown sees recv_buf None) and the guest may reuse the pages - yet
    the egress kernel keeps lending sub-allocations of the old buffer: the host
    writes frames into guest memory no longer granted. Linux does exactly this
    order (revoke, then teardown) before closing on VMBus < 4.0 (c.7), which
    the server accepts (WIN8, WIN8_1)."""
    host, nic, ram, pages = vm
    nc = host.dev.channel
    nic._send(N.nvsp_revoke_receive_buffer(), completion=False)
    nic._send(N.nvsp_revoke_send_buffer(), completion=False)
    wait(lambda: nc.state == "revoked" and nc.recv_buf is None and nc.send_buf is None,
         "the buffers revoked")
    nic.client.teardown_gpadl(nic.relid, nic.recv_gpadl)
    assert not nc.closed and not host.dev.violations      # a legal teardown
    ram.mem[nic.recv_gpa:nic.recv_gpa + nic.recv_size] = 0  # the guest reuses the pages
    before = host.to_guest()["delivered"]
    with host.lock:
        host.mem.inject(host.peer, peer_frames(4))
    settle(host, 0.5)
    written = int(np.count_nonzero(ram.mem[nic.recv_gpa:nic.recv_gpa + nic.recv_size]))
    assert host.to_guest()["delivered"] == before and written == 0, \
        f"{host.to_guest()['delivered'] - before} frames lent from a torn-down receive " \
        f"buffer; {written} bytes written into pages the guest no longer grants"


def test_ingress_stops_at_a_revoked_send_buffer(vm):
    """Same cause, the other direction: after REVOKE_SEND_BUF the control path
    drops the send buffer and every message but REVOKEs ('message after a
    buffer was revoked'), but the ingress kernel keeps reading sections of the
    old send buffer (cd.sbuf) and forwards the frames to the switch."""
    host, nic, ram, pages = vm
    nc = host.dev.channel
    nic._send(N.nvsp_revoke_send_buffer(), completion=False)
    wait(lambda: nc.state == "revoked" and nc.send_buf is None, "the send buffer revoked")
    frames = [raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP() / UDP() / bytes(100))]
    host.got.clear()
    guest_send(nic, ram, pages, frames)
    settle(host, 0.5)
    assert host.got == [], "frames read from a revoked send buffer reached the switch"


def test_packet_filter_zero_delivers_nothing(vm):
    """f.1 / j.20 / e.3 step 9: 'While the packet filter is 0, received frames
    are not delivered' (Linux sets 0 on ndo_stop). The control path records
    OID_GEN_CURRENT_PACKET_FILTER (netvsp.py:874-878) but nothing reads it:
    SyntheticPorts.transmit / netvsp_egress deliver regardless."""
    host, nic, ram, pages = vm
    assert nic._set(R.OID_GEN_CURRENT_PACKET_FILTER, (0).to_bytes(4, "little"))
    assert host.dev.channel.packet_filter == 0
    before = host.to_guest()["delivered"]
    with host.lock:
        host.mem.inject(host.peer, peer_frames(3))
    settle(host, 0.5)
    got = guest_frames(nic, ram)
    assert got == 0 and host.to_guest()["delivered"] == before, \
        f"{got} data transfer-page packets delivered with packet filter 0"


def test_data_after_rndis_halt_is_not_forwarded(vm):
    """netvsp.py:754-758 drops data 'while RNDIS is halted' (and counts it), but
    the compiled ingress takes every data SEND_RNDIS_PKT once the channel was
    'ready' and never looks at rndis_state: after HALT (e.1, e.3 step 11) the
    guest's frames still reach the switch, uncounted."""
    host, nic, ram, pages = vm
    nc = host.dev.channel
    nic.ram.write(nic.scratch, R.rndis_halt(99))
    nic._send_gpa(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL), nic.scratch, 12)
    wait(lambda: nc.rndis_state == "halted", "RNDIS halted")
    host.got.clear()
    guest_send(nic, ram, pages, [raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP() / UDP()
                                     / bytes(64))])
    settle(host, 0.5)
    assert host.got == [] and host.dev.dropped["data while RNDIS is halted"] == 1, \
        (len(host.got), dict(host.dev.dropped))


def test_gpadl_teardown_reading_the_ring_frees_data_completions(vm):
    """netvsp.py:1086: gpadl_teardown calls nc.poll() (the whole ring, through the
    control path) while the compiled data path owns the ring. A receive
    completion for a data transfer-page packet in the ring is then 'completion
    for an unknown transaction id' (rx_completion_handler is never set), a
    violation: the channel is closed because the guest tore down an unrelated
    GPADL of its channel."""
    host, nic, ram, pages = vm
    extra = nic.client.create_gpadl(nic.relid, pages.alloc(4096), 4096)
    with host.lock:
        host.mem.inject(host.peer, peer_frames(1))
    held = []

    def xfer():
        nic.inr.rpos = None
        while (p := nic.inr.read_packet()) is not None:
            if p.type == P.VM_PKT_DATA_USING_XFER_PAGES:
                held.append(p.trans_id)
        nic.inr.commit_read()
        return bool(held)
    wait(xfer, "a data transfer-page packet")
    with host.lock:                     # both reach the host in one loop turn
        nic.out.write_packet(P.VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(), held[0])
        nic.client.port.post(M.message(M.GPADL_TEARDOWN, child_relid=nic.relid, gpadl=extra))
    settle(host, 0.5)
    assert not host.dev.violations and host.dev.channel is not None, \
        (dict(host.dev.violations), host.dev.last_close)


def _ready_without_send_buffer(host, ram, client, pages) -> Netvsc:
    """A guest with NVSP, the receive buffer and RNDIS up but no send buffer yet (d.5
    allows it), its send buffer's GPADL made but not yet given to the host."""
    nic = Netvsc(ram, client, pages, timeout=30)
    nic.open()
    nic.negotiate()
    c = nic.client
    nic.recv_gpa = pages.alloc(nic.recv_size)
    nic.recv_gpadl = c.create_gpadl(nic.relid, nic.recv_gpa, nic.recv_size)
    t, m = N.decode_message(nic._completion(nic._send(
        N.nvsp_send_receive_buffer(nic.recv_gpadl)), "SEND_RECV_BUF"), completion=True)
    assert int(m["status"]) == N.STATUS_SUCCESS
    nic.rndis_init()
    wait(lambda: host.vm_port.port_id in host.syn._data, "the data path attached")
    nic.send_gpa = pages.alloc(nic.send_size)
    nic.send_gpadl = c.create_gpadl(nic.relid, nic.send_gpa, nic.send_size)
    return nic


def test_a_send_buffer_given_late_is_used_by_the_data_path():
    """netvsp.py:658-673 accepts SEND_SEND_BUF in any state after INIT (also once
    'ready') and answers SUCCESS, but the data path captured ``sbuf`` when it
    was made (synthetic_port.py:65-66, kept while cd.nc is nc): every section a
    guest then uses is refused as 'bad send-buffer section'."""
    host, ram, client, pages = start()
    try:
        nic = _ready_without_send_buffer(host, ram, client, pages)
        t, m = N.decode_message(nic._completion(nic._send(
            N.nvsp_send_send_buffer(nic.send_gpadl)), "SEND_SEND_BUF"), completion=True)
        assert int(m["status"]) == N.STATUS_SUCCESS       # the host took it
        nic.send_section_size = int(m["section_size"])
        nic.send_section_count = nic.send_size // nic.send_section_size
        frames = [raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP() / UDP() / bytes(80))]
        guest_send(nic, ram, pages, frames)
        try:
            wait(lambda: host.got == frames, "the frame through the data path")
        finally:
            info = host.syn.port_info(host.vm_port.port_id)
        assert host.got == frames, info["dropped"]
    finally:
        host.close()
        ram.close()


def test_data_right_behind_a_late_send_buffer_uses_it():
    """SEND_SEND_BUF and the first data packet in the ring together (the host read
    neither yet): the data path takes the buffer the control message just granted,
    in the same pass over the ring, not at its next poll (a race the full suite
    met: the guest sends as soon as it has the completion)."""
    host, ram, client, pages = start()
    try:
        nic = _ready_without_send_buffer(host, ram, client, pages)
        nic.send_section_size = N.SEND_SECTION_SIZE
        nic.send_section_count = nic.send_size // nic.send_section_size
        frames = [raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP() / UDP() / bytes(80))]
        with host.lock:                                   # the host between two polls
            tid = nic._send(N.nvsp_send_send_buffer(nic.send_gpadl))
            guest_send(nic, ram, pages, frames)
        t, m = N.decode_message(nic._completion(tid, "SEND_SEND_BUF"), completion=True)
        assert int(m["status"]) == N.STATUS_SUCCESS
        assert int(m["section_size"]) == N.SEND_SECTION_SIZE
        wait(lambda: host.got == frames, "the frame through the data path", t=5)
        assert not host.syn.port_info(host.vm_port.port_id)["dropped"]
    finally:
        host.close()
        ram.close()


# ======================================================================= hostile, handled

def test_guest_that_never_completes_receives_is_bounded(vm):
    """A guest that takes frames and never completes them: the host lends every
    data sub-allocation once, then counts 'no receive buffer'; the control
    path's 16 reserved ones still answer RNDIS."""
    host, nic, ram, pages = vm
    cd = host.syn._data[host.vm_port.port_id]
    lendable = int(cd.rx.nfree[0])
    before = dict(host.to_guest())
    frames = peer_frames(64, size=100)
    sent = 0
    while sent < lendable + 64:
        with host.lock:
            host.mem.inject(host.peer, frames)
        sent += len(frames)
        nic.inr.rpos = None
        while nic.inr.read_packet() is not None:      # read, never complete
            pass
        nic.inr.commit_read()
        time.sleep(0.002)
    settle(host, 0.3)
    after = host.to_guest()
    assert after["delivered"] - before["delivered"] == lendable
    assert after["no receive buffer"] - before["no receive buffer"] > 0
    assert int(cd.rx.nfree[0]) == 0
    assert nic._query(R.OID_GEN_MAXIMUM_FRAME_SIZE) is not None    # control still answers


def test_guest_rewriting_the_host_ring_indices_closes_only_its_channel(vm):
    host, nic, ram, pages = vm
    nic.inr.read_index = nic.inr.datasize + 8         # corrupt: the host's writes refuse it
    with host.lock:
        host.mem.inject(host.peer, peer_frames(2))
    settle(host, 0.3)
    info = host.syn.port_info(host.vm_port.port_id)
    # the data path refuses to write (counted), the control path is not fooled
    assert info["to_guest"]["ring full"] >= 2
    nic.ram.write(nic.scratch, R.rndis_keepalive(7))
    nic._send_gpa(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL), nic.scratch, 12)
    wait(lambda: host.dev.violations["corrupt ring"] == 1, "the corrupt ring judged")
    assert host.dev.channel is None
