"""NetVSP's control path (netvsp/netvsp.py) against a guest that does what Linux's
hv_netvsc does (vmbus_netvsp.md d.5, e.3), and against one that does not.

The host (VmbusServer + NetvspDevices) runs in a thread as the daemon's loop
would: it waits on the message port and the channels' doorbells, pumps the
server and polls the devices. The test is the guest: VMBus through
VmbusClient, then NVSP and RNDIS written with nvsp.py/rndis.py into the
guest-to-host ring and replies read from the host-to-guest ring, the receive
buffer read through the transfer-page ranges, every reply completed as Linux
completes it.
"""
from __future__ import annotations

import os
import select
import struct
import threading
import time
import traceback
from typing import NamedTuple

import numpy as np
import pytest

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp import nvsp as N
from netvsp import rndis as R
from netvsp.netvsp import MAC_OPTIONS, MAX_QUEUES, SUPPORTED_OIDS, NetvspDevice, TxData
from netvsp.rndis import (OID_802_3_CURRENT_ADDRESS, OID_802_3_MULTICAST_LIST, OID_GEN_VENDOR_ID,
                          OID_TCP_OFFLOAD_CURRENT_CONFIG)
from netvsp import netvsp as V
from netvsp.vmbus import channel_msg as M
from netvsp.vmbus import packet as P
from netvsp.vmbus.client import GuestPages, VmbusClient
from netvsp.vmbus.ring import Ring, ring_write_begin, ring_write_commit
from netvsp.vmbus.server import VmbusServer

PAGE = 4096
MAC_A = 0x00155D0A0B01
MAC_B = 0x00155D0A0B02
NO_RESPONSE = P.VMBUS_RQST_ID_NO_RESPONSE
INVALID = N.STATUS_INVALID_RNDIS_PKT
TIMEOUT = 5.0


