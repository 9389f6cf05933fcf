"""NetVSC, the guest side of the synthetic NIC: Linux's bring-up, message for message.

What drivers/net/hyperv does when a synthetic NIC appears (vmbus_netvsp.md d.5,
e.2, e.3, f.1, f.2), over a channel opened with the guest's VMBus driver
(netvsp.vmbus.client):

1. the ring (``ring_pages`` a way, Linux's default 128) in contiguous guest pages,
   its GPADL, OPENCHANNEL;
2. NVSP INIT from 6.1 down until the host says SUCCESS; NDIS_CONFIG (MTU + 14 and
   the capability bits Linux sets for that version) and NDIS_VERSION, neither
   asking for a completion;
3. the receive buffer (``recv_sections`` x 1728 bytes, page rounded) with its
   GPADL and SEND_RECV_BUF id 0xCAFE, the completion checked as Linux checks it;
   the send buffer (``send_sections`` x 6144) with SEND_SEND_BUF id 0;
4. RNDIS over SEND_RNDIS_PKT control packets, each message GPA-direct from a
   guest page (e.2): INITIALIZE, then the queries and sets of e.3 in Linux's
   order; replies arrive in the receive buffer through transfer-page packets,
   which are completed (NVSP 108, status SUCCESS) as Linux does.

The host is not trusted either: replies are decoded with the validating decoders
of nvsp.py and rndis.py, transfer-page ranges are checked against the receive
buffer, and a reply that does not fit is an error, not a crash. This module is
the control path (Python once per message); the data path comes with the
compiled loops of the NetVSC process.
"""
from __future__ import annotations

import os
import select
import struct
import time
from dataclasses import dataclass

import numpy as np

from hypervisor.partition import GuestMemory

from . import nvsp as N
from .layout import offsets
from . import rndis as R
from .vmbus import packet as P
from .vmbus import ring as RG
from .vmbus.channel_msg import NETVSC_GUID
from .vmbus.client import GuestPages, VmbusClient

PAGE = 4096
RECV_SECTION_SIZE = 1728          # NETVSC_RECV_SECTION_SIZE (f.1)
SEND_SECTION_SIZE = 6144          # NETVSC_SEND_SECTION_SIZE (f.2)
RNDIS_MAX_XFER = 0x4000           # INITIALIZE max_transfer_size (e.3 step 1)
MAX_XFER_RANGES = 562             # NVSP_RSC_MAX (b.5)


class NetvscError(RuntimeError):
    """The host answered something Linux would refuse, or did not answer."""


@dataclass
class Link:
    mac: bytes = b""
    mtu: int = 0
    connected: bool = False
    speed_mbps: int = 0
    friendly_name: str = ""
    max_pkt_per_msg: int = 8
    pkt_align: int = 8
    offload_caps: bytes = b""
    rss_queues: int = 0


@dataclass
class SubChannel:
    """An open subchannel (c.9, g.1): its rings and doorbells."""
    index: int
    relid: int
    out: RG.Ring
    inr: RG.Ring
    signal: int
    interrupt: int
    ring_gpadl: int


