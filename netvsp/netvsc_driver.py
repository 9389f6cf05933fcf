"""The NetVSC driver process: a synthetic NIC's guest side, inside the VM's namespace.

Started by the host's runtime in the VM's network namespace with one end of the
partition's control channel. It receives guest RAM (a memfd) and the SynIC
message port by SCM_RIGHTS, brings the NIC up as Linux does (netvsp.netvsc),
then owns the VM's tap (IFF_VNET_HDR, offloads on) and moves frames between the
tap and the VMBus rings in compiled loops:

- tap -> host: frames are read into a transmit arena in guest RAM, each with
  HEADROOM bytes free before it, and put on the ring by ``netvsc_transmit``;
  the arena has two halves, and one is refilled from the tap once the host has
  completed the GPA-direct frames in it, while the host reads the other;
- host -> tap: ``netvsc_receive`` writes each frame from the receive buffer to
  the tap with one writev() (RSC fragments as pieces of it, a tag put back
  inline), then completes the transfer-page packet.
Completions of our sends are taken by ``netvsc_reclaim``; anything else the host
sends (control replies, link indications) is handled by the control path. All of
it, both ways, is one compiled call per wake-up (``driver_poll``).

    python -m netvsp.netvsc_driver --ctl FD --ifname eth0
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys
import threading

import numpy as np

from hypervisor.partition import ControlChannel, GuestMemory
from hypervisor.synic import MessagePort
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_CSUM_VALID, FLAGS, GSO_SIZE,
                          GSO_TYPE, ROW_PAD, PacketBatch, init_packet)
from switch.kernel import kernel
from switch.syscalls import read, write
from switch.tap import VNET_HDR, open_tap, set_carrier

from . import datapath as D
from . import nvsp as N
from .netvsc import Netvsc
from .netvsc_datapath import (HEADROOM, RX_CONTROL, netvsc_receive, netvsc_reclaim,
                              netvsc_transmit, rx_scratch)
from .vmbus import ring as RG
from .vmbus.client import GuestPages, VmbusClient

# How long the guest waits for the host: the host's first answers may wait for
# numba to compile its kernels on a cold cache (the runtime waits as long for us).
HOST_START_S = 300
log = logging.getLogger("hvnet.netvsc")
TX_SLOTS = 64
SLOT = 65536 + 64 + HEADROOM + 64        # a super-packet, its tag, headroom, alignment


@kernel
def tap_read_slots(fd, meta, data, first, nslots, slot, headroom):
    """Read ready frames from the tap into batch rows first.., one per arena slot
    (row k in slot k) with ``headroom`` free before the frame (the virtio header
    lands in its last 10 bytes). Returns how many were read."""
    n = first
    cap = min(first + nslots, meta.shape[1] - ROW_PAD)
    while n < cap:
        at = n * slot + headroom
        if at + slot - headroom > data.shape[0]:
            break
        got = read(fd, data.ctypes.data + at - VNET_HDR, slot - headroom + VNET_HDR)
        if got <= VNET_HDR:
            break
        h = at - VNET_HDR
        init_packet(meta, n, at, got - VNET_HDR, 0, 0)
        if data[h] & 1:
            meta[FLAGS, n] |= F_CSUM_PARTIAL
            meta[CSUM_START, n] = np.int64(data[h + 6]) | (np.int64(data[h + 7]) << 8)
            meta[CSUM_OFF, n] = np.int64(data[h + 8]) | (np.int64(data[h + 9]) << 8)
        elif data[h] & 2:
            meta[FLAGS, n] |= F_CSUM_VALID
        meta[GSO_TYPE, n] = data[h + 1]
        meta[GSO_SIZE, n] = np.int64(data[h + 4]) | (np.int64(data[h + 5]) << 8)
        n += 1
    return n - first


# driver_poll's answers (negative: the host's ring is corrupt, a ring error code)
IDLE, CONTROL, BLOCKED = 0, 1, 2
# geo[] slots: where things are in guest RAM, and the descriptors the loop uses
G_IN, G_IN_DS, G_OUT, G_OUT_DS, G_RECV, G_RECV_SIZE, G_SEND, G_SECTION, G_TX, G_TAP, \
    G_SIGNAL, G_PARTS, G_TAP_TX = range(13)     # G_TAP_TX 0: the tap's frames go elsewhere
                                                # (a VF's data path), not to the host
# st[] slots: state kept between calls. The transmit arena is two halves: one is
# refilled from the tap while the host still reads the other's frames.
ST_NCOMP, ST_TX_AT, ST_TX_N, ST_TX_PART, ST_SENT = 0, 1, 2, 3, 4     # ST_SENT: per part
TX_PARTS = 2          # measured beside 1 and 4 (hvnet bench switch): no worse, often better
MAX_PARTS = 8
NST = ST_SENT + MAX_PARTS


@kernel
def _bell(fd, one):
    write(fd, one.ctypes.data, 8)        # an eventfd: add 1


@kernel
def driver_poll(mem, geo, st, rs, desc, ranges, comp, rxstats, nvsp8, msg, free, nfree, busy,
                gpa_done, bufs, nvsp, txstats, rxmeta, rxdata, pieces, iov, hdr, txmeta,
                txdata, one):
    """The driver's whole data path, both ways, until nothing moves (one call per
    wake-up, no Python per batch): completions of our sends and frames from the
    host (to the tap, then completed), then frames from the tap to the host.
    Returns (packets moved, why it stopped): IDLE; CONTROL, a packet for the
    control path is next on the host's ring; BLOCKED, the ring to the host or
    the send sections are full (completions or frames wait: call again soon);
    or the ring error the host's ring gave."""
    ib, ids, ob, ods = geo[G_IN], geo[G_IN_DS], geo[G_OUT], geo[G_OUT_DS]
    sig_fd = geo[G_SIGNAL]
    moved = 0
    while True:
        progress = 0
        # ---- from the host
        start = RG.ring_read_pos(mem, ib, ids)
        if start < 0:
            return moved, start
        rs[0] = start
        got = netvsc_reclaim(mem, ib, ids, rs, desc, free, nfree, busy, gpa_done)
        # received frames go to the tap straight from the receive buffer
        n, _, ncomp, why = netvsc_receive(mem, ib, ids, rs, desc, ranges, geo[G_RECV],
                                          geo[G_RECV_SIZE], rxmeta, rxdata, 0, 0, comp,
                                          st[ST_NCOMP], rxstats, nvsp8, geo[G_TAP], pieces,
                                          iov, hdr)
        if got < 0:
            return moved, got
        if rs[0] != start and RG.ring_read_commit(mem, ib, ids, rs[0], start) == 1:
            _bell(sig_fd, one)               # the host waits for room (a.5.4)
        if ncomp:
            w, sig = D.write_completions(mem, ob, ods, comp, 0, ncomp, msg)
            for k in range(ncomp - w):
                comp[k, 0] = comp[k + w, 0]
                comp[k, 1] = comp[k + w, 1]
            ncomp -= w
            if sig:
                _bell(sig_fd, one)
        st[ST_NCOMP] = ncomp
        if why < 0:
            return moved, why
        progress += got + n
        if why == RX_CONTROL and got == 0 and n == 0:
            return moved + progress, CONTROL
        # ---- to the host: a half of the arena is refilled once the host completed
        # every GPA-direct frame in it (gpa_done counts completions per row)
        if st[ST_TX_AT] >= st[ST_TX_N] and geo[G_TAP_TX]:
            parts = geo[G_PARTS]
            per = TX_SLOTS // parts
            for t in range(parts):
                h = (st[ST_TX_PART] + 1 + t) % parts  # the next part first
                b0 = h * per
                done = 0
                for k in range(b0, b0 + per):
                    done += gpa_done[k]
                if done != st[ST_SENT + h]:
                    continue
                for k in range(b0, b0 + per):
                    gpa_done[k] = 0
                st[ST_SENT + h] = 0
                got = tap_read_slots(geo[G_TAP], txmeta, txdata, b0, per, SLOT, HEADROOM)
                if got:
                    st[ST_TX_PART] = h
                    st[ST_TX_AT] = b0
                    st[ST_TX_N] = b0 + got
                    progress += got
                break
        if st[ST_TX_AT] < st[ST_TX_N]:
            at = st[ST_TX_AT]
            before = txstats[1]
            nxt, sig = netvsc_transmit(mem, ob, ods, txmeta, txdata, geo[G_TX], st[ST_TX_N],
                                       at, geo[G_SEND], geo[G_SECTION], free, nfree, busy,
                                       bufs, nvsp, txstats)
            st[ST_SENT + st[ST_TX_PART]] += txstats[1] - before
            st[ST_TX_AT] = nxt
            if sig:                          # the ring was empty, the host unmasked (a.4.6)
                _bell(sig_fd, one)
            if nxt == at:
                return moved + progress, BLOCKED
        moved += progress
        if st[ST_NCOMP] > 0:
            return moved, BLOCKED
        if progress == 0:
            return moved, IDLE