class Env:
    """One partition: guest RAM, the host's server and devices in a thread, the
    guest's VMBus driver."""

    def __init__(self, ram_mib: int = 48):
        self.ram = GuestMemory(ram_mib << 20)
        self.port, self.guest_port = MessagePort.pair()
        self.server = VmbusServer(self.port, self.ram)
        self.devs: list[NetvspDevice] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.client = VmbusClient(self.guest_port, timeout=10)
        self.pages = GuestPages(self.ram.size)

    def add(self, mac: int, **kw) -> NetvspDevice:
        dev = NetvspDevice(self.ram, self.server, mac, **kw)
        self.devs.append(dev)
        return dev

    def start(self) -> None:
        self.thread.start()
        self.client.connect()
        self.client.request_offers()

    def _loop(self) -> None:
        busy = False
        while not self.stop.is_set():
            try:
                fds = [self.port.fileno()] + [fd for d in self.devs for fd in d.fds()]
                select.select(fds, [], [], 0 if busy else 0.01)
                self.server.pump()
                busy = sum(d.poll() for d in self.devs) > 0
            except Exception:               # the host must never raise: recorded, asserted
                self.errors.append(traceback.format_exc())
                busy = False

    def relid_of(self, dev: NetvspDevice) -> int:
        want = M.guid_bytes(dev.instance).tobytes()
        return next(r for r, m in self.client.offers.items() if bytes(m["if_instance"]) == want)

    def close(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join(5)
        self.guest_port.close()
        self.port.close()
        self.ram.close()


class Rep(NamedTuple):
    """A host RNDIS message as the guest received it."""
    msg_type: int
    fields: np.void
    info: bytes               # the info / status buffer
    m: "Msg"


class Msg(NamedTuple):
    type: int
    flags: int
    tid: int
    payload: bytes
    offset: int = -1          # transfer pages: the range
    count: int = 0
    rndis: bytes = b""


def wait_until(pred, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.0005)


class Guest:
    """One NIC of the guest, driven step by step as Linux's netvsc drives it."""

    def __init__(self, env: Env, dev: NetvspDevice, ring_pages: int = 32,
                 recv_size: int = 1 << 20, send_size: int = N.DEFAULT_TX * N.SEND_SECTION_SIZE):
        self.env, self.dev, self.mem = env, dev, env.ram.mem
        self.relid = env.relid_of(dev)
        self.ring_pages = ring_pages
        nbytes = 2 * (1 + ring_pages) * PAGE
        self.ring_gpa = env.pages.alloc(nbytes)
        self.ring_handle = env.client.create_gpadl(self.relid, self.ring_gpa, nbytes)
        self.recv_size, self.send_size = recv_size, send_size
        self.recv_gpa = self.send_gpa = None
        self.recv_handle = self.send_handle = None
        self.scratch = env.pages.alloc(4 * PAGE)        # control messages sent by GPA
        self.next_tid = 1
        self.next_req = 1
        self.inbox: list[Msg] = []
        self.irq_count = 0
        self.sig = self.irq = None
        self.version = None
        self.open()

    # --- VMBus -----------------------------------------------------------------------
    def open(self) -> None:
        ds = self.ring_pages * PAGE
        self.out = Ring(self.mem, self.ring_gpa, ds)                       # guest -> host
        self.inr = Ring(self.mem, self.ring_gpa + (1 + self.ring_pages) * PAGE, ds)
        self.out.init()
        self.inr.init()
        for fd in (self.sig, self.irq):
            if fd is not None:
                os.close(fd)
        self.sig, self.irq = self.env.client.open(self.relid, self.ring_handle,
                                                  1 + self.ring_pages)
        self.inbox.clear()
        wait_until(lambda: self.relid in self.dev.channels, "the channel to open")

    @property
    def channel(self):
        return self.dev.channels.get(self.relid)

    def closed(self) -> bool:
        return self.env.server.channels[self.relid].state != "open"

    def kick(self, sig: bool) -> None:
        if sig:
            os.eventfd_write(self.sig, 1)

    def tid(self) -> int:
        t, self.next_tid = self.next_tid, self.next_tid + 1
        return t

    def send(self, payload: bytes, completion: bool = True, tid: int | None = None) -> int:
        if tid is None:
            tid = self.tid() if completion else NO_RESPONSE
        ok, sig = self.out.write_packet(P.VM_PKT_DATA_INBAND, payload, tid, int(completion))
        assert ok
        self.kick(sig)
        return tid

    def send_comp(self, payload: bytes, tid: int) -> None:
        ok, sig = self.out.write_packet(P.VM_PKT_COMP, payload, tid)
        assert ok
        self.kick(sig)

    def send_raw(self, body: bytes) -> None:
        ok, sig = self.out.write_raw(body)
        assert ok
        self.kick(sig)

    def send_direct(self, payload: bytes, bufs, tid: int | None = None) -> int:
        """A GPA-direct packet (b.6) as Linux's vmbus_sendpacket_mpb_desc builds it."""
        tid = self.tid() if tid is None else tid
        bufs = np.asarray(bufs, dtype=np.int64).reshape(-1, 2)
        src = np.frombuffer(payload, dtype=np.uint8)
        o = self.out
        need = P.gpa_direct_footprint(bufs, len(bufs), len(src))
        start = ring_write_begin(o.mem, o.base, o.datasize, need)
        assert start >= 0
        end = P.build_gpa_direct(o.mem, o.base, o.datasize, start, 1, tid, bufs, len(bufs),
                                 src, 0, len(src))
        assert end >= 0
        self.kick(ring_write_commit(o.mem, o.base, o.datasize, start, end) == 1)
        return tid

    # --- receiving ---------------------------------------------------------------------
    def drain(self) -> None:
        got = False
        while (p := self.inr.read_packet()) is not None:
            got = True
            if p.type == P.VM_PKT_DATA_USING_XFER_PAGES:
                out = np.zeros((4, 2), dtype=np.int64)
                n = P.parse_xfer_page(self.mem, self.inr.base, self.inr.datasize, p.desc,
                                      N.RECEIVE_BUFFER_ID, self.recv_size, 4, out)
                assert n == 1, n                  # e.2: one RNDIS message per range
                cnt, off = int(out[0, 0]), int(out[0, 1])
                self.inbox.append(Msg(p.type, p.flags, p.trans_id, p.payload, off, cnt,
                                      self.env.ram.read(self.recv_gpa + off, cnt)))
            else:
                self.inbox.append(Msg(p.type, p.flags, p.trans_id, p.payload))
        if got:
            self.kick(self.inr.commit_read())

    def wait(self, pred, what: str, timeout: float = TIMEOUT) -> Msg:
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            for k, m in enumerate(self.inbox):
                if pred(m):
                    return self.inbox.pop(k)
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; have {self.inbox}")
            if select.select([self.irq], [], [], 0.002)[0]:
                self.interrupts(keep=True)

    def interrupts(self, keep: bool = False) -> int:
        """Host interrupts since the last call (the doorbell is non-blocking)."""
        try:
            self.irq_count += os.eventfd_read(self.irq)
        except BlockingIOError:
            pass
        n = self.irq_count
        if not keep:
            self.irq_count = 0
        return n

    def completion(self, tid: int) -> bytes:
        m = self.wait(lambda m: m.type == P.VM_PKT_COMP and m.tid == tid, f"completion {tid}")
        return m.payload

    def complete_rx(self, m: Msg, status: int = N.STATUS_SUCCESS) -> None:
        """Linux's receive completion: {108, status}, exactly 8 bytes (d.4)."""
        self.send_comp(N.nvsp_send_rndis_packet_complete(status), m.tid)

    def rndis_msg(self, pred=lambda c: True, hold: bool = False, what="an RNDIS message"):
        """The next host RNDIS message the predicate accepts, decoded; completed
        at once unless ``hold``."""
        def match(m):
            return m.type == P.VM_PKT_DATA_USING_XFER_PAGES and pred(R.decode(m.rndis))
        m = self.wait(match, what)
        t, f = N.decode_message(m.payload)
        assert t == N.MSG_SEND_RNDIS_PKT and f["channel_type"] == N.CHANNEL_TYPE_CONTROL
        assert f["send_buf_section_index"] == N.SECTION_INDEX_NONE and m.flags == 1
        if not hold:
            self.complete_rx(m)
        c = R.decode(m.rndis)
        return Rep(c.msg_type, c.fields, m.rndis[c.buf_start:c.buf_start + c.buf_len], m)

    def reply(self, req_id: int, hold: bool = False) -> Rep:
        def match(c):
            return (isinstance(c, R.Control) and c.msg_type & R.MSG_COMPLETION
                    and "req_id" in c.fields.dtype.names and int(c.fields["req_id"]) == req_id)
        return self.rndis_msg(match, hold, f"the reply to request {req_id}")

    # --- d.5 ------------------------------------------------------------------------------
    def init(self, versions=N.LINUX_VERSIONS) -> int:
        for v in versions:
            tid = self.send(N.nvsp_init(v))
            p = self.completion(tid)
            t, f = N.decode_message(p, completion=True)
            assert t == N.MSG_INIT_COMPLETE
            if f["status"] == N.STATUS_SUCCESS:
                self.version = v
                return v
        raise AssertionError("no NVSP version accepted")

    def buffers(self, mtu: int = 1500):
        v = self.version
        if v > N.VERSION_1:
            self.send(N.nvsp_ndis_config(mtu + 14, N.linux_ndis_config_capabilities(v)),
                      completion=False)
        self.send(N.nvsp_ndis_version(*N.linux_ndis_version(v)), completion=False)
        if self.recv_gpa is None:
            self.recv_gpa = self.env.pages.alloc(self.recv_size)
            self.recv_handle = self.env.client.create_gpadl(self.relid, self.recv_gpa,
                                                            self.recv_size)
            self.send_gpa = self.env.pages.alloc(self.send_size)
            self.send_handle = self.env.client.create_gpadl(self.relid, self.send_gpa,
                                                            self.send_size)
        p = self.completion(self.send(N.nvsp_send_receive_buffer(self.recv_handle)))
        sections = N.decode_recv_buf_sections(p)
        t, f = N.decode_message(p, completion=True)
        assert f["status"] == N.STATUS_SUCCESS
        p = self.completion(self.send(N.nvsp_send_send_buffer(self.send_handle)))
        t, g = N.decode_message(p, completion=True)
        assert t == N.MSG_SEND_SEND_BUF_COMPLETE and g["status"] == N.STATUS_SUCCESS
        return sections, int(g["section_size"])

    def rndis(self, msg: bytes, via: str = "gpa", at: int = 0, section: int = 0,
              reply: bool = True, hold: bool = False):
        """Send one RNDIS control message (e.2) and return the host's reply."""
        if via == "gpa":
            self.env.ram.write(self.scratch + at, msg)
            tid = self.send_direct(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL),
                                [(self.scratch + at, len(msg))])
        else:
            self.env.ram.write(self.send_gpa + section * N.SEND_SECTION_SIZE, msg)
            tid = self.send(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL, section, len(msg)))
        t, f = N.decode_message(self.completion(tid), completion=True)
        assert t == N.MSG_SEND_RNDIS_PKT_COMPLETE and f["status"] == N.STATUS_SUCCESS
        if reply:
            return self.reply(struct.unpack_from("<I", msg, 8)[0], hold)
        return None

    def req(self) -> int:
        r, self.next_req = self.next_req, self.next_req + 1
        return r

    def query(self, oid: int, info: bytes = b"", **kw) -> tuple[int, Rep]:
        c = self.rndis(R.rndis_query(self.req(), oid, info), **kw)
        assert c.msg_type == R.MSG_QUERY_C
        return int(c.fields["status"]), c

    def query_ok(self, oid: int, info: bytes = b"", **kw) -> bytes:
        status, c = self.query(oid, info, **kw)
        assert status == R.STATUS_SUCCESS, hex(status)
        return c.info

    def set(self, oid: int, info: bytes) -> int:
        c = self.rndis(R.rndis_set(self.req(), oid, info))
        assert c.msg_type == R.MSG_SET_C
        return int(c.fields["status"])

    def bring_up(self) -> None:
        self.init()
        self.buffers()
        c = self.rndis(R.rndis_initialize(self.req()))
        assert int(c.fields["status"]) == R.STATUS_SUCCESS

    def keepalive(self) -> None:
        c = self.rndis(R.rndis_keepalive(self.req()))
        assert c.msg_type == R.MSG_KEEPALIVE_C and int(c.fields["status"]) == R.STATUS_SUCCESS

    def sync(self) -> None:
        """Until the host has taken all we wrote (or closed the channel)."""
        def done():
            self.drain()
            for m in [m for m in self.inbox if m.type == P.VM_PKT_DATA_USING_XFER_PAGES]:
                self.inbox.remove(m)
                self.complete_rx(m)
            return self.closed() or self.out.read_index == self.out.write_index
        wait_until(done, "the host to take the guest's packets")

    def reopen(self) -> None:
        wait_until(self.closed, "the channel to close")
        self.open()