class Netvsc:
    def __init__(self, ram: GuestMemory, client: VmbusClient, pages: GuestPages,
                 mtu: int = 1500, ring_pages: int = 128, recv_sections: int = 9709,
                 send_sections: int = 170, timeout: float = 10.0):
        self.ram, self.client, self.pages = ram, client, pages
        self.mtu, self.ring_pages, self.timeout = mtu, ring_pages, timeout
        self.recv_size = -(-recv_sections * RECV_SECTION_SIZE // PAGE) * PAGE
        self.send_size = -(-send_sections * SEND_SECTION_SIZE // PAGE) * PAGE
        self.version = None
        self.link = Link()
        self._trans = 0
        self._req = 0
        self._completions: dict[int, bytes] = {}
        self._rndis: dict[int, tuple[R.Control, bytes]] = {}   # req_id -> reply, its bytes
        self.indications: list[int] = []
        self.on_link = None               # called with the new state on an indication
        self.host_inband: list[bytes] = []
        # h: the VF the host associated (Linux's vf_alloc / vf_serial), and the path
        self.vf_alloc, self.vf_serial = False, 0
        self.vf_events: list[tuple[bool, int]] = []
        self.datapath = N.DATAPATH_SYNTHETIC
        # once the data path runs: callbacks of the VF's events and of completions
        self.on_vf = None                 # (allocated, serial)
        self.on_datapath = None           # (path): the host moved it back to synthetic
        self.waiters: dict = {}           # trans id -> callback(completion payload)
        self._desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
        self._ranges = np.zeros((MAX_XFER_RANGES, 2), dtype=np.int64)
        self.subchannels: list[SubChannel] = []
        self.send_table: list[int] | None = None     # from SEND_INDIRECTION_TABLE (g.2)

    # ------------------------------------------------------------------ the channel
    def _open_ring(self, relid: int):
        """A channel's ring pages, initialised by the guest before the host sees
        them (a.2), their GPADL and OPENCHANNEL."""
        c = self.client
        ring_bytes = 2 * (PAGE + self.ring_pages * PAGE)
        base = self.pages.alloc(ring_bytes)
        out = RG.Ring(self.ram.mem, base, self.ring_pages * PAGE)              # to the host
        inr = RG.Ring(self.ram.mem, base + PAGE + self.ring_pages * PAGE,
                      self.ring_pages * PAGE)                                 # from the host
        out.init()
        inr.init()
        gpadl = c.create_gpadl(relid, base, ring_bytes)
        sig, irq = c.open(relid, gpadl, self.ring_pages + 1)
        return out, inr, sig, irq, gpadl

    def open(self) -> None:
        self.relid = self.client.find(NETVSC_GUID)
        self.out, self.inr, self.signal, self.interrupt, self.ring_gpadl = \
            self._open_ring(self.relid)
        self.scratch = self.pages.alloc(2 * PAGE)          # RNDIS requests go from here

    def open_subchannels(self, want: int) -> int:
        """vRSS (g.1) as rndis_filter_device_add does it: with NVSP >= 5 and at
        least two receive queues, ask for min(want, queues, 64) - 1 subchannels,
        open those the host allocated with the primary's ring size, then set RSS
        twice (disabled, then enabled with the default key and the table
        i % channels). Returns the number of channels; 1 when there is no vRSS."""
        queues = self.link.rss_queues
        if self.version is None or self.version < N.VERSION_5 or queues < 2 or want < 2:
            return 1
        num = min(want, queues, N.VRSS_CHANNEL_MAX)
        t, m = N.decode_message(self._completion(
            self._send(N.nvsp_subchannel_request(num - 1)), "SUBCHANNEL"), completion=True)
        got = int(m["num_subchannels"])
        if t != N.MSG_SUBCHANNEL or int(m["status"]) != N.STATUS_SUCCESS or \
                not 1 <= got <= num - 1:
            return 1                          # Linux falls back to one channel
        for k in range(1, got + 1):
            relid = self.client.wait_offer(NETVSC_GUID, k)
            out, inr, sig, irq, gpadl = self._open_ring(relid)
            self.subchannels.append(SubChannel(k, relid, out, inr, sig, irq, gpadl))
        n = 1 + got
        table = [i % n for i in range(R.ITAB_NUM)]
        self._set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                  R.rss_parameters(table, flags=R.RSS_FLAG_DISABLE_RSS))
        if not self._set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, R.rss_parameters(table)):
            raise NetvscError("the host refused the RSS parameters (g.3)")
        # the send table follows once every subchannel is open (g.1)
        self._until(lambda: self.send_table, "SEND_INDIRECTION_TABLE")
        return n

    def _next_trans(self) -> int:
        self._trans += 1
        return self._trans

    def _kick(self, signal: bool) -> None:
        if signal:
            os.eventfd_write(self.signal, 1)

    def _send(self, msg: bytes, completion: bool = True) -> int:
        """An in-band NVSP message; Linux's requestor ids start at 1 (b.4)."""
        tid = self._next_trans() if completion else P.VMBUS_RQST_ID_NO_RESPONSE
        ok, sig = self.out.write_packet(P.VM_PKT_DATA_INBAND, msg, tid,
                                        P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED
                                        if completion else 0)
        if not ok:
            raise NetvscError("the ring to the host is full")
        self._kick(sig)
        return tid

    def _send_gpa(self, msg: bytes, gpa: int, length: int) -> int:
        """An NVSP message in a GPA-direct packet describing [gpa, +length) (b.6)."""
        tid = self._next_trans()
        bufs = np.array([[gpa, length]], dtype=np.int64)
        src = np.frombuffer(msg, dtype=np.uint8)
        mem, base, ds = self.out.mem, self.out.base, self.out.datasize
        need = P.gpa_direct_footprint(bufs, 1, len(src))
        start = RG.ring_write_begin(mem, base, ds, need)
        if start < 0:
            raise NetvscError(f"cannot write to the host ring ({start})")
        end = P.build_gpa_direct(mem, base, ds, start,
                                 P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, tid, bufs, 1,
                                 src, 0, len(src))
        if end < 0:
            raise NetvscError(f"cannot build a GPA-direct packet ({end})")
        self._kick(RG.ring_write_commit(mem, base, ds, start, end) == 1)
        return tid

    # ------------------------------------------------------------------ receiving
    def _drain(self) -> int:
        n = 0
        self.inr.rpos = None              # the data path may have moved the read index
        while True:
            pkt = self.inr.read_packet()
            if pkt is None:
                break
            n += 1
            self._dispatch(pkt)
        if n:
            self._kick(self.inr.commit_read())
        return n

    def handle_one(self) -> bool:
        """One packet from the host for the control path (the data path stopped at
        it): a completion, a control reply or indication, an in-band message."""
        self.inr.rpos = None              # the data path may have moved the read index
        pkt = self.inr.read_packet()
        if pkt is None:
            return False
        self._dispatch(pkt)
        self._kick(self.inr.commit_read())
        return True

    def _dispatch(self, pkt) -> None:
        """One packet from the host: a completion (to its waiter, or kept for
        _completion), received frames and control replies, or an in-band message."""
        if pkt.type == P.VM_PKT_COMP:
            cb = self.waiters.pop(pkt.trans_id, None)
            if cb is not None:
                cb(pkt.payload)
            else:
                self._completions[pkt.trans_id] = pkt.payload
        elif pkt.type == P.VM_PKT_DATA_USING_XFER_PAGES:
            self._receive(pkt)
        elif pkt.type == P.VM_PKT_DATA_INBAND:
            self._inband(pkt.payload)

    def _inband(self, payload: bytes) -> None:
        """An in-band NVSP message from the host: the send table (g.2) is taken as
        netvsc_send_table takes it (16 entries, the offset checked, Linux's
        NVSP <= 6 offset quirk); a VF association (h.1) is recorded as Linux's
        netvsc_send_vf records it (never completed), and a host's SWITCH_DATA_PATH
        back to synthetic is followed; the rest are kept for whoever asks."""
        mtype = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else -1
        if mtype == N.MSG_SEND_VF_ASSOCIATION and len(payload) >= N.SEND_VF_ASSOCIATION.itemsize:
            _, m = N.decode_message(payload)
            self.vf_alloc, self.vf_serial = bool(int(m["allocated"])), int(m["serial"])
            if not self.vf_alloc:
                self._to_synthetic()
            self.vf_events.append((self.vf_alloc, self.vf_serial))
            if self.on_vf is not None:
                self.on_vf(self.vf_alloc, self.vf_serial)
            return
        if mtype == N.MSG_SWITCH_DATA_PATH and len(payload) >= N.SWITCH_DATA_PATH.itemsize:
            _, m = N.decode_message(payload)
            if int(m["active_datapath"]) == N.DATAPATH_SYNTHETIC:
                self._to_synthetic()
            return
        if mtype == N.MSG_SEND_INDIRECTION_TABLE:
            try:
                self.send_table = N.decode_indirection_table(payload, self.version)
            except ValueError:
                pass                           # Linux logs and ignores it
            return
        self.host_inband.append(payload)

    def _receive(self, pkt) -> None:
        """RNDIS messages from the host in receive-buffer ranges; completed after."""
        mem, base, ds = self.inr.mem, self.inr.base, self.inr.datasize
        nr = P.parse_xfer_page(mem, base, ds, pkt.desc, N.RECEIVE_BUFFER_ID, self.recv_size,
                               MAX_XFER_RANGES, self._ranges)
        status = N.STATUS_SUCCESS
        if nr < 0:
            status = N.STATUS_FAIL
        else:
            for k in range(nr):
                count, off = int(self._ranges[k, 0]), int(self._ranges[k, 1])
                raw = self.ram.read(self.recv_gpa + off, count)
                try:
                    m = R.decode(raw)
                except ValueError:
                    status = N.STATUS_FAIL
                    continue
                if isinstance(m, R.Control):
                    if m.msg_type == R.MSG_INDICATE:
                        self.indications.append(int(m.fields["status"]))
                        self._indicated(int(m.fields["status"]))
                    else:
                        self._rndis[int(m.fields["req_id"])] = (m, raw)
        ok, sig = self.out.write_packet(P.VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(status),
                                        pkt.trans_id, 0)
        self._kick(sig)

    def _indicated(self, status: int) -> None:
        if status == R.STATUS_MEDIA_CONNECT:
            self.link.connected = True
        elif status == R.STATUS_MEDIA_DISCONNECT:
            self.link.connected = False
        else:
            return
        if self.on_link is not None:
            self.on_link(self.link.connected)

    def poll(self, wait: float = 0.0) -> int:
        """Handle what the host sent; wait up to ``wait`` seconds for an interrupt."""
        n = self._drain()
        if n or wait <= 0:
            return n
        if select.select([self.interrupt], [], [], wait)[0]:
            os.eventfd_read(self.interrupt)
        return self._drain()

    def _until(self, done, what: str):
        deadline = time.monotonic() + self.timeout
        while True:
            got = done()
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetvscError(f"no {what} from the host within {self.timeout:g} s")
            self.poll(min(left, 0.05))

    def _completion(self, tid: int, what: str) -> bytes:
        return self._until(lambda: self._completions.pop(tid, None), f"completion of {what}")

    # ------------------------------------------------------------------ NVSP (d.5)
    def negotiate(self) -> int:
        for v in N.LINUX_VERSIONS:
            tid = self._send(N.nvsp_init(v, v))
            t, m = N.decode_message(self._completion(tid, "INIT"), completion=True)
            if t == N.MSG_INIT_COMPLETE and int(m["status"]) == N.STATUS_SUCCESS:
                self.version = v
                break
        else:
            raise NetvscError("the host accepted no NVSP version")
        if self.version > N.VERSION_1:
            self._send(N.nvsp_ndis_config(self.mtu + 14,
                                          N.linux_ndis_config_capabilities(self.version)),
                       completion=False)
        self._send(N.nvsp_ndis_version(*N.linux_ndis_version(self.version)), completion=False)
        return self.version

    def _to_synthetic(self) -> None:
        changed = self.datapath != N.DATAPATH_SYNTHETIC
        self.datapath = N.DATAPATH_SYNTHETIC
        if changed and self.on_datapath is not None:
            self.on_datapath(N.DATAPATH_SYNTHETIC)

    def control_ids(self) -> None:
        """From now on the data path runs: control requests take transaction ids of
        their own range, so the data path leaves their completions to
        ``handle_one`` (netvsc_datapath.CTL_ID)."""
        from .netvsc_datapath import CTL_ID
        self._trans = max(self._trans, CTL_ID)

    def request_data_path(self, path: int, done) -> None:
        """SWITCH_DATA_PATH without waiting (the data path is running): ``done(path)``
        once the host completed it, from the thread that handles the completion.
        Call it only from the thread that writes the primary channel's ring."""
        if path == N.DATAPATH_VF and not self.vf_alloc:
            raise NetvscError("no VF is associated: the data path stays synthetic")
        tid = self._send(N.nvsp_switch_data_path(path))

        def completed(_payload):
            self.datapath = path
            done(path)
        self.waiters[tid] = completed

    def switch_data_path(self, path: int) -> None:
        """SWITCH_DATA_PATH (h.1) as newer Linux sends it: completion requested, and
        the path counts as switched once the host completed it (it has moved its
        side by then)."""
        done: list[int] = []
        self.request_data_path(path, done.append)
        self._until(lambda: done or None, "completion of SWITCH_DATA_PATH")

    def buffers(self) -> None:
        c = self.client
        self.recv_gpa = self.pages.alloc(self.recv_size)
        self.recv_gpadl = c.create_gpadl(self.relid, self.recv_gpa, self.recv_size)
        reply = self._completion(self._send(N.nvsp_send_receive_buffer(self.recv_gpadl)),
                                 "SEND_RECV_BUF")
        t, m = N.decode_message(reply, completion=True)
        if t != N.MSG_SEND_RECV_BUF_COMPLETE or int(m["status"]) != N.STATUS_SUCCESS:
            raise NetvscError("the host refused the receive buffer")
        sections = N.decode_recv_buf_sections(reply)
        # d.5 step 4: exactly Linux's checks
        if len(sections) != 1 or sections[0][0] != 0:
            raise NetvscError(f"receive buffer sections {sections}: Linux takes one at 0")
        _, sub, count, _ = sections[0]
        if sub < 68 or sub * count > self.recv_size:
            raise NetvscError(f"receive sub-allocations of {sub} x {count} do not fit")
        self.recv_sub_alloc = sub
        self.send_gpa = self.pages.alloc(self.send_size)
        self.send_gpadl = c.create_gpadl(self.relid, self.send_gpa, self.send_size)
        t, m = N.decode_message(self._completion(self._send(
            N.nvsp_send_send_buffer(self.send_gpadl)), "SEND_SEND_BUF"), completion=True)
        if t != N.MSG_SEND_SEND_BUF_COMPLETE or int(m["status"]) != N.STATUS_SUCCESS or \
                int(m["section_size"]) < 68:
            raise NetvscError("the host refused the send buffer")
        self.send_section_size = int(m["section_size"])
        self.send_section_count = self.send_size // self.send_section_size

    # ------------------------------------------------------------------ RNDIS (e.3)
    def _rndis_request(self, build) -> tuple[R.Control, bytes]:
        self._req += 1
        req = self._req
        msg = build(req)
        if len(msg) > 2 * PAGE:
            raise NetvscError(f"RNDIS request of {len(msg)} bytes")
        self.ram.write(self.scratch, msg)
        tid = self._send_gpa(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL), self.scratch,
                             len(msg))
        t, m = N.decode_message(self._completion(tid, "SEND_RNDIS_PKT"), completion=True)
        if t != N.MSG_SEND_RNDIS_PKT_COMPLETE or int(m["status"]) != N.STATUS_SUCCESS:
            raise NetvscError(f"the host failed RNDIS request {req}")
        return self._until(lambda: self._rndis.pop(req, None), f"RNDIS reply {req}")

    def _query(self, oid: int, info: bytes = b"") -> bytes | None:
        m, raw = self._rndis_request(lambda r: R.rndis_query(r, oid, info))
        if int(m.fields["status"]) != R.STATUS_SUCCESS:
            return None
        return raw[m.buf_start:m.buf_start + m.buf_len]

    def _set(self, oid: int, info: bytes) -> bool:
        m, _ = self._rndis_request(lambda r: R.rndis_set(r, oid, info))
        return int(m.fields["status"]) == R.STATUS_SUCCESS

    def rndis_init(self) -> Link:
        link = self.link
        m, _ = self._rndis_request(lambda r: R.rndis_initialize(r, 1, 0, RNDIS_MAX_XFER))
        if int(m.fields["status"]) != R.STATUS_SUCCESS:
            raise NetvscError("RNDIS INITIALIZE failed")
        link.max_pkt_per_msg = int(m.fields["max_pkt_per_msg"])
        link.pkt_align = 1 << int(m.fields["pkt_alignment_factor"])
        v = self._query(R.OID_GEN_MAXIMUM_FRAME_SIZE)
        link.mtu = min(self.mtu, struct.unpack_from("<I", v)[0]) if v and len(v) >= 4 \
            else self.mtu
        mac = self._query(R.OID_802_3_PERMANENT_ADDRESS)
        if not mac or len(mac) < 6:
            raise NetvscError("the host gave no MAC address")
        link.mac = bytes(mac[:6])
        name = self._query(R.OID_GEN_FRIENDLY_NAME)
        if name:
            link.friendly_name = name.decode("utf-16-le", "replace").split("\x00")[0]
        caps = self._query(R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                           R.linux_offload_query_input(self.version))
        if caps is None or len(caps) < 4 or caps[0] != 0xA7 or caps[1] < 1 or \
                not 112 <= struct.unpack_from("<H", caps, 2)[0] <= len(caps):
            raise NetvscError("offload capabilities missing or malformed (e.3 step 5)")
        link.offload_caps = bytes(caps)
        size = 28 if self.version > N.VERSION_4 else 22
        self._set(R.OID_TCP_OFFLOAD_PARAMETERS, R.offload_parameters(size))
        st = self._query(R.OID_GEN_MEDIA_CONNECT_STATUS)
        link.connected = bool(st) and struct.unpack_from("<I", st)[0] == R.MEDIA_STATE_CONNECTED
        if self.version >= N.VERSION_5:
            sp = self._query(R.OID_GEN_LINK_SPEED)
            if sp and len(sp) >= 4:
                link.speed_mbps = struct.unpack_from("<I", sp)[0] // 10000
            rss = self._query(R.OID_GEN_RECEIVE_SCALE_CAPABILITIES,
                              R.linux_rss_capabilities_query_input())
            at = offsets(R.RSS_CAPABILITIES)["num_recv_que"]
            if rss and len(rss) >= at + 4:
                link.rss_queues = struct.unpack_from("<I", rss, at)[0]
        return link

    def open_device(self) -> bool:
        """ndo_open: the packet filter Linux sets (e.3 step 9)."""
        return self._set(R.OID_GEN_CURRENT_PACKET_FILTER, struct.pack(
            "<I", R.PACKET_TYPE_DIRECTED | R.PACKET_TYPE_ALL_MULTICAST | R.PACKET_TYPE_BROADCAST))

    def bring_up(self) -> Link:
        self.open()
        self.negotiate()
        self.buffers()
        self.rndis_init()
        self.open_device()
        return self.link
