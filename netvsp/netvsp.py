"""NetVSP, the host side of the synthetic NIC: its control path (vmbus_netvsp.md d, e, f, i).

``NetvspDevice`` is the VmbusServer device of one vNIC: it offers the network
class (c.3, ``NETVSC_GUID``) and makes a ``NetvspChannel`` when the guest opens
the channel, dropping it when the channel closes. ``NetvspChannel.poll()``
drains the guest-to-host ring and answers what Linux's hv_netvsc sends there:

- the NVSP handshake (d.5, host part as OpenVMM's ``NetChannel::initialize``):
  INIT with an exact version match, then at most one each of NDIS_CONFIG,
  NDIS_VERSION, SEND_RECV_BUF and SEND_SEND_BUF, in any order;
- RNDIS control messages (e.1-e.3, e.7) carried by SEND_RNDIS_PKT with channel
  type 1, from a send-buffer section and/or GPA-direct ranges (e.2); every
  reply goes back in a receive-buffer sub-allocation as a transfer-page packet
  (b.5, f.1), freed when the guest completes it;
- link indications (e.8) with ``indicate_link``.

Data packets (channel type 0) are handed to ``channel.data_handler``; the
compiled data path (datapath.py) takes that place, this module has no
per-packet data code.

State machine of a channel (``NetvspChannel.state``)::

    uninit --INIT(supported)--> init --SEND_RNDIS_PKT, having NDIS_VERSION and the
      |  INIT(unsupported):         |    receive buffer (and NDIS_CONFIG at >= 2)--> ready
      |  INIT_COMPLETE status NONE, |  NDIS_CONFIG / NDIS_VERSION / SEND_RECV_BUF /
      |  stays uninit               |  SEND_SEND_BUF, each at most once, any state
      v                             v  after INIT (SEND_RECV_BUF after NDIS_CONFIG)
    anything else: violation     REVOKE_RECV_BUF / REVOKE_SEND_BUF --> revoked
                                 (processing ends: only the other REVOKE is taken)
    any state --violation--> closed (the VMBus channel is closed by the server)

RNDIS has its own small state (``rndis_state``): uninitialized -> initialized
(INITIALIZE) -> halted (HALT); INITIALIZE again re-initializes.

Versions the host accepts (d.2): 6.1, 6, 5, 4, 2 and 1 — every one Linux tries
(``nvsp.LINUX_VERSIONS``); replies use 40-byte NVSP messages at 6.1 and 28-byte
ones below (d.1, OpenVMM's packet sizes).

The guest is hostile (DESIGN.md "Partitions, guest RAM and the guest side"):

- a *malformed* packet (a message too short for its type, a bad send-section
  index or size, GPA-direct ranges that do not parse or leave guest RAM, RNDIS
  lengths or offsets outside the bytes given, ...) is dropped and counted in
  ``dropped``; a SEND_RNDIS_PKT that asked for a completion still gets one, with
  NVSP status INVALID_RNDIS_PKT, so the guest can free its section;
- a *protocol violation* (anything before INIT, a duplicate handshake message,
  RNDIS before the buffers, a message type a guest does not send, a completion
  for a transaction id the host never used, a corrupt ring) is counted in
  ``violations``, logged, and closes that channel through the server; the host
  goes on serving every other channel.

Guest memory is reached only through the ring kernels (ring.py), the GPADLs
the guest named as buffers (``GuestBuffer``: every access bounds-checked
against the GPADL's byte count) and the GPA-direct ranges of the packet being
handled (parsed by packet.parse_gpa_direct, which refuses pages outside guest
RAM). Every field is read once into Python ints or copied bytes, then checked.

Threads: the server calls the device's hooks from whatever thread pumps it;
``poll`` and ``indicate_link`` may be called from others. One re-entrant lock
per device serialises them.
"""
from __future__ import annotations

import collections
import logging
import struct
import threading
import uuid
from typing import NamedTuple

import numpy as np

from hypervisor.partition import GuestMemory

from . import nvsp as N
from . import rndis as R
from .layout import U32, decode as decode_struct, encode
from .vmbus import channel_msg as M
from switch.toeplitz import check_hash_types, key_table

from .vmbus.packet import (ERRORS as PACKET_ERRORS, VM_PKT_COMP, VM_PKT_DATA_INBAND,
                           VM_PKT_DATA_USING_GPA_DIRECT, VM_PKT_DATA_USING_XFER_PAGES,
                           VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, build_xfer_page,
                           inband_footprint, parse_gpa_direct, xfer_footprint)
from .vmbus.ring import E_FULL, FEAT_PENDING_SEND_SZ, Ring, RingError, ring_write_begin, \
    ring_write_commit

log = logging.getLogger("hvnet.netvsp")

PAGE = 4096

# d.2: every version Linux tries, newest first.
SUPPORTED_VERSIONS = (N.VERSION_61, N.VERSION_6, N.VERSION_5, N.VERSION_4, N.VERSION_2,
                      N.VERSION_1)

# NVSP message types a guest sends (d.3: direction G->H). Anything else from the
# guest tears the channel down, as OpenVMM's parse_packet does.
GUEST_MESSAGES = frozenset({
    N.MSG_INIT, N.MSG_SEND_NDIS_VERSION, N.MSG_SEND_RECV_BUF, N.MSG_REVOKE_RECV_BUF,
    N.MSG_SEND_SEND_BUF, N.MSG_REVOKE_SEND_BUF, N.MSG_SEND_RNDIS_PKT, N.MSG_SEND_NDIS_CONFIG,
    N.MSG_SWITCH_DATA_PATH, N.MSG_OID_QUERY_EX, N.MSG_SUBCHANNEL})

MAX_BATCH = 256                  # packets handled per poll() before returning
MAX_CONTROL_MESSAGE = 0x4000     # bytes of one control SEND_RNDIS_PKT (Linux max_xfer_size, e.3)
MAX_GPA_RANGES = 64              # Linux uses <= 32 page buffers (f.3)
MAX_PIECES = 256
MAX_BACKLOG = 100 * 1024         # queued RNDIS replies; OpenVMM's 100 KiB (i.2)
MAX_QUEUES = 8                   # channels per NIC, the primary included (g.1: vRSS needs >= 2)
RSS_RESERVED_SUBALLOCS = 16      # OpenVMM keeps 16 receive sub-allocations aside (g.1)

# e.7 values, as OpenVMM answers them.
LINK_SPEED_BPS = 10_000_000_000          # net_backend's default link speed (i.1)
BUFFER_SPACE = 256 * 1024                # TRANSMIT/RECEIVE_BUFFER_SPACE
VENDOR_ID = 0x0000155D
VENDOR_DESCRIPTION = b"Microsoft Corporation\0"
DRIVER_VERSION = 0x0100                  # u16 (e.7)
# COPY_LOOKAHEAD | TRANSFERS_NOT_PEND | NO_LOOPBACK | 8021P | 8021Q_VLAN
MAC_OPTIONS = 0x24D
MAXIMUM_SEND_PACKETS = 0xFFFFFFFF
FRIENDLY_NAME = "Network Device"         # in a 512-byte buffer (e.3 step 4)
FRIENDLY_NAME_BYTES = 512
MULTICAST_LIST_MAX = 32                  # our choice: OpenVMM answers 0 and takes no list
LSO_MAX_SIZE = R.LSO_MAX_SIZE
LSO_MIN_SEGMENTS = 2

# e.7: the keywords OpenVMM understands in OID_GEN_RNDIS_CONFIG_PARAMETER; the
# value's bit 0 is TX, bit 1 RX (LSO: 0 or 1).
_CSUM_KEYWORDS = {"*IPChecksumOffloadIPv4": "ip4", "*TCPChecksumOffloadIPv4": "tcp4",
                  "*TCPChecksumOffloadIPv6": "tcp6", "*UDPChecksumOffloadIPv4": "udp4",
                  "*UDPChecksumOffloadIPv6": "udp6"}
_LSO_KEYWORDS = {"*LsoV2IPv4": "lso4", "*LsoV2IPv6": "lso6"}

_FLAG_COMPLETION = VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED
_U32_MAX = 0xFFFFFFFF


def _u32(v: int) -> bytes:
    return struct.pack("<I", v & _U32_MAX)