@pytest.fixture
def env():
    e = Env()
    try:
        yield e
    finally:
        e.close()
        assert not e.errors, e.errors[0]


@pytest.fixture
def two(env):
    """NIC A (the one under test) and NIC B (must keep working), B brought up."""
    a, b = env.add(MAC_A), env.add(MAC_B)
    env.start()
    gb = Guest(env, b)
    gb.bring_up()
    ga = Guest(env, a)
    return env, a, ga, b, gb


def u32(b: bytes) -> int:
    return struct.unpack_from("<I", b)[0]


# ---- d.5 then e.3, as Linux does it -------------------------------------------------------

def test_linux_bring_up(env):
    dev = env.add(MAC_A)
    env.start()
    g = Guest(env, dev, ring_pages=128, recv_size=16 << 20)   # Linux's defaults (a.1, f.1)

    # d.5 step 2: 6.1 is accepted at once, with 40-byte messages (d.1)
    tid = g.send(N.nvsp_init(N.VERSION_61))
    p = g.completion(tid)
    assert len(p) == N.NVSP_PACKET_SIZE_V61
    t, f = N.decode_message(p, completion=True)
    assert (t, int(f["status"]), int(f["max_mdl_chain_len"])) == (N.MSG_INIT_COMPLETE, 1, 34)
    assert int(f["negotiated_protocol_ver"]) == N.VERSION_INVALID
    g.version = N.VERSION_61
    assert g.channel.state == "init" and g.channel.version == N.VERSION_61

    # steps 2-5: NDIS config and version (no completions asked), then the buffers
    sections, section_size = g.buffers()
    ch = g.channel
    assert ch.ndis_config == (1514, N.linux_ndis_config_capabilities(N.VERSION_61))
    assert ch.ndis_version == (6, 30)
    # f.1 layout, and Linux's checks of d.5 step 4
    assert len(sections) == 1
    off, sub, num, end = sections[0]
    assert off == 0 and sub >= N.ETH_MIN_MTU and sub * num <= 16 << 20
    assert sub == N.sub_allocation_size_for_mtu(1514) == 1806 and num == 9289
    assert end == sub * num
    # f.2 / d.5 step 5
    assert section_size == N.SEND_SECTION_SIZE and section_size >= N.ETH_MIN_MTU
    assert ch.send_buf.count == N.DEFAULT_TX and ch.send_buf.gpa == g.send_gpa
    assert ch.recv_buf.id == N.RECEIVE_BUFFER_ID and ch.recv_buf.gpa == g.recv_gpa

    # e.3 step 1: INITIALIZE (GPA-direct, as Linux sends control messages)
    c = g.rndis(R.rndis_initialize(g.req()))
    m = c.m
    assert c.msg_type == R.MSG_INIT_C and int(c.fields["msg_len"]) == R.INITIALIZE_CMPLT.itemsize
    f = c.fields
    assert (int(f["status"]), int(f["major_ver"]), int(f["minor_ver"])) == (0, 1, 0)
    assert (int(f["dev_flags"]), int(f["medium"]), int(f["max_pkt_per_msg"])) == (1, 0, 8)
    assert (int(f["max_xfer_size"]), int(f["pkt_alignment_factor"])) == (0xEFFFFFFF, 3)
    assert m.offset == 0 and m.count == R.INITIALIZE_CMPLT.itemsize   # control sub-allocation 0
    assert ch.state == "ready" and ch.rndis_state == "initialized"

    # steps 2-4
    assert u32(g.query_ok(R.OID_GEN_MAXIMUM_FRAME_SIZE)) == 1500
    assert g.query_ok(R.OID_802_3_PERMANENT_ADDRESS) == MAC_A.to_bytes(6, "big")
    name = g.query_ok(R.OID_GEN_FRIENDLY_NAME)
    assert len(name) == 512 and name.decode("utf-16-le").rstrip("\0") == "Network Device"
    # step 5: hardware offloads, checked as rndis_netdev_set_hwcaps reads them (e.6)
    caps = g.query_ok(R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                      R.linux_offload_query_input(N.VERSION_61))
    o = np.frombuffer(caps.ljust(R.NDIS_OFFLOAD.itemsize, b"\0"), dtype=R.NDIS_OFFLOAD)[0]
    assert int(o["hdr_type"]) == R.OBJTYPE_OFFLOAD and int(o["hdr_revision"]) == 3
    assert R.NDIS_OFFLOAD_SIZE_6_0 <= int(o["hdr_size"]) <= len(caps)
    tcp4 = R.TXCSUM_CAP_TCP4 | R.TXCSUM_CAP_TCP4_OPTIONS
    tcp6 = R.TXCSUM_CAP_TCP6 | R.TXCSUM_CAP_TCP6_OPTIONS | R.TXCSUM_CAP_IP6_EXT
    tx4, tx6 = int(o["csum_ip4_txcsum"]), int(o["csum_ip6_txcsum"])
    assert tx4 & tcp4 == tcp4 and tx4 & R.TXCSUM_CAP_UDP4
    assert tx6 & tcp6 == tcp6 and tx6 & R.TXCSUM_CAP_UDP6
    assert int(o["lsov2_ip4_encap"]) & R.OFFLOAD_ENCAP_802_3 and int(o["lsov2_ip4_maxsz"]) > 1 << 15
    assert int(o["lsov2_ip6_opts"]) & 5 == 5 and int(o["lsov2_ip6_encap"]) & 2
    assert not (o["rsc_ip4"] and o["rsc_ip6"])        # no LRO offered (i.4)
    # step 6: offload parameters -> SET_CMPLT, then the new config indicated (e.6)
    params = R.offload_parameters(
        ip_v4_csum=R.OFFLOAD_PARAMETERS_TX_RX_DISABLED,
        tcp_ip_v4_csum=4, udp_ip_v4_csum=4, tcp_ip_v6_csum=4, udp_ip_v6_csum=2,
        lso_v2_ipv4=R.OFFLOAD_PARAMETERS_LSO_ENABLED, lso_v2_ipv6=R.OFFLOAD_PARAMETERS_LSO_ENABLED)
    assert g.set(R.OID_TCP_OFFLOAD_PARAMETERS, params) == R.STATUS_SUCCESS
    ind = g.rndis_msg(lambda c: c.msg_type == R.MSG_INDICATE, what="the offload indication")
    assert int(ind.fields["status"]) == R.STATUS_TASK_OFFLOAD_CURRENT_CONFIG
    cur = np.frombuffer(ind.info.ljust(156, b"\0"), dtype=R.NDIS_OFFLOAD)[0]
    assert int(cur["csum_ip6_rxcsum"]) & R.TXCSUM_CAP_UDP6 == 0   # udp6: TX only
    assert int(cur["csum_ip6_txcsum"]) & R.TXCSUM_CAP_UDP6
    assert g.query_ok(OID_TCP_OFFLOAD_CURRENT_CONFIG) == ind.info
    assert ch.offload["udp6"] == [True, False] and ch.offload["ip4"] == [False, False]
    # steps 7-8
    assert u32(g.query_ok(R.OID_GEN_MEDIA_CONNECT_STATUS)) == R.MEDIA_STATE_CONNECTED
    assert u32(g.query_ok(R.OID_GEN_LINK_SPEED)) // 10000 == 10000        # Mbps (e.3 step 8)
    rss = g.query_ok(R.OID_GEN_RECEIVE_SCALE_CAPABILITIES, R.linux_rss_capabilities_query_input())
    r = np.frombuffer(rss, dtype=R.RSS_CAPABILITIES)[0]
    assert (int(r["hdr_type"]), int(r["hdr_revision"]), int(r["hdr_size"])) == (0x88, 2, 18)
    assert int(r["num_recv_que"]) == MAX_QUEUES and int(r["num_indirect_tabent"]) == R.ITAB_NUM
    # step 9: ndo_open
    assert g.set(R.OID_GEN_CURRENT_PACKET_FILTER,
                 struct.pack("<I", R.LINUX_OPEN_PACKET_FILTER)) == 0
    assert ch.packet_filter == 0x0D
    assert u32(g.query_ok(R.OID_GEN_CURRENT_PACKET_FILTER)) == 0x0D
    # step 10: MAC change; the permanent address stays
    new = bytes.fromhex("00155d0a0bff")
    assert g.set(R.OID_GEN_RNDIS_CONFIG_PARAMETER, R.mac_address_parameter(new)) == 0
    assert g.query_ok(OID_802_3_CURRENT_ADDRESS) == new
    assert g.query_ok(R.OID_802_3_PERMANENT_ADDRESS) == MAC_A.to_bytes(6, "big")
    assert g.set(R.OID_GEN_RNDIS_CONFIG_PARAMETER,
                 R.mac_address_parameter(bytes.fromhex("01005e000001"))) == R.STATUS_INVALID_DATA
    assert g.interrupts() > 0                   # the host signalled (a.4.6)
    assert not dev.violations and not dev.dropped
    # step 11: HALT gets no answer; the channel still completes it
    g.rndis(R.rndis_halt(g.req()), reply=False)
    assert ch.rndis_state == "halted"