class Driver:
    """The data path of one channel: the primary (``chan`` None) or a subchannel
    (vRSS, g.1), with its own tap queue, its own share of the send buffer's
    sections and its own transmit arena, so channels never share state and each
    runs in its own thread (the kernel is nogil)."""

    def __init__(self, ram: GuestMemory, nic: Netvsc, tapfd: int, chan=None,
                 sections=None):
        self.ram, self.nic, self.tapfd = ram, nic, tapfd
        self.chan = chan or nic               # out, inr, signal, interrupt
        mem = ram.mem
        self.tx_gpa = nic.pages.alloc(TX_SLOTS * SLOT)
        self.tx = PacketBatch(TX_SLOTS, arena=TX_SLOTS * SLOT)
        self.tx.data = mem[self.tx_gpa:self.tx_gpa + TX_SLOTS * SLOT]
        self.rx = PacketBatch(1, arena=64)
        count = nic.send_section_count
        secs = np.arange(count, dtype=np.int64) if sections is None else \
            np.asarray(sections, dtype=np.int64)
        ch = self.chan
        self.geo = np.array([ch.inr.base, ch.inr.datasize, ch.out.base, ch.out.datasize,
                             nic.recv_gpa, nic.recv_size, nic.send_gpa,
                             nic.send_section_size, self.tx_gpa, tapfd, ch.signal,
                             TX_PARTS, 1],
                            dtype=np.int64)
        self.ep = None
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.requests: list = []          # run on this thread, which owns the ring's writes
        self.st = np.zeros(NST, dtype=np.int64)
        free = np.zeros(count, dtype=np.int64)
        free[:secs.size] = secs
        self.arrays = (
            np.zeros(2, dtype=np.int64),                  # rs
            np.zeros(RG.DESC_FIELDS, dtype=np.int64),     # desc
            np.zeros((562, 2), dtype=np.int64),           # ranges
            np.zeros((512, 2), dtype=np.int64),           # comp
            np.zeros(8, dtype=np.int64),                  # rxstats
            np.zeros(8, dtype=np.uint8),                  # nvsp8
            np.zeros(8, dtype=np.uint8),                  # msg
            free,                                         # free sections (this channel's)
            np.array([secs.size], dtype=np.int64),        # nfree
            np.zeros(count, dtype=np.uint8),              # busy
            np.zeros(TX_SLOTS, dtype=np.int64),           # GPA-direct completions per row
            np.zeros((1, 2), dtype=np.int64),             # bufs
            np.zeros(16, dtype=np.uint8),                 # nvsp
            np.zeros(4, dtype=np.int64),                  # txstats
            self.rx.meta, self.rx.data,                   # (unused: frames go direct)
            *rx_scratch(),                                # pieces, iovecs, virtio header
            self.tx.meta, self.tx.data,
            np.array([1], dtype=np.uint64).view(np.uint8))   # an eventfd increment

    def poll(self):
        return driver_poll(self.ram.mem, self.geo, self.st, *self.arrays)

    def warm(self) -> None:
        """The data-path kernel once before the NIC is reported up, over empty
        rings in scratch memory and the (still down) tap, so nothing is lost."""
        mem = np.zeros(1 << 16, dtype=np.uint8)
        RG.ring_init(mem, 0, 16384)
        RG.ring_init(mem, 32768, 16384)
        RG.ring_begin_read(mem, 0, 16384)
        RG.ring_end_read(mem, 0, 16384)
        geo = self.geo.copy()
        geo[G_IN:G_OUT_DS + 1] = (0, 16384, 32768, 16384)
        geo[G_RECV:G_TX + 1] = 0
        geo[G_SIGNAL] = -1                   # nothing to ring
        driver_poll(mem, geo, np.zeros(NST, np.int64), *self.arrays)

    def _control(self) -> None:
        """A packet the data path does not take: the primary's go to the control
        path; on a subchannel the host sends none (d.3), so it is skipped."""
        if self.chan is self.nic:
            self.nic.handle_one()
            return
        inr = self.chan.inr
        inr.rpos = None
        if inr.read_packet() is not None:
            log.warning("subchannel %d: a packet that is not data, skipped", self.chan.index)
            if inr.commit_read():
                os.eventfd_write(self.chan.signal, 1)

    def tap_tx(self, on: bool) -> None:
        """Whether this channel sends the tap's frames to the host (off while a VF
        carries them): the loop stops reading its tap queue and stops waiting on it."""
        self.geo[G_TAP_TX] = int(on)
        if self.ep is not None:
            self.ep.modify(self.tapfd, select.EPOLLIN if on else 0)
        self.kick()

    def kick(self) -> None:
        os.eventfd_write(self.wake, 1)

    def call(self, fn) -> None:
        """Run ``fn`` on this channel's thread (writes to the host's ring are its own)."""
        self.requests.append(fn)
        self.kick()

    def run(self) -> None:
        """NAPI's shape: woken by the tap or the host's interrupt, the host's
        interrupts are masked while the driver drains both ways, then unmasked
        with a re-check (a.5.5), so a busy guest costs the host no signals."""
        ep = self.ep = select.epoll()
        irq = self.chan.interrupt
        ep.register(self.tapfd, select.EPOLLIN if self.geo[G_TAP_TX] else 0)
        ep.register(irq, select.EPOLLIN)
        ep.register(self.wake, select.EPOLLIN)
        mem, inr = self.ram.mem, self.chan.inr
        while True:
            for fd, _ in ep.poll(1.0):
                if fd == irq or fd == self.wake:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            while self.requests:
                self.requests.pop(0)()
            RG.ring_begin_read(mem, inr.base, inr.datasize)
            while True:
                _, why = self.poll()
                if why == CONTROL:
                    self._control()          # neither a completion nor a frame
                    continue
                if why == BLOCKED:
                    select.select([irq], [], [], 0.001)
                    continue
                if why < 0:
                    raise RuntimeError(f"the host's ring is corrupt ({why})")
                left = RG.ring_end_read(mem, inr.base, inr.datasize)
                if left < 0:
                    raise RuntimeError(f"the host's ring is corrupt ({left})")
                if left == 0:
                    break
                RG.ring_begin_read(mem, inr.base, inr.datasize)


