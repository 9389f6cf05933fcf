"""The NetVSC driver process: a synthetic NIC's guest side, inside the VM's namespace.

Started by the host's runtime in the VM's network namespace with one end of the
partition's control channel. It receives guest RAM (a memfd) and the SynIC
message port by SCM_RIGHTS, brings the NIC up as Linux does (netvsp.netvsc),
then owns the VM's tap (IFF_VNET_HDR, offloads on) and moves frames between the
tap and the VMBus rings in compiled loops:

- tap -> host: frames are read into a transmit arena in guest RAM, each with
  HEADROOM bytes free before it, and put on the ring by ``netvsc_transmit``;
  the arena is reused once the host has completed the GPA-direct frames in it;
- host -> tap: ``netvsc_receive`` copies the frames out of the receive buffer
  and completes them; they go to the tap with one writev() each (the switch's
  ``tap_transmit``, a tag put back inline).
Completions of our sends are taken by ``netvsc_reclaim``; anything else the host
sends (control replies, link indications) is handled by the control path.

    python -m netvsp.netvsc_driver --ctl FD --ifname eth0
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys

import numpy as np

from hypervisor.partition import ControlChannel, GuestMemory
from hypervisor.synic import MessagePort
from switch.batch import (CSUM_OFF, CSUM_START, D_TAGGED, F_CSUM_PARTIAL, F_CSUM_VALID, F_VLAN,
                          FLAGS, GSO_SIZE, GSO_TYPE, ROW_PAD, TCI, PacketBatch, init_packet)
from switch.kernel import kernel
from switch.syscalls import read
from switch.tap import VNET_HDR, open_tap, set_carrier, tap_transmit

from . import datapath as D
from . import nvsp as N
from .netvsc import Netvsc
from .netvsc_datapath import (HEADROOM, RX_CONTROL, RX_OK, netvsc_receive, netvsc_reclaim,
                              netvsc_transmit)
from .vmbus import ring as RG
from .vmbus.client import GuestPages, VmbusClient

log = logging.getLogger("hvnet.netvsc")
TX_SLOTS = 64
SLOT = 65536 + 64 + HEADROOM + 64        # a super-packet, its tag, headroom, alignment


@kernel
def tap_read_slots(fd, meta, data, nslots, slot, headroom):
    """Read ready frames from the tap, one per arena slot with ``headroom`` free
    before the frame (the virtio header lands in its last 10 bytes)."""
    n = 0
    cap = min(nslots, meta.shape[1] - ROW_PAD)
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
    return n


@kernel
def rx_plan(meta, n, plan, span):
    """Deliveries for the tap: every frame, a tag the host sent out of band put
    back on (D_TAGGED), as port 0 of tap_transmit's plan."""
    span[0, 0] = 0
    span[0, 1] = n
    for i in range(n):
        plan[0, i] = i
        d = 0
        if meta[FLAGS, i] & F_VLAN:
            d = D_TAGGED | (meta[TCI, i] << 48)
        plan[1, i] = d