def test_other_oids_of_e7(two):
    env, a, g, b, gb = two
    g.bring_up()
    listed = np.frombuffer(g.query_ok(R.OID_GEN_SUPPORTED_LIST), dtype="<u4").tolist()
    assert sorted(listed) == sorted(SUPPORTED_OIDS)
    assert u32(g.query_ok(OID_GEN_VENDOR_ID)) == 0x155D
    assert u32(g.query_ok(R.OID_GEN_MAC_OPTIONS)) == MAC_OPTIONS == 0x24D
    assert struct.unpack("<QQ", g.query_ok(R.OID_GEN_MAX_LINK_SPEED)) == (10**10, 10**10)
    # unknown OIDs (and LINK_STATE, whose layout the reference does not give)
    for oid in (0x00FFFFFF, R.OID_GEN_LINK_STATE, R.OID_OFFLOAD_ENCAPSULATION):
        status, c = g.query(oid)
        assert status == R.STATUS_NOT_SUPPORTED and c.info == b""
    assert g.set(0x00FFFFFF, b"\0" * 4) == R.STATUS_NOT_SUPPORTED
    # multicast list: stored, queried back; not a multiple of 6 refused
    lst = bytes.fromhex("01005e000001") + bytes.fromhex("333300000001")
    assert g.set(OID_802_3_MULTICAST_LIST, lst) == 0
    assert g.query_ok(OID_802_3_MULTICAST_LIST) == lst
    assert g.set(OID_802_3_MULTICAST_LIST, lst[:7]) == R.STATUS_INVALID_DATA
    # RSS parameters (g.3): Linux's block with every entry on queue 0 is stored;
    # entries past the NIC's queues, a short key, an empty table are refused
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, R.rss_parameters([0] * 128)) == 0
    assert g.channel.rss["key"] == R.DEFAULT_HASH_KEY and g.channel.rss["hashinfo"] == 0x1701
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                 R.rss_parameters([MAX_QUEUES] * 128)) == R.STATUS_INVALID_DATA
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                 R.rss_parameters([0] * 128, key=b"k" * 16)) == R.STATUS_INVALID_DATA
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, R.rss_parameters([])) == R.STATUS_INVALID_DATA
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                 R.rss_parameters([], flags=R.RSS_FLAG_DISABLE_RSS)) == 0
    assert g.channel.rss is None
    # e.7 keywords switch offloads
    assert g.set(R.OID_GEN_RNDIS_CONFIG_PARAMETER,
                 R.config_parameter_string("*TCPChecksumOffloadIPv4", "1")) == 0
    assert g.channel.offload["tcp4"] == [True, False]
    assert g.set(R.OID_GEN_RNDIS_CONFIG_PARAMETER,
                 R.config_parameter_string("*LsoV2IPv6", "x")) == R.STATUS_INVALID_DATA
    # keepalive, reset, SET_EX
    g.keepalive()
    g.rndis(R.rndis_reset(), reply=False)
    c = g.rndis_msg(lambda c: c.msg_type == R.MSG_RESET_C, what="RESET_CMPLT")
    assert int(c.fields["status"]) == 0
    assert not a.violations and not a.dropped


def test_rndis_from_a_send_section_and_across_pages(two):
    env, a, g, b, gb = two
    g.init()
    g.buffers()
    # OpenVMM accepts control messages from a send section too (e.2)
    c = g.rndis(R.rndis_initialize(g.req()), via="section", section=7)
    assert c.msg_type == R.MSG_INIT_C and int(c.fields["status"]) == 0
    # a message crossing a page: one GPA range with two PFNs (b.6)
    mac = g.query_ok(R.OID_802_3_PERMANENT_ADDRESS, at=PAGE - 10)
    assert mac == MAC_A.to_bytes(6, "big")
    assert g.query_ok(R.OID_802_3_PERMANENT_ADDRESS, via="section", section=169) == mac
    assert not a.violations and not a.dropped


@pytest.mark.parametrize("version,size", [(N.VERSION_5, 32), (N.VERSION_2, 32), (N.VERSION_1, 32)])
def test_older_versions(env, version, size):
    dev = env.add(MAC_A)
    env.start()
    g = Guest(env, dev)
    # unknown versions get status NONE and leave the channel uninitialised (d.5)
    tid = g.send(N.nvsp_init(0x00070000))
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert int(f["status"]) == N.STATUS_NONE and g.channel.state == "uninit"
    p = g.completion(g.send(N.nvsp_init(version)))
    assert len(p) == size and p[N.NVSP_PACKET_SIZE_V1:] == bytes(size - N.NVSP_PACKET_SIZE_V1)
    t, f = N.decode_message(p, completion=True)
    assert int(f["status"]) == 1
    assert int(f["negotiated_protocol_ver"]) == (2 if version == N.VERSION_1 else 0xFFFFFFFF)
    g.version = version
    g.buffers()
    c = g.rndis(R.rndis_initialize(g.req()))
    assert int(c.fields["status"]) == 0
    if version == N.VERSION_1:
        # NDIS_CONFIG needs 2 (d.3): at 1 it is a violation
        g.send(N.nvsp_ndis_config(1514, 0), completion=False)
        wait_until(g.closed, "the channel to close")
        assert dev.violations["NVSP message above the negotiated version"] == 1