def _run_thread(driver: Driver) -> None:
    try:
        driver.run()
    except BaseException:                     # a dead channel must not go unnoticed
        log.exception("channel data path stopped")
        os._exit(1)


def _limit_gso(ifname: str, caps: bytes) -> None:
    """Linux's netvsc caps its TSO size at the host's LSO maximum (the NDIS_OFFLOAD
    answer, e.6; rndis_netdev_set_hwcaps: netif_set_tso_max_size); the tap takes
    the same cap as its gso_max_size, so its stack never hands us larger frames,
    which NetVSP refuses (e.5)."""
    from pyroute2 import IPRoute

    from .layout import decode as decode_struct
    from . import rndis as R
    if len(caps) < R.NDIS_OFFLOAD.itemsize:
        return
    o = decode_struct(R.NDIS_OFFLOAD, caps)
    size = min(int(o["lsov2_ip4_maxsz"]), int(o["lsov2_ip6_maxsz"]))
    if size <= 0:
        return
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if idx:
            ipr.link("set", index=idx[0], gso_max_size=min(size, 65536))


class Guest:
    """A NetVSC NIC brought up in this process: the control channel to the host,
    guest RAM, the NIC, the tap queues and one data-path Driver per channel."""

    def __init__(self, ctl, ram, nic, link, tapfds, drivers):
        self.ctl, self.ram, self.nic, self.link = ctl, ram, nic, link
        self.tapfds, self.drivers, self.pages = tapfds, drivers, nic.pages


