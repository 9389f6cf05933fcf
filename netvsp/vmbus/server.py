"""The host's VMBus server: the control plane of one partition (vmbus_netvsp.md c).

It answers the guest's control messages on the partition's SynIC message port:
version negotiation (c.4), offers (c.5), GPADLs (c.6), open and close (c.7),
rescind, release and unload (c.8); subchannels are offers with an index (c.9).
Devices (NetVSP) register offers and are told when their channel opens, with the
ring geometry in guest RAM and the channel's two eventfds (the guest's signal to
the host, and the host's interrupt to the guest), which the server also hands to
the guest with OPENCHANNEL_RESULT.

The guest is not trusted. Every message is parsed against its layout; every
relid, GPADL handle, PFN, page offset and length is checked. A message that
breaks the protocol is counted with its reason and logged, and the channel it
concerns (if any) is closed; nothing the guest sends can make the server raise.

Rings must be contiguous in guest RAM: Linux allocates each channel's ring pages
with one alloc_pages() (so they are), and it lets the data path work on a plain
slice of guest memory. A ring GPADL that is not contiguous fails the open.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import numpy as np

from hypervisor.partition import Doorbell, GuestMemory
from hypervisor.synic import MessageError, MessagePort

from . import channel_msg as M

log = logging.getLogger("hvnet.vmbus")
PAGE = 4096
SUPPORTED_VERSIONS = (M.V_WIN10_V5_3, M.V_WIN10_V5_2, M.V_WIN10_V5_1, M.V_WIN10_V5,
                      M.V_WIN10_V4_1, M.V_WIN10, M.V_WIN8_1, M.V_WIN8)
MAX_RELID = 2047                   # OpenVMM's MAX_CHANNELS (c.3)
MAX_GPADL_PAGES = (0xFFFF - 8) // 8
FIRST_CONNECTION_ID = 0x1000


@dataclass
class Gpadl:
    handle: int
    child_relid: int
    byte_count: int
    byte_offset: int
    expected: int                          # PFNs still to come
    pfns: list = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.expected == 0

    def contiguous_gpa(self) -> int | None:
        """GPA of the first byte when the pages follow each other, else None."""
        p = np.asarray(self.pfns, dtype=np.int64)
        if len(p) and (np.diff(p) == 1).all():
            return int(p[0]) * PAGE + self.byte_offset
        return None


@dataclass
class Channel:
    relid: int
    if_type: object
    if_instance: object
    sub_index: int
    connection_id: int
    device: object
    state: str = "offered"                 # offered, open, closed, rescinded
    ring_gpadl: int | None = None
    signal: Doorbell | None = None         # guest -> host
    interrupt: Doorbell | None = None      # host -> guest
    # Ring geometry in guest RAM: GPA of each ring's control page and data size.
    in_ring: tuple[int, int] | None = None    # guest -> host ("outbound" in Linux)
    out_ring: tuple[int, int] | None = None   # host -> guest


class VmbusServer:
    def __init__(self, port: MessagePort, memory: GuestMemory):
        self.port, self.memory = port, memory
        self.version: int | None = None
        self.channels: dict[int, Channel] = {}
        self.gpadls: dict[int, Gpadl] = {}
        self.violations: collections.Counter = collections.Counter()
        self._next_conn = FIRST_CONNECTION_ID
        port.sock.setblocking(False)

    # ---------------------------------------------------------------- devices
    def offer(self, if_type, if_instance, device, sub_index: int = 0) -> Channel:
        """Offer a channel; ``device.channel_opened(ch)`` / ``channel_closed(ch)`` are
        called as the guest opens and closes it. Sent at once if the guest is
        connected (a hot add or a subchannel), else on REQUESTOFFERS."""
        relid = next((r for r in range(1, MAX_RELID + 1) if r not in self.channels), None)
        if relid is None:
            raise RuntimeError("no channel ids left")
        ch = Channel(relid, if_type, if_instance, sub_index, self._next_conn, device)
        self._next_conn += 1
        self.channels[relid] = ch
        if self.version is not None:
            self._send_offer(ch)
        return ch

    def rescind(self, relid: int) -> None:
        ch = self.channels.get(relid)
        if ch is None or ch.state == "rescinded":
            return
        self._close(ch)
        ch.state = "rescinded"
        self._post(M.message(M.RESCIND_CHANNELOFFER, child_relid=relid))

    def _send_offer(self, ch: Channel) -> None:
        self._post(M.message(
            M.OFFERCHANNEL, if_type=M.guid_bytes(ch.if_type),
            if_instance=M.guid_bytes(ch.if_instance),
            chn_flags=M.CHN_ENUMERATE_DEVICE_INTERFACE, sub_channel_index=ch.sub_index,
            child_relid=ch.relid, connection_id=ch.connection_id,
            is_dedicated_interrupt=1))

    def _post(self, data: bytes, fds=()) -> None:
        try:
            self.port.post(data, fds)
        except OSError as e:
            log.warning("guest message port: %s", e)

    # ---------------------------------------------------------------- messages
    def violation(self, why: str, ch: Channel | None = None) -> None:
        self.violations[why] += 1
        log.warning("VMBus protocol violation: %s%s", why,
                    f" (channel {ch.relid} closed)" if ch else "")
        if ch is not None and ch.state == "open":
            self._close(ch)

    def close_channel(self, ch: Channel, why: str) -> None:
        """A device closes its channel over a protocol error of its own layer (NVSP,
        RNDIS): logged with the reason; VMBus itself was not broken."""
        log.warning("channel %d closed: %s", ch.relid, why)
        self._close(ch)

    def pump(self) -> int:
        """Handle every message waiting on the port. Returns how many."""
        n = 0
        while True:
            try:
                got = self.port.receive()
            except BlockingIOError:
                return n
            except MessageError as e:
                self.violation(str(e))
                continue
            if got is None:
                return n
            self.handle(got[0])
            n += 1

    def handle(self, data: bytes) -> None:
        try:
            msgtype, m = M.parse(data)
        except M.ChannelMessageError as e:
            self.violation(str(e))
            return
        if self.version is None and msgtype != M.INITIATE_CONTACT:
            self.violation(f"message type {msgtype} before INITIATE_CONTACT")
            return
        fn = {M.INITIATE_CONTACT: self._initiate_contact, M.REQUESTOFFERS: self._request_offers,
              M.GPADL_HEADER: self._gpadl_header, M.GPADL_BODY: self._gpadl_body,
              M.GPADL_TEARDOWN: self._gpadl_teardown, M.OPENCHANNEL: self._open,
              M.CLOSECHANNEL: self._close_msg, M.RELID_RELEASED: self._relid_released,
              M.UNLOAD: self._unload}.get(msgtype)
        if fn is None:
            self.violation(f"message type {msgtype} is not one a guest sends")
            return
        fn(m, data)

    def _initiate_contact(self, m, data) -> None:
        v = int(m["vmbus_version_requested"])
        ok = v in SUPPORTED_VERSIONS
        if ok:
            if self.version is not None and self.version != v:
                self._reset()
            self.version = v
        # c.4: refuse with version_supported = 0; the guest tries the next older one.
        self._post(M.message(M.VERSION_RESPONSE, version_supported=int(ok),
                             connection_state=0, msg_conn_id=M.CONNECTION_ID))

    def _request_offers(self, m, data) -> None:
        for ch in sorted(self.channels.values(), key=lambda c: c.relid):
            if ch.state != "rescinded":
                self._send_offer(ch)
        self._post(M.message(M.ALLOFFERS_DELIVERED))

    def _channel(self, relid: int, what: str) -> Channel | None:
        ch = self.channels.get(relid)
        if ch is None or ch.state == "rescinded":
            self.violation(f"{what} for unknown channel {relid}")
            return None
        return ch

    def _gpadl_header(self, m, data) -> None:
        relid, handle = int(m["child_relid"]), int(m["gpadl"])
        ch = self._channel(relid, "GPADL_HEADER")
        if ch is None:
            return
        fail = None
        buflen, count = int(m["range_buflen"]), int(m["rangecount"])
        if handle in self.gpadls:
            fail = f"GPADL {handle:#x} already exists"
        elif count != 1:
            fail = f"GPADL with {count} ranges (one is supported, as Linux sends)"
        elif buflen < 16 or buflen % 8 or (buflen - 8) // 8 > MAX_GPADL_PAGES:
            fail = f"GPADL range_buflen {buflen}"
        elif len(data) < 28:
            fail = "GPADL_HEADER without its range header"
        if fail:
            self.violation(fail)
            self._post(M.message(M.GPADL_CREATED, child_relid=relid, gpadl=handle,
                                 creation_status=M.GPADL_FAILURE))
            return
        rng = M.decode(M.GPADL_RANGE_HEADER, data, 20)
        g = Gpadl(handle, relid, int(rng["byte_count"]), int(rng["byte_offset"]),
                  (buflen - 8) // 8)
        self.gpadls[handle] = g
        self._take_pfns(g, data[28:])

    def _gpadl_body(self, m, data) -> None:
        g = self.gpadls.get(int(m["gpadl"]))
        if g is None or g.complete:
            self.violation(f"GPADL_BODY for GPADL {int(m['gpadl']):#x} that is not being "
                           "created")
            return
        self._take_pfns(g, data[16:])

    def _take_pfns(self, g: Gpadl, raw: bytes) -> None:
        n = len(raw) // 8
        if len(raw) % 8 or n > g.expected:
            self._gpadl_failed(g, f"GPADL {g.handle:#x}: {n} PFNs where {g.expected} "
                               "were still due")
            return
        g.pfns.extend(np.frombuffer(raw, dtype="<u8").astype(np.int64).tolist())
        g.expected -= n
        if not g.complete:
            return
        pages = self.memory.size // PAGE
        if any(p < 0 or p >= pages for p in g.pfns):
            self._gpadl_failed(g, f"GPADL {g.handle:#x} names pages outside guest RAM")
        elif not (g.byte_offset < PAGE and g.byte_count <= len(g.pfns) * PAGE - g.byte_offset):
            self._gpadl_failed(g, f"GPADL {g.handle:#x}: {g.byte_count} bytes at "
                               f"{g.byte_offset} do not fit {len(g.pfns)} pages")
        else:
            self._post(M.message(M.GPADL_CREATED, child_relid=g.child_relid, gpadl=g.handle,
                                 creation_status=0))

    def _gpadl_failed(self, g: Gpadl, why: str) -> None:
        del self.gpadls[g.handle]
        self.violation(why)
        self._post(M.message(M.GPADL_CREATED, child_relid=g.child_relid, gpadl=g.handle,
                             creation_status=M.GPADL_FAILURE))

    def _gpadl_teardown(self, m, data) -> None:
        handle = int(m["gpadl"])
        g = self.gpadls.get(handle)
        if g is None:
            self.violation(f"GPADL_TEARDOWN of unknown GPADL {handle:#x}")
            return
        user = next((c for c in self.channels.values()
                     if c.state == "open" and c.ring_gpadl == handle), None)
        if user is not None:
            self.violation(f"GPADL {handle:#x} torn down under open channel {user.relid}",
                           user)
        owner = self.channels.get(g.child_relid)
        hook = getattr(owner.device, "gpadl_teardown", None) if owner else None
        if hook is not None:
            hook(owner, handle)            # a device letting go of a buffer it used
        del self.gpadls[handle]
        self._post(M.message(M.GPADL_TORNDOWN, gpadl=handle))

    def gpadl(self, handle: int) -> Gpadl | None:
        """A complete GPADL, for devices (receive and send buffers, d.4)."""
        g = self.gpadls.get(handle)
        return g if g is not None and g.complete else None

    def _open(self, m, data) -> None:
        relid = int(m["child_relid"])
        ch = self._channel(relid, "OPENCHANNEL")
        if ch is None:
            return
        openid = int(m["openid"])

        def result(status: int, fds=()):
            self._post(M.message(M.OPENCHANNEL_RESULT, child_relid=relid, openid=openid,
                                 status=status), fds)
        if ch.state == "open":
            self.violation(f"OPENCHANNEL of channel {relid}, already open")
            result(M.GPADL_FAILURE)
            return
        g = self.gpadl(int(m["ringbuffer_gpadlhandle"]))
        split = int(m["downstream_ringbuffer_pageoffset"])
        base = g.contiguous_gpa() if g is not None else None
        why = None
        if g is None:
            why = f"ring GPADL {int(m['ringbuffer_gpadlhandle']):#x} does not exist"
        elif g.byte_offset or g.byte_count != len(g.pfns) * PAGE:
            why = "ring GPADL does not start at a page or cover whole pages"
        elif base is None:
            why = "ring pages are not contiguous in guest RAM"
        elif not 2 <= split <= len(g.pfns) - 2:
            why = f"ring split at page {split} of {len(g.pfns)}"
        if why:
            self.violation(f"OPENCHANNEL {relid}: {why}")
            result(M.GPADL_FAILURE)
            return
        ch.ring_gpadl = g.handle
        ch.in_ring = (base, (split - 1) * PAGE)
        ch.out_ring = (base + split * PAGE, (len(g.pfns) - split - 1) * PAGE)
        ch.signal, ch.interrupt = Doorbell(), Doorbell()
        ch.state = "open"
        # The device is ready before the guest hears the channel is open: the
        # guest may write into the ring the moment OPENCHANNEL_RESULT arrives.
        hook = getattr(ch.device, "channel_opened", None)
        if hook is not None:
            hook(ch)
        if ch.state != "open" or ch.signal is None:
            # the device closed (or rescinded) it while it opened
            result(M.GPADL_FAILURE)
            return
        result(0, [ch.signal.fd, ch.interrupt.fd])

    def _close_msg(self, m, data) -> None:
        ch = self._channel(int(m["child_relid"]), "CLOSECHANNEL")
        if ch is not None:
            self._close(ch)

    def _close(self, ch: Channel) -> None:
        if ch.state != "open":
            return
        ch.state = "closed"
        hook = getattr(ch.device, "channel_closed", None)
        if hook is not None:
            hook(ch)
        for d in (ch.signal, ch.interrupt):
            if d is not None:
                d.close()
        ch.signal = ch.interrupt = None
        ch.ring_gpadl = ch.in_ring = ch.out_ring = None

    def _relid_released(self, m, data) -> None:
        relid = int(m["child_relid"])
        ch = self.channels.get(relid)
        if ch is None or ch.state != "rescinded":
            self.violation(f"RELID_RELEASED of channel {relid}, which was not rescinded")
            return
        del self.channels[relid]

    def _unload(self, m, data) -> None:
        self._reset()
        self._post(M.message(M.UNLOAD_RESPONSE))

    def _reset(self) -> None:
        for ch in self.channels.values():
            self._close(ch)
        self.gpadls.clear()
        self.version = None