class Driver:
    def __init__(self, ram: GuestMemory, nic: Netvsc, tapfd: int):
        self.ram, self.nic, self.tapfd = ram, nic, tapfd
        mem = ram.mem
        self.tx_gpa = nic.pages.alloc(TX_SLOTS * SLOT)
        self.tx = PacketBatch(TX_SLOTS, arena=TX_SLOTS * SLOT)
        self.tx.data = mem[self.tx_gpa:self.tx_gpa + TX_SLOTS * SLOT]
        # room for a transfer-page packet's every range (Linux's NVSP_RSC_MAX, b.5)
        self.rx = PacketBatch(576, arena=8 << 20)
        count = nic.send_section_count
        self.free = np.arange(count, dtype=np.int64)
        self.nfree = np.array([count], dtype=np.int64)
        self.busy = np.zeros(count, dtype=np.uint8)
        self.bufs = np.zeros((1, 2), dtype=np.int64)
        self.nvsp = np.zeros(16, dtype=np.uint8)
        self.txstats = np.zeros(4, dtype=np.int64)
        self.desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
        self.ranges = np.zeros((562, 2), dtype=np.int64)
        self.comp = np.zeros((512, 2), dtype=np.int64)
        self.ncomp = 0
        self.rxstats = np.zeros(8, dtype=np.int64)
        self.gpa_done = np.zeros(1, dtype=np.int64)
        self.rs = np.zeros(2, dtype=np.int64)
        self.plan = np.zeros((2, 576), dtype=np.int64)
        self.span = np.zeros((1, 2), dtype=np.int64)
        self.port_ids = np.zeros(1, dtype=np.int64)
        self.fds = np.array([tapfd], dtype=np.int64)
        self.hdr = np.zeros(32, dtype=np.uint8)
        self.iov = np.zeros(8, dtype=np.int64)
        self.ctr = np.zeros((1, 1024), dtype=np.int64)
        self.msg = np.zeros(8, dtype=np.uint8)
        self.nvsp8 = np.zeros(8, dtype=np.uint8)

    def warm(self) -> None:
        """Every data-path kernel once before the NIC is reported up: over an empty
        ring in scratch memory, and the (still down) tap, so nothing is lost."""
        mem = np.zeros(1 << 16, dtype=np.uint8)
        RG.ring_init(mem, 0, 16384)
        RG.ring_begin_read(mem, 0, 16384)
        RG.ring_end_read(mem, 0, 16384)
        rs = np.zeros(2, dtype=np.int64)
        netvsc_reclaim(mem, 0, 16384, rs, self.desc, self.free, self.nfree, self.busy,
                       np.zeros(1, np.int64))
        netvsc_receive(mem, 0, 16384, rs, self.desc, self.ranges, 0, 0, self.rx.meta,
                       self.rx.data, 0, 0, self.comp, 0, self.rxstats, self.nvsp8)
        netvsc_transmit(mem, 0, 16384, self.tx.meta, self.tx.data, 0, 0, 0, 0, 6144,
                        self.free, self.nfree, self.busy, self.bufs, self.nvsp,
                        np.zeros(4, np.int64))
        D.write_completions(mem, 0, 16384, self.comp, 0, 0, self.msg)
        tap_read_slots(self.tapfd, self.tx.meta, self.tx.data, 0, SLOT, HEADROOM)
        rx_plan(self.rx.meta, 0, self.plan, self.span)
        tap_transmit(self.rx.meta, self.rx.data, self.plan, self.span, self.port_ids,
                     self.fds, self.hdr, self.iov, self.ctr)

    def _from_host(self) -> int:
        """Completions, received frames, then whatever the control path takes."""
        nic, mem = self.nic, self.ram.mem
        base, ds = nic.inr.base, nic.inr.datasize
        moved = 0
        for _ in range(64):
            start = RG.ring_read_pos(mem, base, ds)
            if start < 0:
                raise RuntimeError(f"the host's ring is corrupt ({start})")
            self.rs[0] = start
            got = netvsc_reclaim(mem, base, ds, self.rs, self.desc, self.free, self.nfree,
                                 self.busy, self.gpa_done)
            n, _, self.ncomp, why = netvsc_receive(mem, base, ds, self.rs, self.desc,
                                                   self.ranges, nic.recv_gpa, nic.recv_size,
                                                   self.rx.meta, self.rx.data, 0, 0, self.comp,
                                                   self.ncomp, self.rxstats, self.nvsp8)
            if self.rs[0] != start:
                if RG.ring_read_commit(mem, base, ds, self.rs[0], start) == 1:
                    os.eventfd_write(nic.signal, 1)
            if n:
                rx_plan(self.rx.meta, n, self.plan, self.span)
                tap_transmit(self.rx.meta, self.rx.data, self.plan, self.span, self.port_ids,
                             self.fds, self.hdr, self.iov, self.ctr)
            self._complete()
            moved += got + n
            if why < 0:
                raise RuntimeError(f"the host's ring is corrupt ({why})")
            if why == RX_CONTROL and got == 0 and n == 0:
                nic.handle_one()         # neither a completion nor a frame: control
                moved += 1
            elif got == 0 and n == 0 and why == RX_OK:
                break
        return moved

    def _complete(self) -> None:
        if not self.ncomp:
            return
        out = self.nic.out
        w, sig = D.write_completions(self.ram.mem, out.base, out.datasize, self.comp, 0,
                                     self.ncomp, self.msg)
        if w:
            self.comp[:self.ncomp - w] = self.comp[w:self.ncomp]
            self.ncomp -= w
        if sig:
            os.eventfd_write(self.nic.signal, 1)

    def _to_host(self) -> int:
        if self.txstats[1] > self.gpa_done[0]:
            return 0                     # the arena still holds frames the host reads
        n = tap_read_slots(self.tapfd, self.tx.meta, self.tx.data, TX_SLOTS, SLOT, HEADROOM)
        start = 0
        nic = self.nic
        while start < n:
            nxt, sig = netvsc_transmit(self.ram.mem, nic.out.base, nic.out.datasize,
                                       self.tx.meta, self.tx.data, self.tx_gpa, n, start,
                                       nic.send_gpa, nic.send_section_size, self.free,
                                       self.nfree, self.busy, self.bufs, self.nvsp,
                                       self.txstats)
            if sig:                      # the ring was empty and the host unmasked (a.4.6)
                os.eventfd_write(nic.signal, 1)
            if nxt == start:
                self._from_host()        # the ring or the sections are full: make room
                select.select([nic.interrupt], [], [], 0.001)
            start = nxt
        return n

    def run(self) -> None:
        """NAPI's shape: woken by the tap or the host's interrupt, the host's
        interrupts are masked while the driver drains both ways, then unmasked
        with a re-check (a.5.5), so a busy guest costs the host no signals."""
        ep = select.epoll()
        ep.register(self.tapfd, select.EPOLLIN)
        ep.register(self.nic.interrupt, select.EPOLLIN)
        mem, inr = self.ram.mem, self.nic.inr
        while True:
            for fd, _ in ep.poll(1.0):
                if fd == self.nic.interrupt:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            RG.ring_begin_read(mem, inr.base, inr.datasize)
            while True:
                while self._from_host() + self._to_host():
                    pass
                left = RG.ring_end_read(mem, inr.base, inr.datasize)
                if left < 0:
                    raise RuntimeError(f"the host's ring is corrupt ({left})")
                if left == 0:
                    break
                RG.ring_begin_read(mem, inr.base, inr.datasize)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netvsp.netvsc_driver")
    ap.add_argument("--ctl", type=int, required=True)
    ap.add_argument("--ifname", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="netvsc %(levelname)s %(message)s")
    ctl = ControlChannel(socket.socket(fileno=a.ctl))
    got = ctl.recv(max_fds=2)
    if got is None or got[0].get("type") != "attach" or len(got[1]) != 2:
        log.error("expected an attach message with guest RAM and the message port")
        return 2
    msg, (memfd, portfd) = got
    ram = GuestMemory(int(msg["ram"]), fd=memfd)
    client = VmbusClient(MessagePort(socket.socket(fileno=portfd)), timeout=60)
    client.connect()
    client.request_offers()
    nic = Netvsc(ram, client, GuestPages(ram.size), mtu=int(msg.get("mtu", 1500)),
                 recv_sections=int(msg.get("recv_sections", N.DEFAULT_RX)), timeout=60)
    link = nic.bring_up()
    tapfd = open_tap(a.ifname)
    # The tap's carrier follows the host's link indications (e.8), as Linux's
    # netvsc turns its netdev's carrier on and off.
    set_carrier(tapfd, link.connected)
    nic.on_link = lambda up: (set_carrier(tapfd, up),
                              log.info("link %s", "up" if up else "down"))
    driver = Driver(ram, nic, tapfd)
    driver.warm()
    ctl.send({"type": "up", "mac": link.mac.hex(), "mtu": link.mtu,
              "connected": link.connected})
    driver.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