@pytest.mark.parametrize("dev_mtu,guest_mtu,frame", [(1500, 9000, 1514), (9000, 9000, 9014),
                                                     (9000, 1500, 1514), (1400, 1500, 1414),
                                                     (1500, 20000, 1514)])
def test_mtu(env, dev_mtu, guest_mtu, frame):
    dev = env.add(MAC_A, mtu=dev_mtu)
    env.start()
    g = Guest(env, dev, recv_size=1 << 20)
    g.init()
    sections, _ = g.buffers(mtu=guest_mtu)
    assert sections[0][1] == N.sub_allocation_size_for_mtu(max(frame, 1514))
    g.rndis(R.rndis_initialize(g.req()))
    assert u32(g.query_ok(R.OID_GEN_MAXIMUM_FRAME_SIZE)) == frame - 14


def test_send_buffer_is_optional(env):
    dev = env.add(MAC_A)
    env.start()
    g = Guest(env, dev)
    g.init()
    g.send(N.nvsp_ndis_config(1514, 0), completion=False)
    g.send(N.nvsp_ndis_version(6, 30), completion=False)
    g.recv_gpa = env.pages.alloc(g.recv_size)
    g.recv_handle = env.client.create_gpadl(g.relid, g.recv_gpa, g.recv_size)
    g.completion(g.send(N.nvsp_send_receive_buffer(g.recv_handle)))
    c = g.rndis(R.rndis_initialize(g.req()))       # OpenVMM's "no send buffer" case
    assert int(c.fields["status"]) == 0 and g.channel.state == "ready"
    # then a section is a malformed packet, completed as invalid
    g.env.ram.write(g.scratch, R.rndis_keepalive(9))
    tid = g.send(N.nvsp_send_rndis_packet(1, 0, 12))
    assert N.decode_message(g.completion(tid), True)[1]["status"] == INVALID
    assert dev.dropped["send section without a send buffer"] == 1


def test_suballocations_freed_on_completion_and_reused(two):
    env, a, g, b, gb = two
    g.bring_up()
    sub = g.channel.recv_buf.sub_alloc_size
    # INITIALIZE's reply was completed: sub-allocation 0 is free again
    m0 = g.rndis(R.rndis_keepalive(g.req()), hold=True)
    m1 = g.rndis(R.rndis_keepalive(g.req()), hold=True)
    m0, m1 = m0.m, m1.m
    assert (m0.offset, m1.offset) == (0, sub)
    assert (m0.tid, m1.tid) == (0, 1)                 # trans_id = first sub-allocation (f.1)
    g.complete_rx(m0)
    m2 = g.rndis(R.rndis_keepalive(g.req()), hold=True).m
    assert m2.offset == 0                             # reused after the guest's completion
    # all 16 control sub-allocations held: the next reply waits for one
    held = [m1, m2]
    for _ in range(14):
        held.append(g.rndis(R.rndis_keepalive(g.req()), hold=True).m)
    assert sorted(m.offset // sub for m in held) == list(range(16))
    req = g.req()
    g.rndis(R.rndis_keepalive(req), reply=False)
    time.sleep(0.05)
    g.drain()
    assert not [m for m in g.inbox if m.type == P.VM_PKT_DATA_USING_XFER_PAGES]
    g.complete_rx(held.pop(5))
    assert g.reply(req).m.offset == 5 * sub
    for m in held:
        g.complete_rx(m)
    g.keepalive()
    assert not a.violations and not a.dropped


def test_link_indications(two):
    env, a, g, b, gb = two
    a.indicate_link(False)                          # before RNDIS: only remembered
    g.bring_up()
    assert u32(g.query_ok(R.OID_GEN_MEDIA_CONNECT_STATUS)) == R.MEDIA_STATE_DISCONNECTED
    a.indicate_link(True)
    c = g.rndis_msg(lambda c: c.msg_type == R.MSG_INDICATE, what="MEDIA_CONNECT")
    assert int(c.fields["status"]) == R.STATUS_MEDIA_CONNECT and c.info == b""
    a.indicate_link(False)
    c = g.rndis_msg(lambda c: c.msg_type == R.MSG_INDICATE, what="MEDIA_DISCONNECT")
    assert int(c.fields["status"]) == R.STATUS_MEDIA_DISCONNECT
    assert u32(g.query_ok(R.OID_GEN_MEDIA_CONNECT_STATUS)) == R.MEDIA_STATE_DISCONNECTED
    a.indicate_link(True)
    c = g.rndis_msg(lambda c: c.msg_type == R.MSG_INDICATE, what="MEDIA_CONNECT")
    assert int(c.fields["status"]) == R.STATUS_MEDIA_CONNECT
    assert u32(g.query_ok(R.OID_GEN_MEDIA_CONNECT_STATUS)) == R.MEDIA_STATE_CONNECTED
    gb.keepalive()
    assert not [m for m in gb.inbox if m.type == P.VM_PKT_DATA_USING_XFER_PAGES]   # B: no flap


def test_data_packets_go_to_the_data_handler(two):
    env, a, g, b, gb = two
    g.bring_up()
    frame = R.rndis_packet(bytes(60))
    env.ram.write(g.send_gpa + 3 * N.SEND_SECTION_SIZE, frame)
    tid = g.send(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA, 3, len(frame)))
    assert N.decode_message(g.completion(tid), True)[1]["status"] == N.STATUS_SUCCESS
    assert a.channel.dropped["data path not attached"] == 1
    # a replacement handler sees the section, or the GPA pieces
    seen = []

    def handler(ch, data: TxData, trans_id):
        seen.append((data.section, data.section_size,
                     None if data.pieces is None else data.pieces.tolist(), trans_id))
        ch.complete(trans_id, N.STATUS_SUCCESS)
    g.channel.data_handler = handler
    tid1 = g.send(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA, 3, len(frame)))
    env.ram.write(g.scratch + PAGE - 20, frame)
    tid2 = g.send_direct(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA),
                      [(g.scratch + PAGE - 20, len(frame))])
    g.completion(tid1)
    g.completion(tid2)
    assert seen == [(3, len(frame), None, tid1),
                    (-1, 0, [[g.scratch + PAGE - 20, len(frame), 0]], tid2)]


def test_interrupt_mask_and_reader_signal(env):
    dev = env.add(MAC_A)
    env.start()
    g = Guest(env, dev, ring_pages=1)
    g.bring_up()
    g.interrupts()
    # a.4.6: no signal while the guest masks its receive ring
    g.inr.interrupt_mask = 1
    g.keepalive()
    assert g.interrupts() == 0
    g.inr.interrupt_mask = 0
    # a.5.4: the guest fills its sending ring with the host held off, asks for
    # room; the host's reads must signal it (data packets: nothing comes back)
    msg = N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA, 0, 60)
    env.ram.write(g.send_gpa, R.rndis_packet(bytes(16)))
    with dev.lock:
        n = 0
        while g.out.write_packet(P.VM_PKT_DATA_INBAND, msg, NO_RESPONSE, 0)[0]:
            n += 1
        assert g.out.set_pending(64) is False
        os.eventfd_write(g.sig, 1)
    wait_until(lambda: g.interrupts() > 0, "the host's signal for room")
    g.out.clear_pending()
    g.sync()
    assert dev.channel.dropped["data path not attached"] == n and not dev.violations


