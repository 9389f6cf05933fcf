"""Synthetic NIC ports: NetVSP devices as a kind of switch port.

Each port is one NetVSP device (netvsp.netvsp) of one partition. ``receive`` runs
the compiled ingress (netvsp.datapath) over each open, ready channel's
guest-to-host ring: data packets become batch slots with one copy, and when the
walk stops at a control packet the control path handles exactly that one, then
the walk goes on. ``transmit`` runs the compiled egress for each port's share of
the delivery plan into the guest's receive buffer. Completions both ways stay
in compiled code; Python runs once per channel per batch.

The data path needs the guest's send and receive buffers to be contiguous in
guest RAM (Linux allocates them so); a channel whose buffers are not is served
by the control path only, and its data is dropped and counted there.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from switch import counters as C
from switch.delivery import tx_failed_span
from switch.portkind import PortKind

from . import datapath as D
from . import nvsp as N
from . import vrss
from .vmbus import ring as RG

MAX_SEGMENTS = 128
CONTROL_STEPS = 64          # control packets handled per channel per receive
PUMP_EVERY_S = 0.002        # VMBus control messages, looked for at least this often
SKIP_AT_MOST = 8            # receive passes a port's ingress may give way to its worker


# What the data path's counters mean (datapath.BAD_*, datapath.S_*), for stats.
BAD_NAMES = {D.BAD_SECTION: "bad send-buffer section", D.BAD_GPA: "bad GPA-direct range",
             D.BAD_RNDIS: "malformed RNDIS packet", D.BAD_PPI: "malformed per-packet info"}
TO_GUEST_NAMES = {D.S_DELIVERED: "delivered", D.S_NO_BUFFER: "no receive buffer",
                  D.S_RING_FULL: "ring full", D.S_TOO_BIG: "too big",
                  D.S_SEGMENTED: "segmented", D.S_COALESCED: "coalesced"}


class _ChannelData:
    """The data path's arrays for one open channel; its counters are the port's,
    so they outlive the channel."""

    def __init__(self, nc, bad, stats, primary: "_ChannelData | None" = None):
        self.nc = nc
        mem = nc.device.memory.mem
        self.mem = mem
        self.in_ring = nc.ch.in_ring
        self.out_ring = nc.ch.out_ring
        self.rstate = np.zeros(2, dtype=np.int64)
        self.desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
        self.pieces = np.zeros((D.MAX_PIECES, 3), dtype=np.int64)
        self.nvsp = np.zeros(16, dtype=np.uint8)
        self.comp = np.zeros((512, 2), dtype=np.int64)
        self.ncomp = 0
        self.bad = bad
        self.stats = stats
        self.msg = np.zeros(8, dtype=np.uint8)
        self.ranges = np.zeros((D.MAX_RANGES, 2), dtype=np.int64)
        self.scratch = np.zeros(65536 + MAX_SEGMENTS * 256, dtype=np.uint8)
        self.seglens = np.zeros(MAX_SEGMENTS, dtype=np.int64)
        rb = self.rb = nc.recv_buf
        if primary is None:
            self.rx = D.ReceiveBuffer(rb.gpa, rb.size, rb.sub_alloc_size,
                                      reserved=rb.data_first)
        else:
            # a subchannel lends from the same receive buffer as its primary (g.1)
            self.rx = primary.rx
        self.set_send_buffer(nc.send_buf)
        # A receive completion the control path meets (it reads the ring when a
        # GPADL goes away, d.5) frees the data path's sub-allocations.
        nc.rx_completion_handler = lambda ch, tid, status: bool(
            D.receive_completed(tid, *self.rx.arrays()))
        # Receive coalescing toward the guest: Linux asks for it at NVSP 6.1 (d.5).
        cfg = nc.ndis_config
        self.rsc = nc.version is not None and nc.version >= N.VERSION_61 and \
            cfg is not None and bool(cfg[1] & N.CAP_RSC)
        self.smeta = None                 # made on first use, shaped like the batch's meta
        self.pkt_id = np.zeros(1, dtype=np.int64) if primary is None else primary.pkt_id
        self.subs: list[_ChannelData] = []   # (primary only) the open subchannels' data
        self.sub_key: tuple = ()
        self.slots: list[_ChannelData] = [self]  # (primary only) channel by sub index
        self.vrss = None                     # (primary only) netvsp.vrss scratch arrays
        # (primary only) frames vRSS put on each channel, by sub_channel_index
        self.per_slot = np.zeros(N.VRSS_CHANNEL_MAX, dtype=np.int64)

    def set_send_buffer(self, sb) -> None:
        self.sb = sb
        self.sbuf = (sb.gpa, sb.size, sb.section_size) if sb is not None else (0, 0, 0)


def _sync_send_buffer(cd: _ChannelData) -> None:
    """Follow the channel's send buffer (a subchannel's is its primary's): one granted
    late (d.5 allows SEND_SEND_BUF after INIT) or revoked (sections then refused)."""
    sb = cd.nc.send_buf
    if cd.sb is not sb:
        cd.set_send_buffer(sb if sb is not None and sb.gpa is not None else None)


class SyntheticPorts(PortKind):
    name = "synthetic"
    # A VMQ queue's worker sends to its VM's port beside the data-path thread: each
    # port's data path runs under its device's lock, the lock NetVSP's control
    # path (channel open and close, GPADL teardown, link) already holds, so the
    # rings and receive buffer are never used by two threads at once nor after
    # the guest revoked them.
    concurrent = True

    def __init__(self):
        super().__init__()
        self.devices: dict[int, object] = {}      # port id -> NetvspDevice
        self.servers: dict[int, object] = {}      # port id -> its partition's VmbusServer
        self._data: dict[int, _ChannelData] = {}   # port id -> the open channel's arrays
        self._bad: dict[int, np.ndarray] = {}      # port id -> data-path drops (D.BAD_*)
        self._stats: dict[int, np.ndarray] = {}    # port id -> toward the guest (D.S_*)
        # System calls on descriptors the switch's epoll did not report (VMBus
        # message ports, doorbell counts) are skipped while frames flow: a doorbell
        # left readable only makes the next epoll return at once.
        self._pumped = 0.0
        self._skipped: dict[int, int] = {}   # port id -> receive passes it gave way

    def attach(self, port, device, server=None) -> None:
        """Serve ``port`` with ``device``; ``server``, if given, is pumped here too
        (the partition's VMBus control messages)."""
        self.devices[port.port_id] = device
        if server is not None:
            self.servers[port.port_id] = server
        self._bad[port.port_id] = np.zeros(D.NBAD, dtype=np.int64)
        self._stats[port.port_id] = np.zeros(D.NSTATS, dtype=np.int64)
        self.port_added(port)

    def port_removed(self, port) -> None:
        super().port_removed(port)
        dev = self.devices.get(port.port_id)
        lock = dev.lock if dev is not None else contextlib.nullcontext()
        with lock:                        # waits for a worker's transmit in flight
            self.devices.pop(port.port_id, None)
            self.servers.pop(port.port_id, None)
            self._data.pop(port.port_id, None)
            self._bad.pop(port.port_id, None)
            self._stats.pop(port.port_id, None)

    def port_info(self, port_id: int) -> dict | None:
        dev = self.devices.get(port_id)
        if dev is None:
            return None
        with dev.lock:
            nc = dev.channel
            dropped = dict(dev.dropped)
            violations = dict(dev.violations)
            chan = ("none" if nc is None else "closed" if nc.closed else nc.state)
            version = None if nc is None or nc.version is None else \
                N.VERSION_NAMES.get(nc.version, hex(nc.version))
            rndis = None if nc is None else nc.rndis_state
        for k, name in BAD_NAMES.items():
            if self._bad[port_id][k]:
                dropped[name] = dropped.get(name, 0) + int(self._bad[port_id][k])
        cd = self._data.get(port_id)
        subs = sorted(dev.subs)
        return {"kind": "netvsp", "channel": chan, "nvsp": version, "rndis": rndis,
                "channels": 1 + len(subs) if nc is not None else 0,
                "rss": nc is not None and nc.rss is not None,
                "per_channel": cd.per_slot[:1 + max(subs, default=0)].tolist() if cd else [],
                "link": "up" if dev.link_up else "down", "last_close": dev.last_close,
                "dropped": dropped, "violations": violations,
                "to_guest": {name: int(self._stats[port_id][k])
                             for k, name in TO_GUEST_NAMES.items()}}

    def warm(self) -> None:
        """Every data-path kernel once, over an empty ring in scratch memory (the
        same array types as guest RAM), so the first frames find them compiled."""
        from switch.batch import PacketBatch
        mem = np.zeros(1 << 16, dtype=np.uint8)
        RG.ring_init(mem, 0, 16384)
        b = PacketBatch(4, arena=1 << 12)
        rx = D.ReceiveBuffer(1 << 15, 4 * 2048, 2048)
        D.netvsp_ingress(mem, 0, 16384, np.zeros(2, np.int64), np.zeros(RG.DESC_FIELDS,
                         np.int64), np.zeros((D.MAX_PIECES, 3), np.int64),
                         np.zeros(16, np.uint8), 0, 0, 0, b.meta, b.data, 0, 0, 0,
                         np.zeros((4, 2), np.int64), 0, np.zeros(D.NBAD, np.int64),
                         *rx.arrays())
        D.write_completions(mem, 0, 16384, np.zeros((4, 2), np.int64), 0, 0,
                            np.zeros(8, np.uint8))
        tx_failed_span(np.zeros((1, C.NCOLS), np.int64), 0, b.meta, np.zeros((2, 1), np.int64),
                       0, 0, C.DEST_NOT_CONNECTED)
        D.netvsp_egress(b.meta, b.data, np.zeros((2, 4), np.int64), 0, 0, mem, 0, 16384,
                        rx.gpa, rx.sub_size, *rx.arrays(), np.zeros((D.MAX_RANGES, 2),
                                                                      np.int64),
                        np.zeros(16, np.uint8), np.zeros(1024, np.uint8),
                        np.zeros(4, np.int64), np.zeros(D.NSTATS, np.int64), True,
                        np.zeros((b.meta.shape[0], 1 + 8), np.int64), np.zeros(1, np.int64))
        from switch.toeplitz import DEFAULT_KEY, LINUX_HASHINFO, key_table
        vrss.group_by_channel(b.meta, np.zeros((2, 4), np.int64), 0, 0, key_table(DEFAULT_KEY),
                              LINUX_HASHINFO, np.zeros(128, np.int64), 2, *vrss.scratch(4, 2))

    def fds(self) -> list[int]:
        # Called outside the data-path lock, and a device's fds() waits for its lock
        # (a VMQ worker's transmit): the control path may add or remove ports meanwhile.
        return ([fd for dev in list(self.devices.values()) for fd in dev.fds()]
                + [srv.port.fileno() for srv in list(self.servers.values())])

    def _channel_data(self, pid: int):
        """The data path's view of the port's channel, or None while the channel is
        not ready for data: it takes the channel only while NVSP is ready (not
        revoked, d.5), RNDIS initialized (not halted) and its buffers are granted;
        made again for a new receive buffer, told of a send buffer that came late."""
        dev = self.devices[pid]
        nc = dev.channel
        cd = self._data.get(pid)
        if nc is None or nc.closed or nc.state != "ready" or \
                nc.rndis_state != "initialized" or nc.recv_buf is None or \
                nc.recv_buf.gpa is None or (nc.send_buf is not None and nc.send_buf.gpa is None):
            if cd is not None:
                cd.nc.rx_completion_handler = None
                self._data.pop(pid, None)
            return None
        if cd is not None and cd.nc is nc and cd.rb is nc.recv_buf:
            if cd.sb is not nc.send_buf:
                cd.set_send_buffer(nc.send_buf)
            return cd
        cd = _ChannelData(nc, self._bad[pid], self._stats[pid])
        self._data[pid] = cd
        return cd

    def _channels(self, pid: int, cd: _ChannelData) -> list[_ChannelData]:
        """The primary's data and its open subchannels' (vRSS, g.1), remade when
        the set of open subchannels changes."""
        subs = self.devices[pid].subs
        key = tuple((k, id(sc)) for k, sc in sorted(subs.items()) if not sc.closed)
        if key != cd.sub_key:
            keep = {id(x.nc): x for x in cd.subs}
            cd.subs = []
            # slots[k]: the channel with sub_channel_index k, the primary where
            # none is open, as RSS table entries name channels (g.3)
            cd.slots = [cd] * (1 + max((k for k, _ in key), default=0))
            for k, sc in sorted(subs.items()):
                if sc.closed:
                    continue
                x = keep.get(id(sc)) or _ChannelData(sc, cd.bad, cd.stats, primary=cd)
                cd.subs.append(x)
                cd.slots[k] = x
            cd.sub_key = key
        return [cd] + cd.subs if cd.subs else [cd]

    def receive(self, batch) -> int:
        # A VMBus message port is read when the switch's epoll found it readable,
        # and at least every PUMP_EVERY_S while frames keep the switch from sleeping.
        now = time.monotonic()
        ready = None if self.switch is None else self.switch.ready_fds
        due = now - self._pumped >= PUMP_EVERY_S
        if due:
            self._pumped = now
        for srv in self.servers.values():
            if due or ready is None or srv.port.fileno() in ready:
                srv.pump()
        n, cursor = 0, 0
        for pid in self.port_ids.tolist():
            dev = self.devices[pid]
            # A VMQ worker sending to this port holds its lock: read its rings on a
            # later pass rather than wait (they keep what they hold, and an unread
            # doorbell keeps the switch's epoll from sleeping), but not for ever.
            if not dev.lock.acquire(blocking=False):
                skipped = self._skipped.get(pid, 0) + 1
                if skipped < SKIP_AT_MOST:
                    self._skipped[pid] = skipped
                    continue
                dev.lock.acquire()
            self._skipped.pop(pid, None)
            try:
                cd = self._channel_data(pid)
                if cd is None:
                    dev.poll()                   # the control path alone (bring-up)
                    continue
                for x in self._channels(pid, cd):
                    n, cursor = self._ingress(x, batch, n, cursor, pid, ready)
                if cd.nc.closed:
                    self._data.pop(pid, None)
            finally:
                dev.lock.release()
        batch.cursor = cursor
        return n

    def _ingress(self, cd: _ChannelData, batch, n, cursor, pid, ready):
        """One channel's guest-to-host ring into the batch, stopping for control
        packets (handed to the control path one at a time)."""
        nc = cd.nc
        if nc.closed:
            return n, cursor
        _sync_send_buffer(cd)
        sig = nc.ch.signal
        if sig is not None and (ready is None or sig.fd in ready):
            sig.take()                   # before reading the ring, so no ring is missed
        base, ds = cd.in_ring
        for _ in range(CONTROL_STEPS):
            start = RG.ring_read_pos(cd.mem, base, ds)
            if start < 0:
                nc.poll(1)                       # the control path reports the corrupt ring
                break
            cd.rstate[0] = start
            n, cursor, cd.ncomp, why = D.netvsp_ingress(
                cd.mem, base, ds, cd.rstate, cd.desc, cd.pieces, cd.nvsp, *cd.sbuf,
                batch.meta, batch.data, n, cursor, pid, cd.comp, cd.ncomp, cd.bad,
                *cd.rx.arrays())
            if cd.rstate[0] != start:
                if RG.ring_read_commit(cd.mem, base, ds, cd.rstate[0], start) == 1:
                    nc.ch.interrupt.ring()       # the guest waits for room (a.5.4)
            self._complete(cd)
            if why == D.CONTROL:
                nc.poll(1)
                if nc.closed:
                    break
                # A send buffer granted by that message is used by the data packets
                # right behind it (the guest sends them once it has the completion).
                _sync_send_buffer(cd)
                continue
            if why < 0:
                nc.poll(1)
            break
        return n, cursor

    def _complete(self, cd: _ChannelData) -> None:
        if not cd.ncomp:
            return
        base, ds = cd.out_ring
        w, sig = D.write_completions(cd.mem, base, ds, cd.comp, 0, cd.ncomp, cd.msg)
        if w:
            cd.comp[:cd.ncomp - w] = cd.comp[w:cd.ncomp]
            cd.ncomp -= w
        if sig:
            cd.nc.ch.interrupt.ring()

    def transmit(self, batch, plan, span) -> None:
        ctr = self.switch.counters.here()        # a VMQ worker's own table there
        for pid in self.port_ids.tolist():
            j0, j1 = int(span[pid, 0]), int(span[pid, 1])
            if j0 == j1:
                continue
            dev = self.devices.get(pid)
            if dev is None:                      # removed meanwhile (a worker's plan)
                tx_failed_span(ctr, pid, batch.meta, plan, j0, j1, C.DEST_NOT_CONNECTED)
                continue
            with dev.lock:
                if self.devices.get(pid) is dev:
                    self._transmit_port(pid, batch, plan, j0, j1, ctr)
                else:
                    tx_failed_span(ctr, pid, batch.meta, plan, j0, j1, C.DEST_NOT_CONNECTED)

    def _transmit_port(self, pid, batch, plan, j0, j1, ctr) -> None:
        """One port's share of the plan, under its device's lock."""
        cd = self._channel_data(pid)
        if cd is None:                           # no data path yet
            tx_failed_span(ctr, pid, batch.meta, plan, j0, j1, C.DEST_NOT_CONNECTED)
            return
        if cd.nc.packet_filter == 0:
            # the guest takes nothing (f.1, e.3: Linux sets 0 when its interface
            # goes down)
            tx_failed_span(ctr, pid, batch.meta, plan, j0, j1, C.NIC_FILTER)
            return
        chans = self._channels(pid, cd)
        rss = cd.nc.rss
        if len(chans) > 1 and rss is not None:
            # vRSS: each channel's frames on its own ring (netvsp.vrss)
            slots = cd.slots
            if cd.vrss is None or cd.vrss[0].shape[1] < plan.shape[1] or \
                    cd.vrss[2].shape[0] != len(slots) + 1:
                cd.vrss = vrss.scratch(plan.shape[1], len(slots))
            tmp, chan, starts, cursor = cd.vrss
            vrss.group_by_channel(batch.meta, plan, j0, j1, rss["ktable"],
                                  rss["hashinfo"], rss["itab"], len(slots), tmp, chan,
                                  starts, cursor)
            for c, x in enumerate(slots):
                a, b = j0 + int(starts[c]), j0 + int(starts[c + 1])
                if a < b:
                    cd.per_slot[min(c, cd.per_slot.size - 1)] += b - a
                    self._egress(x, batch, plan, a, b, pid, ctr)
        else:
            self._egress(cd, batch, plan, j0, j1, pid, ctr)

    def _egress(self, cd: _ChannelData, batch, plan, j0, j1, pid, ctr) -> None:
        base, ds = cd.out_ring
        if cd.smeta is None or cd.smeta.shape[0] != batch.meta.shape[0]:
            cd.smeta = np.zeros((batch.meta.shape[0], 1 + 8), dtype=np.int64)
        before = cd.stats.copy()
        sig = D.netvsp_egress(batch.meta, batch.data, plan, j0, j1, cd.mem, base, ds,
                              cd.rx.gpa, cd.rx.sub_size, *cd.rx.arrays(), cd.ranges,
                              cd.nvsp, cd.scratch, cd.seglens, cd.stats, cd.rsc,
                              cd.smeta, cd.pkt_id)
        lost = int((cd.stats[D.S_NO_BUFFER] + cd.stats[D.S_RING_FULL]
                    + cd.stats[D.S_TOO_BIG])
                   - (before[D.S_NO_BUFFER] + before[D.S_RING_FULL] + before[D.S_TOO_BIG]))
        lost = min(lost, j1 - j0)           # segments of one frame count once
        if lost:
            ctr[pid, C.DROP_OUT] += lost
            ctr[pid, C.DROP_OUT_BASE + C.TX_FULL] += lost
        if sig:
            cd.nc.ch.interrupt.ring()