def _i64(v: int) -> int:
    """A u64 as the int64 with the same bits (kernels take int64)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


class TxData(NamedTuple):
    """Where the RNDIS bytes of a data SEND_RNDIS_PKT are (e.2): the send-buffer
    section first (``section`` -1: none), then the GPA-direct ``pieces``
    ((n, 3) int64 rows gpa, length, range of packet.parse_gpa_direct; None for an
    in-band packet). Indices and ranges are already checked."""
    section: int
    section_size: int
    pieces: np.ndarray | None


class GuestBuffer:
    """The bytes a buffer GPADL grants (f.1, f.2), in page order. ``gpa`` is the
    guest address of byte 0 when the pages are contiguous (what the compiled data
    path wants), else None. Reads and writes are bounds-checked against the
    GPADL's byte count and go page by page."""

    def __init__(self, memory: GuestMemory, gpadl, buf_id: int):
        self.memory = memory
        self.handle = gpadl.handle
        self.id = buf_id
        self.size = int(gpadl.byte_count)
        self.byte_offset = int(gpadl.byte_offset)
        self.pages = np.asarray(gpadl.pfns, dtype=np.int64) * PAGE
        self.gpa = gpadl.contiguous_gpa()

    def _spans(self, off: int, n: int):
        if off < 0 or n < 0 or off > self.size or n > self.size - off:
            raise ValueError(f"[{off}, +{n}) is outside the {self.size}-byte buffer")
        pos = self.byte_offset + off
        while n > 0:
            k = min(n, PAGE - pos % PAGE)
            yield int(self.pages[pos // PAGE]) + pos % PAGE, k
            pos += k
            n -= k

    def read(self, off: int, n: int) -> bytes:
        return b"".join(self.memory.read(g, k) for g, k in self._spans(off, n))

    def write(self, off: int, data: bytes) -> None:
        at = 0
        for g, k in self._spans(off, len(data)):
            self.memory.write(g, data[at:at + k])
            at += k


class ReceiveBuffer(GuestBuffer):
    """f.1: one section of equal sub-allocations. The first
    RX_RESERVED_CONTROL_BUFFERS carry RNDIS control replies and indications
    (OpenVMM); the rest are the data path's (``data_first`` onwards)."""

    def __init__(self, memory, gpadl, buf_id, sub_alloc_size):
        super().__init__(memory, gpadl, buf_id)
        self.sub_alloc_size = sub_alloc_size
        self.count = self.size // sub_alloc_size
        self.data_first = min(N.RX_RESERVED_CONTROL_BUFFERS, self.count)
        self.free = set(range(self.data_first))

    def alloc(self) -> int | None:
        if not self.free:
            return None
        idx = min(self.free)          # lowest first: a freed one is reused next
        self.free.discard(idx)
        return idx


class SendBuffer(GuestBuffer):
    """f.2: sections of SEND_SECTION_SIZE bytes, indexed from 0."""

    def __init__(self, memory, gpadl, buf_id):
        super().__init__(memory, gpadl, buf_id)
        self.section_size = N.SEND_SECTION_SIZE
        self.count = self.size // self.section_size


class _Violation(Exception):
    """Raised inside a handler to close the channel (caught by poll)."""

    def __init__(self, key: str, detail: str = ""):
        super().__init__(key)
        self.key, self.detail = key, detail


class _Drop(Exception):
    """Raised inside a handler: drop this packet (caught by _packet). ``status``
    set: complete the guest's SEND_RNDIS_PKT with it if it asked."""

    def __init__(self, key: str, detail: str = "", status: int | None = None):
        super().__init__(key)
        self.key, self.detail, self.status = key, detail, status


def _offload_state() -> dict:
    """All offloads the host offers, on (the current config starts as the
    hardware capabilities; the guest then sets what it uses, e.3 step 6)."""
    return {k: [True, True] for k in ("ip4", "tcp4", "udp4", "tcp6", "udp6")} | \
        {"lso4": True, "lso6": True}


def ndis_offload(state: dict, revision: int = R.NDIS_OFFLOAD_REVISION_3) -> bytes:
    """NDIS_OFFLOAD (e.6) for an offload state: hardware capabilities when every
    entry is on, the current configuration otherwise. Checksum bits per e.6
    (TCP and UDP with their options; no IPv4 header checksum is offered: Linux
    never enables it), LSOv2 for IPv4 and IPv6, no RSC (as OpenVMM, i.4)."""
    size = {R.NDIS_OFFLOAD_REVISION_1: R.NDIS_OFFLOAD_SIZE_6_0,
            R.NDIS_OFFLOAD_REVISION_2: R.NDIS_OFFLOAD_SIZE_6_1}.get(revision, R.NDIS_OFFLOAD_SIZE)
    o = np.zeros(1, dtype=R.NDIS_OFFLOAD)[0]
    o["hdr_type"], o["hdr_revision"], o["hdr_size"] = R.OBJTYPE_OFFLOAD, revision, size

    def bits(direction: int, v4: bool) -> int:
        b = 0
        if v4:                       # state["ip4"] (header checksum) adds nothing
            if state["tcp4"][direction]:
                b |= R.TXCSUM_CAP_TCP4 | R.TXCSUM_CAP_TCP4_OPTIONS | R.TXCSUM_CAP_IP4_OPTIONS
            if state["udp4"][direction]:
                b |= R.TXCSUM_CAP_UDP4 | R.TXCSUM_CAP_IP4_OPTIONS
        else:
            if state["tcp6"][direction]:
                b |= R.TXCSUM_CAP_TCP6 | R.TXCSUM_CAP_TCP6_OPTIONS | R.TXCSUM_CAP_IP6_EXT
            if state["udp6"][direction]:
                b |= R.TXCSUM_CAP_UDP6 | R.TXCSUM_CAP_IP6_EXT
        return b
    for name, direction, v4 in (("ip4_txcsum", 0, True), ("ip4_rxcsum", 1, True),
                                ("ip6_txcsum", 0, False), ("ip6_rxcsum", 1, False)):
        o["csum_" + name] = bits(direction, v4)
        o["csum_" + name.replace("csum", "enc")] = R.OFFLOAD_ENCAP_802_3
    if state["lso4"]:
        o["lsov2_ip4_encap"] = R.OFFLOAD_ENCAP_802_3
        o["lsov2_ip4_maxsz"], o["lsov2_ip4_minsg"] = LSO_MAX_SIZE, LSO_MIN_SEGMENTS
    if state["lso6"]:
        o["lsov2_ip6_encap"] = R.OFFLOAD_ENCAP_802_3
        o["lsov2_ip6_maxsz"], o["lsov2_ip6_minsg"] = LSO_MAX_SIZE, LSO_MIN_SEGMENTS
        o["lsov2_ip6_opts"] = R.LSOV2_IP6_EXT | R.LSOV2_IP6_TCP_OPTIONS
    return o.tobytes()[:size]


def rss_capabilities(queues: int = MAX_QUEUES) -> bytes:
    """OID_GEN_RECEIVE_SCALE_CAPABILITIES (e.6): Toeplitz over TCP/IPv4 and
    TCP/IPv6, one interrupt message, ``queues`` receive queues, 128 entries."""
    return encode(R.RSS_CAPABILITIES, hdr_type=R.OBJTYPE_RSS_CAPABILITIES,
                  hdr_revision=R.RSS_CAPABILITIES_REVISION_2,
                  hdr_size=R.RSS_CAPABILITIES.itemsize,
                  cap_flag=R.RSS_CAP_TCP_IPV4 | R.RSS_CAP_TCP_IPV6 | R.HASH_FUNC_TOEPLITZ,
                  num_int_msg=1, num_recv_que=queues, num_indirect_tabent=R.ITAB_NUM)


class NetvspChannel:
    """The NVSP/RNDIS endpoint of one open VMBus channel of a NetVSP device."""

    def __init__(self, device: "NetvspDevice", ch):
        self.device, self.ch = device, ch
        mem = device.memory.mem
        self.in_ring = Ring(mem, *ch.in_ring)       # guest -> host
        self.out_ring = Ring(mem, *ch.out_ring)     # host -> guest
        # a.2: the producer of a ring announces pending_send_sz support in it.
        self.out_ring.feature_bits = self.out_ring.feature_bits | FEAT_PENDING_SEND_SZ
        self.state = "uninit"
        self.closed = False
        self.version: int | None = None
        self.msg_size = N.NVSP_PACKET_SIZE_V1
        self.ndis_config: tuple[int, int] | None = None     # (mtu field, capability bits)
        self.ndis_version: tuple[int, int] | None = None
        self.frame_size = min(N.MTU_DEFAULT, device.mtu + N.ETH_HLEN)
        self.recv_buf: ReceiveBuffer | None = None
        self.send_buf: SendBuffer | None = None
        self.datapath = N.DATAPATH_SYNTHETIC
        self.vf_serial: int | None = None        # the VF associated with the guest (h)
        # RNDIS and NDIS state (e.3, e.7)
        self.rndis_state = "uninitialized"
        self.packet_filter = 0
        self.mac = device.mac_bytes
        self.multicast: list[bytes] = []
        self.offload = _offload_state()
        self.rss: dict | None = None
        # Counters: reason -> count.
        self.dropped: collections.Counter = collections.Counter()
        self.violations: collections.Counter = collections.Counter()
        self.stats: collections.Counter = collections.Counter()
        # Outgoing: packets waiting for ring room, replies waiting for a sub-allocation.
        self._out: collections.deque = collections.deque()
        self._backlog: collections.deque = collections.deque()
        self._backlog_bytes = 0
        self._blocked = False
        self._inflight: dict[int, int] = {}      # transfer-page trans_id -> sub-allocation
        self._signal = False
        self._pieces = np.zeros((MAX_PIECES, 3), dtype=np.int64)
        # Replaceable: the compiled data path takes these over.
        self.data_handler = device.data_handler or NetvspChannel.drop_data
        self.rx_completion_handler = None        # (channel, trans_id, status) -> bool

    # ------------------------------------------------------------------ public
    @property
    def relid(self) -> int:
        return self.ch.relid

    def poll(self, limit: int = MAX_BATCH) -> int:
        """Handle what the guest wrote into its ring (at most ``limit`` packets)
        and send what waits; returns the number of packets handled. The compiled
        data path calls it with limit 1 for the control packet it stopped at."""
        if self.closed:
            return 0
        if self.ch.signal is not None and limit == MAX_BATCH:
            self.ch.signal.take()
        self.in_ring.rpos = None       # the data path may have moved the read index
        try:
            return self._poll(limit)
        except _Violation as v:
            self._violation(v.key, v.detail)
        except RingError as e:
            self._violation("corrupt ring", str(e))
        except Exception:                        # a bug must not take the host down
            log.exception("NetVSP channel %d: internal error", self.relid)
            self._violation("internal error")
        finally:
            self._kick()
        return 0

    def indicate_link(self, up: bool) -> None:
        """e.8: MEDIA_CONNECT / MEDIA_DISCONNECT, once RNDIS is initialized."""
        if self.closed or self.rndis_state != "initialized" or self.recv_buf is None:
            return
        status = R.STATUS_MEDIA_CONNECT if up else R.STATUS_MEDIA_DISCONNECT
        try:
            self._reply(R.rndis_indicate_status(status))
            self._flush()
        except RingError as e:
            self._violation("corrupt ring", str(e))
        except Exception:
            log.exception("NetVSP channel %d: internal error", self.relid)
            self._violation("internal error")
        finally:
            self._kick()

    def complete(self, trans_id: int, status: int = N.STATUS_SUCCESS) -> None:
        """SEND_RNDIS_PKT_COMPLETE for a guest packet (e.2), e.g. from the data path."""
        self._send(VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(status, size=self.msg_size),
                   trans_id)

    # --- h: SR-IOV VF association ---------------------------------------------------
    def vf_capable(self) -> bool:
        """Whether the guest can team with a VF (h.1): NVSP 4 or later, the sriov
        capability in its NDIS config, RNDIS initialized."""
        cfg = self.ndis_config
        return (not self.closed and self.version is not None and self.version >= N.VERSION_4
                and cfg is not None and bool(cfg[1] & N.CAP_SRIOV)
                and self.rndis_state == "initialized")

    def offer_vf(self, serial: int) -> bool:
        """h.2 step 1: SEND_VF_ASSOCIATION {1, serial}, completion requested with the
        fixed transaction id (a completion is taken, none is awaited). False when the
        guest cannot team with a VF."""
        if not self.vf_capable() or not 0 <= serial < 1 << 32:
            return False
        self.vf_serial = serial
        self._host_inband(N.nvsp_vf_association(True, serial, size=self.msg_size),
                          N.VF_ASSOCIATION_TRANS_ID)
        return True

    def withdraw_vf(self) -> None:
        """h.2 step 5: the data path back to synthetic first (the backend moves the
        filters back, then the guest is told with SWITCH_DATA_PATH), then
        SEND_VF_ASSOCIATION {0, serial}."""
        if self.closed or self.vf_serial is None:
            return
        if self.datapath == N.DATAPATH_VF:
            self._set_datapath(N.DATAPATH_SYNTHETIC)
            self.datapath = N.DATAPATH_SYNTHETIC     # the VF is going: synthetic regardless
            self._host_inband(N.nvsp_switch_data_path(N.DATAPATH_SYNTHETIC,
                                                      size=self.msg_size),
                              N.SWITCH_DATA_PATH_TRANS_ID)
        self._host_inband(N.nvsp_vf_association(False, self.vf_serial, size=self.msg_size),
                          N.VF_ASSOCIATION_TRANS_ID)
        self.vf_serial = None

    def _host_inband(self, msg: bytes, trans_id: int) -> None:
        try:
            self._send(VM_PKT_DATA_INBAND, msg, trans_id,
                       VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED)
        except RingError as e:
            self._violation("corrupt ring", str(e))
        finally:
            self._kick()

    @staticmethod
    def drop_data(channel: "NetvspChannel", data: TxData, trans_id: int | None) -> None:
        """The default data handler until a data path is attached: complete the
        packet and count it dropped."""
        channel._count(channel.dropped, "data path not attached")
        if trans_id is not None:
            channel.complete(trans_id, N.STATUS_SUCCESS)

    # ------------------------------------------------------------------ ring loop
    def _poll(self, limit: int = MAX_BATCH) -> int:
        if not self._flush():
            return 0                             # ring full: read nothing (back-pressure)
        ring, handled = self.in_ring, 0
        while True:
            ring.begin_read()                    # a.5.5: no signals while draining
            while handled < limit and not self.closed:
                pkt = ring.read_packet()
                if pkt is None:
                    break
                self._packet(pkt)
                handled += 1
                if self._out:
                    break                        # our ring is full: stop reading
            if self.closed:
                return handled
            if ring.commit_read():               # a.5.4: the guest waits for room
                self._signal = True
            more = ring.end_read()
            if not more or self._out or handled >= limit:
                return handled

    def _kick(self) -> None:
        if self._signal and not self.closed and self.ch.interrupt is not None:
            self.ch.interrupt.ring()
        self._signal = False

    # ------------------------------------------------------------------ outgoing
    def _send(self, ptype: int, payload: bytes, trans_id: int, flags: int = 0) -> None:
        # (for in-band packets the last slot carries the packet flags)
        self._out.append((ptype, payload, trans_id, None, flags))
        self._flush()

    def _flush(self) -> bool:
        """Write what waits, in order. False while the ring has no room (then
        pending_send_sz asks the guest to signal when it has, a.4.2)."""
        self._fill_backlog()
        while self._out:
            ptype, payload, trans_id, idx, nbytes = self._out[0]
            if ptype == VM_PKT_DATA_USING_XFER_PAGES:
                ok, need = self._write_xfer(payload, trans_id, idx, nbytes)
            else:
                ok, sig = self.out_ring.write_packet(ptype, payload, trans_id, nbytes)
                self._signal |= sig
                need = int(inband_footprint(len(payload)))
            if not ok:
                if self.out_ring.set_pending(need):
                    continue                     # the guest made room meanwhile
                self._blocked = True
                return False
            self._out.popleft()
            if idx is not None:
                self._inflight[trans_id] = idx
        if self._blocked:
            self.out_ring.clear_pending()
            self._blocked = False
        return True

    def _write_xfer(self, payload: bytes, trans_id: int, idx: int,
                    nbytes: int) -> tuple[bool, int]:
        """A transfer-page packet (b.5, e.2) whose one range is the first
        ``nbytes`` of sub-allocation ``idx``; ``payload`` is its NVSP message."""
        ring, rb = self.out_ring, self.recv_buf
        src = np.frombuffer(payload, dtype=np.uint8)
        need = int(xfer_footprint(1, len(src)))
        start = ring_write_begin(ring.mem, ring.base, ring.datasize, need)
        if start == E_FULL:
            return False, need
        if start < 0:
            raise RingError(start, "write_begin")
        ranges = np.array([[nbytes, idx * rb.sub_alloc_size]], dtype=np.int64)
        end = build_xfer_page(ring.mem, ring.base, ring.datasize, start, rb.id, _FLAG_COMPLETION,
                              _i64(trans_id), ranges, 1, src, 0, len(src))
        if end < 0:
            raise RingError(end, "build_xfer_page")
        sig = ring_write_commit(ring.mem, ring.base, ring.datasize, start, end)
        if sig < 0:
            raise RingError(sig, "write_commit")
        self._signal |= bool(sig)
        return True, need

    def _reply(self, msg: bytes) -> None:
        """Queue an RNDIS message for the guest (e.2: host -> guest)."""
        if self._backlog_bytes + len(msg) > MAX_BACKLOG:
            self._count(self.dropped, "control reply backlog full")
            return
        self._backlog.append(msg)
        self._backlog_bytes += len(msg)

    def _fill_backlog(self) -> None:
        """Give queued RNDIS replies a free control sub-allocation each: write the
        message there and queue the transfer-page packet (trans_id = the
        sub-allocation index, as OpenVMM)."""
        rb = self.recv_buf
        while self._backlog and rb is not None:
            msg = self._backlog[0]
            if len(msg) > rb.sub_alloc_size - N.RX_SUBALLOC_TAIL:
                self._backlog.popleft()
                self._backlog_bytes -= len(msg)
                self._count(self.dropped, "control reply larger than a sub-allocation")
                continue
            idx = rb.alloc()
            if idx is None:
                return                           # wait for the guest's completions
            self._backlog.popleft()
            self._backlog_bytes -= len(msg)
            rb.write(idx * rb.sub_alloc_size, msg)
            nvsp_msg = N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL, size=self.msg_size)
            self._out.append((VM_PKT_DATA_USING_XFER_PAGES, nvsp_msg, idx, idx, len(msg)))

    # ------------------------------------------------------------------ errors
    def _count(self, counter: collections.Counter, key: str) -> None:
        """Count on the channel and on the device (which outlives it)."""
        counter[key] += 1
        if counter is self.dropped:
            self.device.dropped[key] += 1
        elif counter is self.violations:
            self.device.violations[key] += 1

    def _violation(self, key: str, detail: str = "") -> None:
        if self.closed:
            return
        self._count(self.violations, key)
        log.warning("NetVSP channel %d: protocol violation: %s%s; closing the channel",
                    self.relid, key, f" ({detail})" if detail else "")
        self.shutdown()
        self.device._close_channel(self, key)

    def shutdown(self) -> None:
        """Stop using the channel and everything the guest granted with it."""
        self.closed = True
        self.recv_buf = self.send_buf = None
        self._out.clear()
        self._backlog.clear()
        self._backlog_bytes = 0
        self._inflight.clear()

    # ------------------------------------------------------------------ packets
    def _packet(self, pkt) -> None:
        want = bool(pkt.flags & _FLAG_COMPLETION)
        try:
            if pkt.type == VM_PKT_COMP:
                self._completion(pkt)
                return
            if pkt.type == VM_PKT_DATA_USING_XFER_PAGES:
                raise _Violation("transfer-page packet from the guest")   # b.2: host -> guest
            payload = pkt.payload
            if len(payload) < N.NVSP_HEADER_SIZE:
                raise _Drop("NVSP message shorter than its type")
            mtype = struct.unpack_from("<I", payload, 0)[0]
            if self.state == "uninit" and mtype != N.MSG_INIT:
                raise _Violation("message before INIT", f"type {mtype}")
            if mtype not in GUEST_MESSAGES:
                raise _Violation("NVSP message a guest does not send", f"type {mtype}")
            need = N.MIN_VERSION_FOR_TYPE.get(mtype)
            if need is not None and self.version is not None and self.version < need:
                raise _Violation("NVSP message above the negotiated version",
                                 f"type {mtype} at {self.version:#x}")
            if self.state == "revoked" and mtype not in (N.MSG_REVOKE_RECV_BUF,
                                                         N.MSG_REVOKE_SEND_BUF):
                raise _Drop("message after a buffer was revoked")
            if pkt.type == VM_PKT_DATA_USING_GPA_DIRECT and mtype != N.MSG_SEND_RNDIS_PKT:
                raise _Drop("GPA-direct packet without SEND_RNDIS_PKT")
            try:
                _, m = N.decode_message(payload)
            except ValueError as e:
                raise _Drop("NVSP message too short", str(e),
                            N.STATUS_INVALID_RNDIS_PKT if mtype == N.MSG_SEND_RNDIS_PKT
                            else None) from None
            self._handlers[mtype](self, pkt, m, want)
        except _Drop as d:
            self._count(self.dropped, d.key)
            log.debug("NetVSP channel %d: dropped a packet: %s %s", self.relid, d.key, d.detail)
            if d.status is not None and want and not self.closed:
                self.complete(pkt.trans_id, d.status)

    def _complete_empty(self, pkt, want: bool) -> None:
        """d.5: an empty completion, only if the guest asked (UEFI does)."""
        if want:
            self._send(VM_PKT_COMP, b"", pkt.trans_id)

    def _completion(self, pkt) -> None:
        """The guest completing one of our transfer-page packets (f.1)."""
        if self.state == "revoked":
            return                               # the buffer is gone; nothing to free
        tid = pkt.trans_id
        if tid in (N.VF_ASSOCIATION_TRANS_ID, N.SWITCH_DATA_PATH_TRANS_ID):
            return                               # h.1: taken if it comes, never awaited
        status = None
        if len(pkt.payload) >= N.SEND_RNDIS_PKT_COMPLETE.itemsize:
            mtype, status = struct.unpack_from("<II", pkt.payload, 0)
            if mtype != N.MSG_SEND_RNDIS_PKT_COMPLETE:
                status = None
        idx = self._inflight.pop(tid, None)
        if idx is None:
            h = self.rx_completion_handler
            if h is not None and h(self, tid, status):
                return
            raise _Violation("completion for an unknown transaction id", f"{tid:#x}")
        if self.recv_buf is not None:
            self.recv_buf.free.add(idx)
        if status is None:
            self._count(self.dropped, "malformed receive completion")
        elif status != N.STATUS_SUCCESS:
            self.stats["control message refused by the guest"] += 1
        self._flush()

    # --- d.5 handshake -------------------------------------------------------------
    def _init(self, pkt, m, want) -> None:
        if self.state != "uninit":
            raise _Violation("INIT after the version was negotiated")
        v = int(m["min_protocol_ver"])            # OpenVMM: @4 only, exact match (d.4)
        if v in SUPPORTED_VERSIONS:
            self.version, self.state = v, "init"
            self.msg_size = N.NVSP_PACKET_SIZE_V61 if v == N.VERSION_61 else N.NVSP_PACKET_SIZE_V1
            status = N.STATUS_SUCCESS
        else:
            status = N.STATUS_NONE
        if want:
            ok = status == N.STATUS_SUCCESS
            negotiated = N.VERSION_1 if ok and v == N.VERSION_1 else N.VERSION_INVALID
            self._send(VM_PKT_COMP, N.nvsp_init_complete(status, negotiated,
                                                         size=self.msg_size), pkt.trans_id)

    def _ndis_config(self, pkt, m, want) -> None:
        if self.ndis_config is not None:
            raise _Violation("duplicate NDIS_CONFIG")
        mtu, caps = int(m["mtu"]), int(m["capability"])
        self.ndis_config = (mtu, caps)
        # d.5: OpenVMM takes the guest's MTU only within [1514, 9216]; the
        # device's MTU caps it (OID_GEN_MAXIMUM_FRAME_SIZE then lowers Linux's).
        frame = mtu if N.MTU_DEFAULT <= mtu <= N.MTU_MAX else N.MTU_DEFAULT
        self.frame_size = min(frame, self.device.mtu + N.ETH_HLEN)
        self._complete_empty(pkt, want)

    def _ndis_version(self, pkt, m, want) -> None:
        if self.ndis_version is not None:
            raise _Violation("duplicate NDIS_VERSION")
        self.ndis_version = (int(m["ndis_major_ver"]), int(m["ndis_minor_ver"]))
        self._complete_empty(pkt, want)

    def _buffer_gpadl(self, handle: int, other: GuestBuffer | None):
        """The complete GPADL a buffer message names, or None: it must exist,
        belong to this channel and be neither the ring nor the other buffer."""
        g = self.device.server.gpadl(handle)
        if g is None or g.child_relid != self.relid or handle == self.ch.ring_gpadl or \
                (other is not None and other.handle == handle):
            return None
        return g

    def _send_recv_buf(self, pkt, m, want) -> None:
        if self.recv_buf is not None:
            raise _Violation("duplicate SEND_RECV_BUF")
        if self.version >= N.VERSION_2 and self.ndis_config is None:
            raise _Violation("SEND_RECV_BUF before NDIS_CONFIG")   # it needs the MTU (d.5)
        g = self._buffer_gpadl(int(m["gpadl_handle"]), self.send_buf)
        sub = N.sub_allocation_size_for_mtu(max(self.frame_size, N.MTU_DEFAULT))
        sections = []
        if g is None:
            self._count(self.dropped, "receive buffer GPADL refused")
        elif g.byte_count // sub < 1:
            self._count(self.dropped, "receive buffer smaller than a sub-allocation")
        else:
            rb = ReceiveBuffer(self.device.memory, g, int(m["id"]), sub)
            self.recv_buf = rb
            # f.1: one section at offset 0, as Linux requires.
            sections = [(0, sub, rb.count, sub * rb.count)]
        if want:
            status = N.STATUS_SUCCESS if sections else N.STATUS_FAIL
            self._send(VM_PKT_COMP, N.nvsp_send_receive_buffer_complete(
                status, sections, size=self.msg_size), pkt.trans_id)

    def _send_send_buf(self, pkt, m, want) -> None:
        if self.send_buf is not None:
            raise _Violation("duplicate SEND_SEND_BUF")
        g = self._buffer_gpadl(int(m["gpadl_handle"]), self.recv_buf)
        ok = False
        if g is None:
            self._count(self.dropped, "send buffer GPADL refused")
        elif g.byte_count < N.SEND_SECTION_SIZE:
            self._count(self.dropped, "send buffer smaller than a section")
        else:
            self.send_buf = SendBuffer(self.device.memory, g, int(m["id"]))
            ok = True
        if want:
            self._send(VM_PKT_COMP, N.nvsp_send_send_buffer_complete(
                N.STATUS_SUCCESS if ok else N.STATUS_FAIL,
                N.SEND_SECTION_SIZE if ok else 0, size=self.msg_size), pkt.trans_id)

    def _revoke_recv_buf(self, pkt, m, want) -> None:
        rb = self.recv_buf
        if rb is None or int(m["id"]) != rb.id:
            raise _Violation("REVOKE_RECV_BUF of a buffer not in use", f"id {int(m['id']):#x}")
        # d.5: revoking ends channel processing; nothing more goes to the guest.
        self.recv_buf = None
        self._backlog.clear()
        self._backlog_bytes = 0
        self._inflight.clear()
        self._out = collections.deque(p for p in self._out if p[3] is None)
        self.state = "revoked"

    def _revoke_send_buf(self, pkt, m, want) -> None:
        sb = self.send_buf
        if sb is None or int(m["id"]) != sb.id:
            raise _Violation("REVOKE_SEND_BUF of a buffer not in use", f"id {int(m['id']):#x}")
        self.send_buf = None
        self.state = "revoked"

    # --- other NVSP requests (d.3) -----------------------------------------------------
    def _switch_data_path(self, pkt, m, want) -> None:
        """h.2 steps 3-4: the backend moves the data path (the NIC's filters), then the
        request is completed, empty; to the VF only while one is associated, and a
        backend that cannot leaves it synthetic."""
        path = int(m["active_datapath"])
        if path not in (N.DATAPATH_SYNTHETIC, N.DATAPATH_VF):
            raise _Drop("SWITCH_DATA_PATH to an unknown path")
        if path == N.DATAPATH_VF and self.vf_serial is None:
            self._count(self.dropped, "SWITCH_DATA_PATH to a VF that is not associated")
        elif path != self.datapath:
            self._set_datapath(path)
        self._complete_empty(pkt, want)

    def _set_datapath(self, path: int) -> None:
        backend = self.device.on_data_path
        ok = True if backend is None else bool(backend(self, path))
        if ok:
            self.datapath = path
        else:
            self.stats["data path switch refused by the backend"] += 1

    def _oid_query_ex(self, pkt, m, want) -> None:
        if want:                                 # as OpenVMM (d.4): NOT_SUPPORTED, 0 bytes
            self._send(VM_PKT_COMP, N.nvsp_oid_query_ex_complete(R.STATUS_NOT_SUPPORTED, 0,
                                                                 size=self.msg_size),
                       pkt.trans_id)

    def _subchannel(self, pkt, m, want) -> None:
        """g.1 as OpenVMM takes it: ALLOCATE of fewer subchannels than the NIC's
        queues, with a receive buffer holding one sub-allocation per queue beyond
        the 16 kept aside, once; the host then offers them (c.9)."""
        n, op, rb = int(m["num_subchannels"]), int(m["op"]), self.recv_buf
        ok = (op == N.SUBCHANNEL_OP_ALLOCATE and 1 <= n < self.device.max_queues
              and rb is not None and rb.count >= RSS_RESERVED_SUBALLOCS + n + 1
              and not self.device.sub_offers and self.state in ("init", "ready"))
        if want:
            self._send(VM_PKT_COMP, N.nvsp_subchannel_complete(
                N.STATUS_SUCCESS if ok else N.STATUS_FAIL, n if ok else 0,
                size=self.msg_size), pkt.trans_id)
        if ok:
            self.device.offer_subchannels(n)
        else:
            self._count(self.dropped, "subchannel request refused")

    def send_indirection_table(self, channels: int) -> None:
        """NVSP v5 SEND_INDIRECTION_TABLE (g.2) as OpenVMM sends it: 16 entries
        i % channels, the table right after the 12-byte header."""
        self._send(VM_PKT_DATA_INBAND, N.nvsp_send_indirection_table(
            [i % channels for i in range(N.VRSS_SEND_TAB_SIZE)]), 0)

    # --- SEND_RNDIS_PKT (e.2) --------------------------------------------------------------
    def _rndis_packet(self, pkt, m, want) -> None:
        if self.state == "init":
            # d.5: the first RNDIS packet completes the handshake if everything but
            # the (optional) send buffer is there.
            if self.recv_buf is None or self.ndis_version is None or \
                    (self.version >= N.VERSION_2 and self.ndis_config is None):
                raise _Violation("RNDIS before the buffers")
            self.state = "ready"
        bad = N.STATUS_INVALID_RNDIS_PKT
        ctype = int(m["channel_type"])
        idx, size = int(m["send_buf_section_index"]), int(m["send_buf_section_size"])
        if ctype not in (N.CHANNEL_TYPE_DATA, N.CHANNEL_TYPE_CONTROL):
            raise _Drop("unknown RNDIS channel type", str(ctype), bad)
        section = -1
        if idx != N.SECTION_INDEX_NONE:
            sb = self.send_buf
            if sb is None:
                raise _Drop("send section without a send buffer", "", bad)
            if idx >= sb.count:
                raise _Drop("send section index out of range", f"{idx} of {sb.count}", bad)
            if size == 0 or size > sb.section_size:
                raise _Drop("send section size out of range", str(size), bad)
            section = idx
        else:
            size = 0
        pieces = None
        if pkt.type == VM_PKT_DATA_USING_GPA_DIRECT:
            r = self.in_ring
            n = int(parse_gpa_direct(r.mem, r.base, r.datasize, pkt.desc, MAX_GPA_RANGES,
                                     self._pieces))
            if n < 0:
                raise _Drop("bad GPA-direct ranges", PACKET_ERRORS.get(n, str(n)), bad)
            pieces = self._pieces[:n].copy()
        if section < 0 and (pieces is None or not len(pieces)):
            raise _Drop("SEND_RNDIS_PKT without RNDIS bytes", "", bad)
        tid = pkt.trans_id if want else None
        if ctype == N.CHANNEL_TYPE_DATA:
            if self.rndis_state != "initialized":
                self._count(self.dropped, f"data while RNDIS is {self.rndis_state}")
                if tid is not None:
                    self.complete(tid, N.STATUS_SUCCESS)
                return
            self.data_handler(self, TxData(section, size, pieces), tid)
            return
        total = size + (int(pieces[:, 1].sum()) if pieces is not None else 0)
        if total > MAX_CONTROL_MESSAGE:
            raise _Drop("control message too long", str(total), bad)
        buf = self.send_buf.read(section * N.SEND_SECTION_SIZE, size) if section >= 0 else b""
        if pieces is not None:
            buf += b"".join(self.device.memory.read(int(g), int(ln)) for g, ln, _ in pieces)
        try:
            msgs = R.decode_batch(buf)
        except ValueError as e:
            raise _Drop("malformed RNDIS control message", str(e), bad) from None
        status = N.STATUS_SUCCESS
        for msg in msgs:
            if not self._rndis_control(msg, buf):
                status = bad
        if tid is not None:
            self.complete(tid, status)

    # --- RNDIS control (e.1, e.3) ----------------------------------------------------------
    def _rndis_control(self, msg, buf: bytes) -> bool:
        """Answer one RNDIS control message; False if it is not one a host takes."""
        if isinstance(msg, R.Packet):
            self._count(self.dropped, "data message on the control channel")
            return False
        t, f = msg.msg_type, msg.fields
        info = buf[msg.buf_start:msg.buf_start + msg.buf_len]
        after = []
        if t == R.MSG_INIT:
            self.rndis_state = "initialized"
            self._reply(R.rndis_initialize_complete(int(f["req_id"])))
        elif t == R.MSG_QUERY:
            status, data = self._query(int(f["oid"]), info)
            self._reply(R.rndis_query_complete(int(f["req_id"]), status, data))
        elif t == R.MSG_SET:
            status = self._set(int(f["oid"]), info, after)
            self._reply(R.rndis_set_complete(int(f["req_id"]), status))
        elif t == R.MSG_KEEPALIVE:
            self._reply(R.rndis_keepalive_complete(int(f["req_id"])))
        elif t == R.MSG_RESET:
            self._reply(R.rndis_reset_complete(R.STATUS_SUCCESS, 0))
        elif t == R.MSG_HALT:
            self.rndis_state = "halted"          # no response (e.1)
        elif t == R.MSG_SET_EX:
            # OpenVMM: not implemented.
            self._reply(encode(R.SET_EX_CMPLT, msg_type=R.MSG_SET_EX_C,
                               msg_len=R.SET_EX_CMPLT.itemsize, req_id=int(f["req_id"]),
                               status=R.STATUS_NOT_SUPPORTED))
        else:
            self._count(self.dropped, "RNDIS message a host does not take")
            return False
        for m in after:
            self._reply(m)
        self._flush()
        return True

    def _query(self, oid: int, info: bytes) -> tuple[int, bytes]:
        """e.3 / e.7: the answer to QUERY ``oid`` as (RNDIS status, info buffer)."""
        d = self.device
        frame = self.frame_size
        zero = _u32(0)
        u16 = struct.pack("<H", DRIVER_VERSION)
        simple = {
            R.OID_GEN_HARDWARE_STATUS: zero,                         # ready
            R.OID_GEN_MEDIA_SUPPORTED: _u32(R.MEDIUM_802_3),
            R.OID_GEN_MEDIA_IN_USE: _u32(R.MEDIUM_802_3),
            R.OID_GEN_MAXIMUM_LOOKAHEAD: _u32(frame - N.ETH_HLEN),
            R.OID_GEN_CURRENT_LOOKAHEAD: _u32(frame - N.ETH_HLEN),
            R.OID_GEN_MAXIMUM_FRAME_SIZE: _u32(frame - N.ETH_HLEN),
            R.OID_GEN_MAXIMUM_TOTAL_SIZE: _u32(frame),
            R.OID_GEN_TRANSMIT_BLOCK_SIZE: _u32(frame),
            R.OID_GEN_RECEIVE_BLOCK_SIZE: _u32(frame),
            R.OID_GEN_LINK_SPEED: _u32(LINK_SPEED_BPS // R.LINK_SPEED_UNIT_BPS),
            R.OID_GEN_MAX_LINK_SPEED: struct.pack("<QQ", LINK_SPEED_BPS, LINK_SPEED_BPS),
            R.OID_GEN_TRANSMIT_BUFFER_SPACE: _u32(BUFFER_SPACE),
            R.OID_GEN_RECEIVE_BUFFER_SPACE: _u32(BUFFER_SPACE),
            R.OID_GEN_VENDOR_ID: _u32(VENDOR_ID),
            R.OID_GEN_VENDOR_DESCRIPTION: VENDOR_DESCRIPTION,
            R.OID_GEN_DRIVER_VERSION: u16,
            R.OID_GEN_VENDOR_DRIVER_VERSION: u16,
            R.OID_GEN_MAC_OPTIONS: _u32(MAC_OPTIONS),
            R.OID_GEN_MAXIMUM_SEND_PACKETS: _u32(MAXIMUM_SEND_PACKETS),
            R.OID_GEN_CURRENT_PACKET_FILTER: _u32(self.packet_filter),
            R.OID_GEN_MEDIA_CONNECT_STATUS: _u32(R.MEDIA_STATE_CONNECTED if d.link_up
                                                 else R.MEDIA_STATE_DISCONNECTED),
            R.OID_802_3_PERMANENT_ADDRESS: d.mac_bytes,
            R.OID_802_3_CURRENT_ADDRESS: self.mac,
            R.OID_802_3_MAXIMUM_LIST_SIZE: _u32(MULTICAST_LIST_MAX),
            R.OID_802_3_MULTICAST_LIST: b"".join(self.multicast),
            R.OID_GEN_FRIENDLY_NAME: FRIENDLY_NAME.encode("utf-16-le").ljust(
                FRIENDLY_NAME_BYTES, b"\0"),
            R.OID_GEN_BYTES_RCV: struct.pack("<Q", 0),
            R.OID_GEN_BYTES_XMIT: struct.pack("<Q", 0),
            R.OID_GEN_XMIT_ERROR: zero, R.OID_GEN_RCV_ERROR: zero, R.OID_GEN_RCV_NO_BUFFER: zero,
            R.OID_802_3_RCV_ERROR_ALIGNMENT: zero, R.OID_802_3_XMIT_ONE_COLLISION: zero,
            R.OID_802_3_XMIT_MORE_COLLISIONS: zero,
            R.OID_GEN_RECEIVE_SCALE_CAPABILITIES: rss_capabilities(),
            R.OID_TCP_OFFLOAD_CURRENT_CONFIG: ndis_offload(self.offload),
        }
        if oid in simple:
            return R.STATUS_SUCCESS, simple[oid]
        if oid == R.OID_GEN_SUPPORTED_LIST:
            return R.STATUS_SUCCESS, np.asarray(sorted(SUPPORTED_OIDS), dtype=U32).tobytes()
        if oid == R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES:
            # e.3 step 5: answer the revision the guest's input header asks for.
            rev = R.NDIS_OFFLOAD_REVISION_3
            if len(info) >= 4 and info[0] == R.OBJTYPE_OFFLOAD and \
                    R.NDIS_OFFLOAD_REVISION_1 <= info[1] <= R.NDIS_OFFLOAD_REVISION_3:
                rev = info[1]
            return R.STATUS_SUCCESS, ndis_offload(_offload_state(), rev)
        return R.STATUS_NOT_SUPPORTED, b""

    def _set(self, oid: int, info: bytes, after: list) -> int:
        """e.3 / e.7: apply SET ``oid``; returns the RNDIS status. Indications to
        send after the SET_CMPLT go into ``after``."""
        if oid == R.OID_GEN_CURRENT_PACKET_FILTER:
            if len(info) < 4:
                return R.STATUS_INVALID_DATA
            self.packet_filter = struct.unpack_from("<I", info)[0]
            return R.STATUS_SUCCESS
        if oid == R.OID_TCP_OFFLOAD_PARAMETERS:
            status = self._set_offload(info)
            if status == R.STATUS_SUCCESS:
                # OpenVMM then indicates the new configuration (e.6).
                after.append(R.rndis_indicate_status(R.STATUS_TASK_OFFLOAD_CURRENT_CONFIG,
                                                     ndis_offload(self.offload)))
            return status
        if oid == R.OID_GEN_RECEIVE_SCALE_PARAMETERS:
            return self._set_rss(info)
        if oid == R.OID_GEN_RNDIS_CONFIG_PARAMETER:
            return self._set_config_parameter(info)
        if oid == R.OID_802_3_MULTICAST_LIST:
            if len(info) % 6:
                return R.STATUS_INVALID_DATA
            if len(info) // 6 > MULTICAST_LIST_MAX:
                return R.STATUS_MULTICAST_FULL
            self.multicast = [info[i:i + 6] for i in range(0, len(info), 6)]
            return R.STATUS_SUCCESS
        if oid == R.OID_GEN_NETWORK_LAYER_ADDRESSES:
            return R.STATUS_SUCCESS              # accepted and ignored (e.7)
        return R.STATUS_NOT_SUPPORTED

    def _set_offload(self, info: bytes) -> int:
        """NDIS_OFFLOAD_PARAMETERS (e.6), as OpenVMM reads it: the 20-byte
        revision-1 prefix, object type DEFAULT, size >= 20 and <= the bytes sent;
        an LSOv1 enable is refused, RSC fields are ignored."""
        n = R.NDIS_OFFLOAD_PARAMETERS_SIZE_REV1
        if len(info) < n:
            return R.STATUS_INVALID_DATA
        p = decode_struct(R.NDIS_OFFLOAD_PARAMETERS, bytes(info[:n]).ljust(
            R.NDIS_OFFLOAD_PARAMETERS.itemsize, b"\0"))
        if int(p["hdr_type"]) != R.OBJTYPE_DEFAULT or not n <= int(p["hdr_size"]) <= len(info):
            return R.STATUS_INVALID_DATA
        if int(p["lso_v1"]) == R.OFFLOAD_PARAMETERS_LSO_ENABLED:
            return R.STATUS_INVALID_DATA
        csum = {"ip4": int(p["ip_v4_csum"]), "tcp4": int(p["tcp_ip_v4_csum"]),
                "udp4": int(p["udp_ip_v4_csum"]), "tcp6": int(p["tcp_ip_v6_csum"]),
                "udp6": int(p["udp_ip_v6_csum"])}
        lso = {"lso4": int(p["lso_v2_ipv4"]), "lso6": int(p["lso_v2_ipv6"])}
        if any(v > R.OFFLOAD_PARAMETERS_TX_RX_ENABLED for v in csum.values()) or \
                any(v > R.OFFLOAD_PARAMETERS_LSO_ENABLED for v in lso.values()):
            return R.STATUS_INVALID_DATA
        # 1 off, 2 TX only, 3 RX only, 4 both; 0 leaves it (e.6).
        table = {1: [False, False], 2: [True, False], 3: [False, True], 4: [True, True]}
        for k, v in csum.items():
            if v:
                self.offload[k] = list(table[v])
        for k, v in lso.items():
            if v:
                self.offload[k] = v == R.OFFLOAD_PARAMETERS_LSO_ENABLED
        return R.STATUS_SUCCESS

    def _set_rss(self, info: bytes) -> int:
        """g.3 as OpenVMM checks it: DISABLE_RSS or hash function 0 turns RSS off;
        otherwise a 40-byte key, a non-empty table of whole u32 entries each
        below the queue count. The header is not checked (vmswitch does not)."""
        try:
            p = R.decode_rss_parameters(info)
        except ValueError:
            return R.STATUS_INVALID_DATA
        flags, hashinfo = int(p.fields["flags"]), int(p.fields["hashinfo"])
        if flags & R.RSS_FLAG_DISABLE_RSS or not hashinfo & R.HASH_FUNC_MASK:
            self.rss = None
            return R.STATUS_SUCCESS
        if len(p.key) != R.HASH_KEYLEN or not p.table or \
                any(q >= self.device.max_queues for q in p.table):
            return R.STATUS_INVALID_DATA
        try:
            check_hash_types(hashinfo)
        except ValueError:
            return R.STATUS_INVALID_DATA
        # A shorter table is repeated to the adapter's 128 entries (OpenVMM, g.3).
        table = [p.table[i % len(p.table)] for i in range(R.ITAB_NUM)]
        self.rss = {"hashinfo": hashinfo, "table": list(p.table), "key": p.key,
                    "ktable": key_table(p.key), "itab": np.array(table, dtype=np.int64)}
        return R.STATUS_SUCCESS

    def _set_config_parameter(self, info: bytes) -> int:
        """OID_GEN_RNDIS_CONFIG_PARAMETER (e.3 step 10, e.7): name and value lie
        inside the info buffer. "NetworkAddress" (12 hex digits, unicast) sets the
        current MAC; the offload keywords of e.7 switch offloads; other names are
        accepted and ignored."""
        hdr = R.CONFIG_PARAMETER_INFO
        if len(info) < hdr.itemsize:
            return R.STATUS_INVALID_DATA
        c = decode_struct(hdr, bytes(info[:hdr.itemsize]))

        def field(off, ln):
            off, ln = int(off), int(ln)
            if off < hdr.itemsize or off > len(info) or ln > len(info) - off or ln % 2:
                return None
            try:
                return bytes(info[off:off + ln]).decode("utf-16-le").rstrip("\0")
            except UnicodeDecodeError:
                return None
        name = field(c["parameter_name_offset"], c["parameter_name_length"])
        if name is None:
            return R.STATUS_INVALID_DATA
        vo, vl = int(c["parameter_value_offset"]), int(c["parameter_value_length"])
        if int(c["parameter_type"]) == R.CONFIG_PARAM_TYPE_STRING:
            value = field(vo, vl)
        elif vo >= hdr.itemsize and vl == 4 and vo <= len(info) - 4:
            value = str(struct.unpack_from("<I", info, vo)[0])     # integer parameter
        else:
            value = None
        if value is None:
            return R.STATUS_INVALID_DATA
        if name == "NetworkAddress":
            digits = value.replace("-", "").replace(":", "")
            if len(digits) != 12 or any(ch not in "0123456789abcdefABCDEF" for ch in digits):
                return R.STATUS_INVALID_DATA
            mac = bytes.fromhex(digits)
            if mac[0] & 1 or mac == bytes(6):
                return R.STATUS_INVALID_DATA     # a NIC's address is unicast
            self.mac = mac
            return R.STATUS_SUCCESS
        if name in _CSUM_KEYWORDS or name in _LSO_KEYWORDS:
            if not (value.isascii() and value.isdigit()) or int(value) > 3:
                return R.STATUS_INVALID_DATA
            v = int(value)
            if name in _CSUM_KEYWORDS:
                self.offload[_CSUM_KEYWORDS[name]] = [bool(v & 1), bool(v & 2)]
            else:
                self.offload[_LSO_KEYWORDS[name]] = bool(v)
            return R.STATUS_SUCCESS
        return R.STATUS_SUCCESS

    _handlers = {
        N.MSG_INIT: _init, N.MSG_SEND_NDIS_CONFIG: _ndis_config,
        N.MSG_SEND_NDIS_VERSION: _ndis_version, N.MSG_SEND_RECV_BUF: _send_recv_buf,
        N.MSG_SEND_SEND_BUF: _send_send_buf, N.MSG_REVOKE_RECV_BUF: _revoke_recv_buf,
        N.MSG_REVOKE_SEND_BUF: _revoke_send_buf, N.MSG_SEND_RNDIS_PKT: _rndis_packet,
        N.MSG_SWITCH_DATA_PATH: _switch_data_path, N.MSG_OID_QUERY_EX: _oid_query_ex,
        N.MSG_SUBCHANNEL: _subchannel,
    }


# Every OID a QUERY is answered for, and the SETs taken (OID_GEN_SUPPORTED_LIST).
SUPPORTED_OIDS = (
    R.OID_GEN_SUPPORTED_LIST, R.OID_GEN_HARDWARE_STATUS, R.OID_GEN_MEDIA_SUPPORTED,
    R.OID_GEN_MEDIA_IN_USE, R.OID_GEN_MAXIMUM_LOOKAHEAD, R.OID_GEN_MAXIMUM_FRAME_SIZE,
    R.OID_GEN_LINK_SPEED, R.OID_GEN_TRANSMIT_BUFFER_SPACE, R.OID_GEN_RECEIVE_BUFFER_SPACE,
    R.OID_GEN_TRANSMIT_BLOCK_SIZE, R.OID_GEN_RECEIVE_BLOCK_SIZE, R.OID_GEN_VENDOR_ID,
    R.OID_GEN_VENDOR_DESCRIPTION, R.OID_GEN_CURRENT_PACKET_FILTER, R.OID_GEN_CURRENT_LOOKAHEAD,
    R.OID_GEN_DRIVER_VERSION, R.OID_GEN_MAXIMUM_TOTAL_SIZE, R.OID_GEN_MAC_OPTIONS,
    R.OID_GEN_MEDIA_CONNECT_STATUS, R.OID_GEN_MAXIMUM_SEND_PACKETS, R.OID_GEN_VENDOR_DRIVER_VERSION,
    R.OID_GEN_NETWORK_LAYER_ADDRESSES, R.OID_GEN_RECEIVE_SCALE_CAPABILITIES,
    R.OID_GEN_RECEIVE_SCALE_PARAMETERS, R.OID_GEN_MAX_LINK_SPEED,
    R.OID_GEN_RNDIS_CONFIG_PARAMETER, R.OID_GEN_XMIT_ERROR, R.OID_GEN_RCV_ERROR,
    R.OID_GEN_RCV_NO_BUFFER, R.OID_GEN_FRIENDLY_NAME, R.OID_GEN_BYTES_RCV, R.OID_GEN_BYTES_XMIT,
    R.OID_802_3_PERMANENT_ADDRESS, R.OID_802_3_CURRENT_ADDRESS, R.OID_802_3_MULTICAST_LIST,
    R.OID_802_3_MAXIMUM_LIST_SIZE, R.OID_802_3_RCV_ERROR_ALIGNMENT, R.OID_802_3_XMIT_ONE_COLLISION,
    R.OID_802_3_XMIT_MORE_COLLISIONS, R.OID_TCP_OFFLOAD_CURRENT_CONFIG, R.OID_TCP_OFFLOAD_PARAMETERS,
    R.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES)


def _shared(name):
    """An attribute a subchannel reads from its primary (writes are ignored: the
    base class initialises them)."""
    return property(lambda self: getattr(self.primary, name), lambda self, v: None)


class NetvspSubchannel(NetvspChannel):
    """A subchannel (c.9, g.1): its own rings and doorbells; NVSP, RNDIS and the
    buffers are the primary channel's. Linux sends on it only data packets and
    the completions of what the host sent on it (d.3): anything else closes it."""

    state = _shared("state")
    version = _shared("version")
    msg_size = _shared("msg_size")
    ndis_config = _shared("ndis_config")
    ndis_version = _shared("ndis_version")
    frame_size = _shared("frame_size")
    recv_buf = _shared("recv_buf")
    send_buf = _shared("send_buf")
    rndis_state = _shared("rndis_state")
    packet_filter = _shared("packet_filter")
    offload = _shared("offload")
    rss = _shared("rss")
    datapath = _shared("datapath")

    def __init__(self, device: "NetvspDevice", ch, primary: NetvspChannel):
        self.primary = primary
        super().__init__(device, ch)
        self.sub_index = ch.sub_index

    def _packet(self, pkt) -> None:
        if pkt.type != VM_PKT_COMP and len(pkt.payload) >= N.NVSP_HEADER_SIZE:
            mtype = struct.unpack_from("<I", pkt.payload, 0)[0]
            if mtype != N.MSG_SEND_RNDIS_PKT:
                self._violation("NVSP control message on a subchannel", f"type {mtype}")
                return
        super()._packet(pkt)

    def _rndis_packet(self, pkt, m, want) -> None:
        if int(m["channel_type"]) != N.CHANNEL_TYPE_DATA:
            raise _Violation("RNDIS control message on a subchannel")
        super()._rndis_packet(pkt, m, want)

    def shutdown(self) -> None:
        self.closed = True
        self._out.clear()
        self._inflight.clear()


class NetvspDevice:
    """One synthetic NIC on the host: the VMBus device behind a network offer.

    ``mac`` is the 48-bit permanent address (an int, most significant byte
    first on the wire); ``mtu`` the largest IP MTU the host takes (the frame
    limit is mtu + 14; a guest asking more is told less through
    OID_GEN_MAXIMUM_FRAME_SIZE, e.3 step 2). ``data_handler``, if set, becomes
    each new channel's data handler."""

    def __init__(self, memory: GuestMemory, server, mac: int, mtu: int = 1500,
                 instance: uuid.UUID | None = None, data_handler=None):
        if not 0 < mac < 1 << 48:
            raise ValueError(f"MAC {mac:#x} is not a 48-bit address")
        mac_bytes = mac.to_bytes(6, "big")
        if mac_bytes[0] & 1:
            raise ValueError(f"MAC {mac_bytes.hex(':')} is a multicast address")
        if not N.ETH_MIN_MTU <= mtu <= N.MTU_MAX - N.ETH_HLEN:
            raise ValueError(f"MTU {mtu}: {N.ETH_MIN_MTU} to {N.MTU_MAX - N.ETH_HLEN}")
        self.memory, self.server = memory, server
        self.mac, self.mac_bytes, self.mtu = mac, mac_bytes, mtu
        self.link_up = True
        self.data_handler = data_handler
        # h: (channel, path) -> bool, the backend moving the NIC's data path; None
        # takes every switch (no VF hardware behind this device)
        self.on_data_path = None
        self.channels: dict[int, NetvspChannel] = {}
        self.violations: collections.Counter = collections.Counter()
        self.dropped: collections.Counter = collections.Counter()
        self.last_close: str | None = None        # why the last channel was closed
        self.lock = threading.RLock()
        self.instance = instance or uuid.uuid5(M.NETVSC_GUID, mac_bytes.hex())
        self.max_queues = MAX_QUEUES
        self.sub_offers: dict[int, object] = {}      # relid -> offered subchannel
        self.subs: dict[int, NetvspSubchannel] = {}  # sub_channel_index -> open subchannel
        self.offer = server.offer(M.NETVSC_GUID, self.instance, self)

    @property
    def channel(self) -> NetvspChannel | None:
        """The open primary channel, if any."""
        return next(iter(self.channels.values()), None)

    def offer_subchannels(self, n: int) -> None:
        """Offer subchannels 1..n of this NIC (c.9): the primary's type and instance."""
        with self.lock:
            for k in range(1, n + 1):
                ch = self.server.offer(M.NETVSC_GUID, self.instance, self, sub_index=k)
                self.sub_offers[ch.relid] = ch

    def _rescind_subchannels(self) -> None:
        for sc in list(self.subs.values()):
            sc.shutdown()
        self.subs.clear()
        for relid in list(self.sub_offers):
            self.server.rescind(relid)
        self.sub_offers.clear()

    @property
    def all_channels(self) -> list[NetvspChannel]:
        """The open primary, then the open subchannels by index."""
        nc = self.channel
        return ([] if nc is None else [nc]) + [self.subs[k] for k in sorted(self.subs)]

    # --- VmbusServer device hooks --------------------------------------------------
    def channel_opened(self, ch) -> None:
        with self.lock:
            if ch.sub_index:
                primary = self.channel
                if primary is None or ch.relid not in self.sub_offers:
                    self.violations["subchannel opened without its primary"] += 1
                    self.server.close_channel(ch, "NetVSP: subchannel without a primary")
                    return
                try:
                    self.subs[ch.sub_index] = NetvspSubchannel(self, ch, primary)
                except RingError as e:
                    self.violations["corrupt ring"] += 1
                    log.warning("NetVSP: subchannel %d rings unusable: %s", ch.relid, e)
                    self.server.close_channel(ch, "NetVSP: corrupt ring")
                    return
                if len(self.subs) == len(self.sub_offers):
                    # every subchannel is open: the send table goes out (g.1); the
                    # primary's ring is the guest's, so a corrupt one closes it
                    try:
                        primary.send_indirection_table(1 + len(self.subs))
                        primary._kick()
                    except RingError as e:
                        primary._violation("corrupt ring", str(e))
                    except Exception:            # a bug must not take the host down
                        log.exception("NetVSP channel %d: internal error", primary.relid)
                        primary._violation("internal error")
                return
            try:
                self.channels[ch.relid] = NetvspChannel(self, ch)
            except RingError as e:
                self.violations["corrupt ring"] += 1
                log.warning("NetVSP: channel %d rings unusable: %s", ch.relid, e)
                self.server.close_channel(ch, "NetVSP: corrupt ring")

    def channel_closed(self, ch) -> None:
        with self.lock:
            if ch.sub_index:
                sc = self.subs.get(ch.sub_index)
                if sc is not None and sc.ch is ch:
                    sc.shutdown()
                    del self.subs[ch.sub_index]
                return
            nc = self.channels.pop(ch.relid, None)
            if nc is not None:
                nc.shutdown()
                self._rescind_subchannels()     # they belong to the primary's session

    def gpadl_teardown(self, ch, handle: int) -> None:
        """A GPADL of this device's channel goes away. Linux revokes its buffers
        first (d.5), so read what is in the ring before judging."""
        with self.lock:
            nc = self.channels.get(ch.relid)
            if nc is None:
                return
            nc.poll()
            for buf in (nc.recv_buf, nc.send_buf):
                if buf is not None and buf.handle == handle and not nc.closed:
                    nc._violation("buffer GPADL torn down while in use", f"{handle:#x}")

    def _close_channel(self, nc: NetvspChannel, key: str) -> None:
        self.last_close = key
        if isinstance(nc, NetvspSubchannel):
            self.subs.pop(nc.sub_index, None)
        else:
            self.channels.pop(nc.relid, None)
            self._rescind_subchannels()
        self.server.close_channel(nc.ch, f"NetVSP: {key}")

    # --- the host's loop --------------------------------------------------------------
    def fds(self) -> list[int]:
        """The guests' doorbells to wait on (then call poll)."""
        with self.lock:
            return [nc.ch.signal.fd for nc in self.all_channels if nc.ch.signal is not None]

    def poll(self) -> int:
        with self.lock:
            return sum(nc.poll() for nc in self.all_channels)

    def offer_vf(self, serial: int) -> bool:
        """Associate a VF (h.2 step 1) on the primary channel; False when no open
        channel's guest can team with one."""
        with self.lock:
            return any(nc.offer_vf(serial) for nc in list(self.channels.values()))

    def withdraw_vf(self) -> None:
        """The VF goes (h.2 step 5): data path to synthetic first, then the association."""
        with self.lock:
            for nc in list(self.channels.values()):
                nc.withdraw_vf()

    @property
    def datapath(self) -> int:
        with self.lock:
            return max((nc.datapath for nc in self.channels.values()),
                       default=N.DATAPATH_SYNTHETIC)

    def indicate_link(self, up: bool) -> None:
        """Link up or down (e.8): the answer to MEDIA_CONNECT_STATUS from now on,
        and an indication to a guest that initialized RNDIS. Unlike OpenVMM no
        5 s delay is put between flaps; Linux rate-limits them itself."""
        with self.lock:
            self.link_up = bool(up)
            for nc in list(self.channels.values()):
                nc.indicate_link(self.link_up)