def test_back_pressure_when_the_guest_ring_is_full(env):
    dev = env.add(MAC_A)
    env.start()
    g = Guest(env, dev, ring_pages=1)                # 4 KiB each way
    g.bring_up()
    env.ram.write(g.send_gpa, R.rndis_packet(bytes(16)))
    msg = N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA, 0, 60)
    tids = []

    def put() -> bool:
        t = g.tid()
        ok, sig = g.out.write_packet(P.VM_PKT_DATA_INBAND, msg, t, 1)
        g.kick(sig)
        if ok:
            tids.append(t)
        return ok
    # The guest reads nothing: the host fills its ring with completions (64 bytes
    # each), asks for room (a.4.2) and stops reading; then ours fills up too.
    deadline = time.monotonic() + TIMEOUT
    while put() or g.inr.pending_send_sz == 0:
        assert time.monotonic() < deadline
        time.sleep(0.0002)
    assert len(tids) > 100 and g.inr.bytes_to_write() <= 64
    time.sleep(0.02)
    assert not put()                                # still stalled
    # Reading signals the host (pending_send_sz), which goes on to the end.
    got = set()

    def progress() -> bool:
        g.drain()
        got.update(m.tid for m in g.inbox if m.type == P.VM_PKT_COMP)
        g.inbox.clear()
        while len(tids) < 300 and put():
            pass
        return len(tids) == 300 and got == set(tids)
    wait_until(progress, "every completion")
    assert g.inr.pending_send_sz == 0 and not dev.violations


def test_guest_buffer_over_scattered_pages(env):
    """Linux vmallocs its buffers: the GPADL's pages need not follow each other."""
    class Gpadl:
        handle, byte_offset, byte_count = 7, 100, 3 * PAGE - 200
        pfns = [9, 4, 6]

        def contiguous_gpa(self):
            return None
    b = V.GuestBuffer(env.ram, Gpadl(), 0)
    assert b.gpa is None and b.size == 3 * PAGE - 200
    data = bytes(range(256)) * 40
    b.write(PAGE - 300, data[:5000])               # across all three pages
    assert env.ram.read(9 * PAGE + PAGE - 200, 200) == data[:200]
    assert env.ram.read(4 * PAGE, PAGE) == data[200:200 + PAGE]
    assert env.ram.read(6 * PAGE, 5000 - 200 - PAGE) == data[200 + PAGE:5000]
    assert b.read(PAGE - 300, 5000) == data[:5000]
    for off, n in ((-1, 1), (0, b.size + 1), (b.size, 1), (b.size + 1, 0)):
        with pytest.raises(ValueError):
            b.read(off, n)
    b.read(b.size, 0)


# ---- hostile guests -----------------------------------------------------------------------------

def rndis_section(g, msg: bytes, section: int = 0, size: int | None = None) -> int:
    g.env.ram.write(g.send_gpa + section * N.SEND_SECTION_SIZE, msg)
    return g.send(N.nvsp_send_rndis_packet(1, section, len(msg) if size is None else size))


def gpa_body(ranges, payload, tid=77):
    """b.6 by hand: ranges = [(byte_count, byte_offset, [pfn, ...])]."""
    rb = b"".join(struct.pack("<II", c, o) + struct.pack(f"<{len(p)}Q", *p) for c, o, p in ranges)
    hdr = struct.pack("<II", 0, len(ranges)) + rb
    pl = payload + bytes(-len(payload) % 8)
    return struct.pack("<HHHHQ", 9, (16 + len(hdr)) // 8, (16 + len(hdr) + len(pl)) // 8, 1,
                       tid) + hdr + pl


def expect_drop(g, tid, key):
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert t == N.MSG_SEND_RNDIS_PKT_COMPLETE and int(f["status"]) == INVALID
    assert g.dev.dropped[key] >= 1, dict(g.dev.dropped)
    g.keepalive()                                   # the channel goes on


def case_before_init(g):
    g.send(N.nvsp_ndis_version(6, 30), completion=False)
    return "message before INIT"


def case_duplicate_ndis_config(g):
    g.init()
    g.send(N.nvsp_ndis_config(1514, 0), completion=False)
    g.send(N.nvsp_ndis_config(1514, 0), completion=False)
    return "duplicate NDIS_CONFIG"


def case_rndis_before_buffers(g):
    g.init()
    g.send(N.nvsp_ndis_config(1514, 0), completion=False)
    g.env.ram.write(g.scratch, R.rndis_initialize(1))
    g.send_direct(N.nvsp_send_rndis_packet(1), [(g.scratch, 24)])
    return "RNDIS before the buffers"


def case_recv_buf_before_config(g):
    g.init()
    g.send(N.nvsp_send_receive_buffer(0xE1E11))
    return "SEND_RECV_BUF before NDIS_CONFIG"


def case_unknown_completion(g):
    g.bring_up()
    g.send_comp(N.nvsp_send_rndis_packet_complete(), 0x4242)
    return "completion for an unknown transaction id"


def case_corrupt_guest_ring(g):
    g.bring_up()
    g.out.write_index = 12345                       # not a multiple of 8 (a.2)
    os.eventfd_write(g.sig, 1)
    return "corrupt ring"


def case_corrupt_host_ring(g):
    g.bring_up()
    g.inr.read_index = g.inr.datasize + 8           # the host's next write must refuse it
    g.env.ram.write(g.scratch, R.rndis_keepalive(99))
    g.send_direct(N.nvsp_send_rndis_packet(1), [(g.scratch, 12)])
    return "corrupt ring"


def case_bad_descriptor(g):
    g.bring_up()
    g.send_raw(struct.pack("<HHHHQ", 6, 1, 4, 0, 1) + bytes(16))     # offset8 < 2 (a.5.2)
    return "corrupt ring"


def case_transfer_pages_from_guest(g):
    g.bring_up()
    g.send_raw(struct.pack("<HHHHQ", 7, 3, 8, 1, 5) + struct.pack("<HBBI", 0xCAFE, 0, 0, 0)
               + N.nvsp_send_rndis_packet(1))
    return "transfer-page packet from the guest"


def case_host_only_message(g):
    g.bring_up()
    g.send(N.nvsp_vf_association(True, 1))
    return "NVSP message a guest does not send"


def case_second_init(g):
    g.bring_up()
    g.send(N.nvsp_init(N.VERSION_61))
    return "INIT after the version was negotiated"


def case_teardown_in_use(g):
    g.bring_up()
    g.env.client.teardown_gpadl(g.relid, g.send_handle)
    g.send_handle = g.env.client.create_gpadl(g.relid, g.send_gpa, g.send_size)
    return "buffer GPADL torn down while in use"


def case_revoke_unknown(g):
    g.bring_up()
    g.send(N.nvsp_revoke_receive_buffer(0x1234), completion=False)
    return "REVOKE_RECV_BUF of a buffer not in use"