def parse_args(argv, prog: str):
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--ctl", type=int, required=True)
    ap.add_argument("--ifname", required=True)
    return ap.parse_args(argv)


def attach(a) -> Guest | None:
    """The attach message (guest RAM and the message port), then Linux's bring-up
    of the NIC, its channels and the tap; None if the host's attach message is
    not what it must be."""
    ctl = ControlChannel(socket.socket(fileno=a.ctl))
    got = ctl.recv(max_fds=2)
    if got is None or got[0].get("type") != "attach" or len(got[1]) != 2:
        log.error("expected an attach message with guest RAM and the message port")
        return None
    msg, (memfd, portfd) = got
    ram = GuestMemory(int(msg["ram"]), fd=memfd)
    client = VmbusClient(MessagePort(socket.socket(fileno=portfd)), timeout=HOST_START_S)
    client.connect()
    client.request_offers()
    nic = Netvsc(ram, client, GuestPages(ram.size), mtu=int(msg.get("mtu", 1500)),
                 recv_sections=int(msg.get("recv_sections", N.DEFAULT_RX)), timeout=HOST_START_S)
    link = nic.bring_up()
    # vRSS (g.1): as many channels as Linux would open, min(8, CPUs, host queues)
    nch = nic.open_subchannels(min(N.VRSS_CHANNEL_DEFAULT, len(os.sched_getaffinity(0))))
    nic.control_ids()
    # one tap queue per channel: the guest's stack spreads its flows over them as
    # Linux's netvsc spreads them over its queues (netvsc_pick_tx)
    tapfds = [open_tap(a.ifname, multi_queue=True) for _ in range(nch)]
    _limit_gso(a.ifname, link.offload_caps)
    # The tap's carrier follows the host's link indications (e.8), as Linux's
    # netvsc turns its netdev's carrier on and off.
    set_carrier(tapfds[0], link.connected)
    nic.on_link = lambda up: (set_carrier(tapfds[0], up),
                              log.info("link %s", "up" if up else "down"))
    # each channel sends from its own share of the send buffer's sections
    count = nic.send_section_count
    per = count // nch
    shares = [range(k * per, count if k == nch - 1 else (k + 1) * per) for k in range(nch)]
    drivers = [Driver(ram, nic, tapfds[0], None, shares[0])] + \
        [Driver(ram, nic, tapfds[k], nic.subchannels[k - 1], shares[k]) for k in range(1, nch)]
    for d in drivers:
        d.warm()
    return Guest(ctl, ram, nic, link, tapfds, drivers)


def run(g: Guest) -> None:
    """Report the NIC up to the host, then run every channel's data path."""
    g.ctl.send({"type": "up", "mac": g.link.mac.hex(), "mtu": g.link.mtu,
                "connected": g.link.connected, "channels": len(g.drivers)})
    log.info("%d channel(s)", len(g.drivers))
    for d in g.drivers[1:]:
        threading.Thread(target=_run_thread, args=(d,), daemon=True).start()
    g.drivers[0].run()


def main(argv=None) -> int:
    a = parse_args(argv, "python -m netvsp.netvsc_driver")
    logging.basicConfig(level=logging.INFO, format="netvsc %(levelname)s %(message)s")
    g = attach(a)
    if g is None:
        return 2
    run(g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