VIOLATIONS = [case_before_init, case_duplicate_ndis_config, case_rndis_before_buffers,
              case_recv_buf_before_config, case_unknown_completion, case_corrupt_guest_ring,
              case_corrupt_host_ring, case_bad_descriptor, case_transfer_pages_from_guest,
              case_host_only_message, case_second_init, case_teardown_in_use,
              case_revoke_unknown]


@pytest.mark.parametrize("case", VIOLATIONS, ids=lambda c: c.__name__[5:])
def test_violation_closes_the_channel(two, case):
    env, a, g, b, gb = two
    key = case(g)
    wait_until(g.closed, f"channel close after {key}")
    assert a.violations[key] == 1 and a.channel is None
    assert not env.server.violations           # NVSP's violation, not VMBus's
    gb.keepalive()                                  # the other NIC is untouched
    assert not b.violations
    # the server goes on: the same NIC opens again and works
    g.open()
    g.bring_up()
    assert u32(g.query_ok(R.OID_GEN_MAXIMUM_FRAME_SIZE)) == 1500
    assert a.violations[key] == 1


def test_malformed_packets_are_dropped(two):
    env, a, g, b, gb = two
    g.bring_up()
    nsec = g.channel.send_buf.count
    ka = R.rndis_keepalive(50)
    # send-section index and size (f.2)
    expect_drop(g, rndis_section(g, ka, section=0, size=0), "send section size out of range")
    g.env.ram.write(g.send_gpa, ka)
    expect_drop(g, g.send(N.nvsp_send_rndis_packet(1, nsec, 12)), "send section index out of range")
    expect_drop(g, g.send(N.nvsp_send_rndis_packet(1, 0xFFFFFFFE, 12)),
                "send section index out of range")
    expect_drop(g, rndis_section(g, ka, size=N.SEND_SECTION_SIZE + 1),
                "send section size out of range")
    # RNDIS lengths and offsets outside the section (e.1)
    bad_len = bytearray(ka)
    struct.pack_into("<I", bad_len, 4, 4096)                       # msg_len past the 12 bytes
    expect_drop(g, rndis_section(g, bytes(bad_len)), "malformed RNDIS control message")
    q = bytearray(R.rndis_query(51, R.OID_GEN_MAXIMUM_FRAME_SIZE, b"abcd"))
    struct.pack_into("<I", q, 20, 5000)                            # info_buf_offset outside
    expect_drop(g, rndis_section(g, bytes(q)), "malformed RNDIS control message")
    struct.pack_into("<II", q, 16, 0xFFFFFFF0, 20)                 # info_buflen outside
    expect_drop(g, rndis_section(g, bytes(q)), "malformed RNDIS control message")
    expect_drop(g, rndis_section(g, ka[:7]), "malformed RNDIS control message")
    expect_drop(g, rndis_section(g, R.rndis_packet(bytes(60))),
                "data message on the control channel")
    # GPA-direct outside guest RAM, byte_offset >= 4096, PFN list past the header (b.6)
    pages = env.ram.size // PAGE
    body = gpa_body([(12, 0, [pages])], N.nvsp_send_rndis_packet(1), tid=601)
    g.send_raw(body)
    expect_drop(g, 601, "bad GPA-direct ranges")
    g.send_raw(gpa_body([(12, 0, [2 ** 63 + 5])], N.nvsp_send_rndis_packet(1), tid=602))
    expect_drop(g, 602, "bad GPA-direct ranges")
    g.send_raw(gpa_body([(12, 4096, [g.scratch // PAGE, 0])], N.nvsp_send_rndis_packet(1),
                        tid=603))
    expect_drop(g, 603, "bad GPA-direct ranges")
    g.send_raw(gpa_body([(8000, 100, [g.scratch // PAGE])], N.nvsp_send_rndis_packet(1),
                        tid=604))
    expect_drop(g, 604, "bad GPA-direct ranges")
    # a GPA-direct message crossing the end of guest RAM: the PFN check covers it
    g.send_raw(gpa_body([(2 * PAGE, 0, [pages - 1, pages])], N.nvsp_send_rndis_packet(1), tid=605))
    expect_drop(g, 605, "bad GPA-direct ranges")
    # an NVSP message shorter than its type's layout, a channel type that is neither
    g.send(struct.pack("<II", N.MSG_SEND_RNDIS_PKT, 1))
    wait_until(lambda: a.dropped["NVSP message too short"] == 1, "the short message dropped")
    expect_drop(g, g.send(N.nvsp_send_rndis_packet(7)), "unknown RNDIS channel type")
    expect_drop(g, g.send(N.nvsp_send_rndis_packet(1)), "SEND_RNDIS_PKT without RNDIS bytes")
    # control message over MAX_CONTROL_MESSAGE
    big = R.rndis_set(52, R.OID_GEN_NETWORK_LAYER_ADDRESSES, bytes(0x4000))
    env.ram.write(g.scratch, big[:PAGE * 4])
    tid = g.send_direct(N.nvsp_send_rndis_packet(1), [(g.scratch, 3 * PAGE), (g.scratch, 3 * PAGE)])
    expect_drop(g, tid, "control message too long")
    assert not a.violations and a.channel is not None
    gb.keepalive()


def test_revoke_then_teardown_as_linux_does(two):
    env, a, g, b, gb = two
    g.bring_up()
    g.send(N.nvsp_revoke_receive_buffer(), completion=False)
    g.send(N.nvsp_revoke_send_buffer(), completion=False)
    g.sync()
    assert a.channel.state == "revoked" and a.channel.recv_buf is None
    # processing has ended: a request is dropped, not answered
    env.ram.write(g.scratch, R.rndis_keepalive(7))
    g.send_direct(N.nvsp_send_rndis_packet(1), [(g.scratch, 12)])
    g.sync()
    assert a.dropped["message after a buffer was revoked"] == 1
    env.client.close(g.relid)
    env.client.teardown_gpadl(g.relid, g.recv_handle)
    env.client.teardown_gpadl(g.relid, g.send_handle)
    wait_until(lambda: a.channel is None, "the channel to go")
    assert not a.violations and not env.server.violations


# ---- fuzz ---------------------------------------------------------------------------------

def _mutate(rng, msg: bytes) -> bytes:
    b = bytearray(msg)
    for _ in range(int(rng.integers(1, 4))):
        if not b:
            break
        how = int(rng.integers(0, 4))
        if how == 0:
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        elif how == 1 and len(b) >= 4:
            at = int(rng.integers(0, len(b) - 3)) & ~3
            v = int(rng.choice([0, 1, 7, 8, 12, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                                0x80000000, len(b), len(b) + 1, 4096, int(rng.integers(0, 2**32))]))
            struct.pack_into("<I", b, at, v)
        elif how == 2:
            b = b[:int(rng.integers(0, len(b) + 1))]
        else:
            b += bytes(rng.integers(0, 256, int(rng.integers(1, 24)), dtype=np.uint8))
    return bytes(b)


def _rndis_sample(rng, g) -> bytes:
    req = int(rng.integers(1, 1000))
    oids = list(SUPPORTED_OIDS) + [int(rng.integers(0, 2**32)), R.OID_GEN_LINK_STATE]
    oid = int(rng.choice(oids))
    return [lambda: R.rndis_initialize(req), lambda: R.rndis_query(req, oid),
            lambda: R.rndis_query(req, R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                                  R.linux_offload_query_input(N.VERSION_61)),
            lambda: R.rndis_set(req, R.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0xD)),
            lambda: R.rndis_set(req, R.OID_TCP_OFFLOAD_PARAMETERS,
                                R.offload_parameters(tcp_ip_v4_csum=4, lso_v2_ipv4=2)),
            lambda: R.rndis_set(req, R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                                R.rss_parameters([0] * 128)),
            lambda: R.rndis_set(req, R.OID_GEN_RNDIS_CONFIG_PARAMETER,
                                R.mac_address_parameter(bytes.fromhex("00155d000001"))),
            lambda: R.rndis_set(req, oid, bytes(rng.integers(0, 256, 16, dtype=np.uint8))),
            lambda: R.rndis_keepalive(req), lambda: R.rndis_reset(), lambda: R.rndis_halt(req),
            lambda: R.rndis_indicate_status(R.STATUS_MEDIA_CONNECT),
            lambda: R.rndis_packet(bytes(60)),
            lambda: R.rndis_keepalive(req) + R.rndis_query(req + 1, oid),
            ][int(rng.integers(0, 14))]()


def _nvsp_sample(rng, g) -> bytes:
    h = int(rng.choice([g.recv_handle, g.send_handle, g.ring_handle, 0, 0xE1E10 + 7]))
    v = int(rng.choice(list(N.LINUX_VERSIONS) + [0, 0x00070000]))
    return [lambda: N.nvsp_init(v), lambda: N.nvsp_ndis_config(int(rng.integers(0, 20000)), 0xFF),
            lambda: N.nvsp_ndis_version(6, 30), lambda: N.nvsp_send_receive_buffer(h),
            lambda: N.nvsp_send_send_buffer(h), lambda: N.nvsp_revoke_receive_buffer(),
            lambda: N.nvsp_revoke_send_buffer(),
            lambda: N.nvsp_send_rndis_packet(int(rng.integers(0, 3)), int(rng.integers(0, 200)),
                                             int(rng.integers(0, 7000))),
            lambda: N.nvsp_subchannel_request(int(rng.integers(0, 9))),
            lambda: N.nvsp_switch_data_path(int(rng.integers(0, 3))),
            lambda: struct.pack("<II", N.MSG_OID_QUERY_EX, 0) + bytes(32),
            lambda: struct.pack("<I", int(rng.integers(0, 140))) + bytes(36),
            ][int(rng.integers(0, 12))]()


def _fuzz_case(rng, g) -> None:
    kind = int(rng.choice(6, p=[0.2, 0.25, 0.25, 0.1, 0.05, 0.15]))
    if kind == 0:                                   # a mutated NVSP message, in band
        msg = _mutate(rng, _nvsp_sample(rng, g)) if rng.random() < 0.8 else _nvsp_sample(rng, g)
        g.send(msg, completion=bool(rng.random() < 0.8))
    elif kind == 1:                                 # a mutated RNDIS message in a send section
        msg = _mutate(rng, _rndis_sample(rng, g))[:N.SEND_SECTION_SIZE]
        sec = int(rng.choice([0, 1, 169, 170, int(rng.integers(0, 2**32))]))
        size = int(rng.choice([len(msg), len(msg) + 8, max(len(msg) - 4, 0), 6144, 6145]))
        if sec < 170:
            g.env.ram.write(g.send_gpa + sec * N.SEND_SECTION_SIZE, msg.ljust(size, b"\0")[:6144])
        g.send(N.nvsp_send_rndis_packet(int(rng.choice([0, 1, 1, 1, 5])), sec, size))
    elif kind == 2:                                 # a mutated RNDIS message by GPA
        msg = _mutate(rng, _rndis_sample(rng, g))
        at = int(rng.integers(0, 2 * PAGE))
        g.env.ram.write(g.scratch + at, msg)
        n = max(int(rng.choice([len(msg), len(msg) + 16, 1])), 1)
        if rng.random() < 0.7:
            g.send_direct(N.nvsp_send_rndis_packet(1), [(g.scratch + at, n)])
        else:
            pfn = int(rng.choice([g.scratch // PAGE, g.env.ram.size // PAGE, 2**40,
                                  int(rng.integers(0, 2**63))]))
            off = int(rng.choice([at % PAGE, 4096, 4095]))
            ranges = [(n, off, [pfn] * int(rng.integers(0, 3)))]
            g.send_raw(gpa_body(ranges, _mutate(rng, N.nvsp_send_rndis_packet(1))
                                if rng.random() < 0.3 else N.nvsp_send_rndis_packet(1),
                                tid=int(rng.integers(1, 2**16))))
    elif kind == 3:                                 # a raw descriptor (a.5.2, b.1)
        t = int(rng.choice([6, 7, 9, 0xB, 0, 8, int(rng.integers(0, 2**16))]))
        body = bytes(rng.integers(0, 256, 8 * int(rng.integers(0, 6)), dtype=np.uint8))
        o8 = int(rng.choice([2, 3, 1, 0, 5, 0xFFFF]))
        l8 = int(rng.choice([2 + len(body) // 8, o8, 1, 0xFFFF, 2 + len(body) // 8 + 1]))
        g.send_raw(struct.pack("<HHHHQ", t, o8, l8, int(rng.choice([0, 1, 2, 0x8000])),
                               int(rng.integers(0, 2**63))) + body)
    elif kind == 4:                                 # completions, some unknown
        tid = int(rng.choice([0, 1, 15, 16, 0x4242, int(rng.integers(0, 2**63))]))
        g.send_comp(_mutate(rng, N.nvsp_send_rndis_packet_complete()) if rng.random() < 0.5
                    else N.nvsp_send_rndis_packet_complete(), tid)
    else:                                           # data packets
        g.send(N.nvsp_send_rndis_packet(0, int(rng.choice([0, 1, 169, 170, 0xFFFFFFFF])),
                                        int(rng.choice([0, 60, 6144, 6145]))),
               completion=bool(rng.random() < 0.9))


def test_fuzz_never_raises(two):
    env, a, g, b, gb = two
    rng = np.random.default_rng(20251126)
    g.next_req = 10**6
    g.bring_up()
    closes = 0
    for i in range(200):
        _fuzz_case(rng, g)
        g.sync()
        g.inbox.clear()                             # stale completions must not match later
        ch = g.channel
        if g.closed() or ch is None:
            closes += 1
            g.reopen()
            g.next_req = 10**6                      # above the fuzz's request ids
            g.bring_up()
        elif ch.state == "ready" and ch.rndis_state == "initialized" and i % 10 == 0:
            g.keepalive()                           # still answering
        elif ch.state != "ready":                   # revoked or mid-handshake: start over
            env.client.close(g.relid)
            g.reopen()
            g.next_req = 10**6                      # above the fuzz's request ids
            g.bring_up()
    assert "internal error" not in a.violations, a.violations
    assert closes == sum(a.violations.values()) and closes > 10
    assert sum(a.dropped.values()) > 10
    gb.keepalive()
    assert not b.violations and not env.errors
