"""The guest side of NIC kind ``sriov``: the NetVSC NIC with a VF as its transparent
fast path, one netdev for the guest's stack (vswitch_vmq_sriov.md 4.2, 4.3, 4.5;
vmbus_netvsp.md h; checklist 40).

The synthetic NIC comes up exactly as in netvsp.netvsc_driver and owns the VM's
tap. The VF arrives later, as a device on the VM's virtual PCI bus does: the host
sends ``pci_add`` on the control channel with a vfio-user socket and the VF's
serial; the VF driver (sriov.vf_driver) brings it up over that socket, DMA into
this guest RAM. As Linux's netvsc pairs a VF with its synthetic NIC (by serial,
and the MAC must match), once both the VF and the host's VF association are
there it asks for the VF data path (SWITCH_DATA_PATH), and when the host has
completed it:

- transmit: the tap's frames go through the VF (the synthetic channels stop
  reading their tap queues; the VF's loop reads them all, offloads kept);
- receive: from both, always: frames the host still sends on the synthetic
  path (from VMs without a VF, broadcasts) and the VF's.

The host takes the VF away with ``pci_eject`` (4.3's graceful removal):
transmit returns to the synthetic channels at once, the VF finishes what it was
given, the data path is switched back to synthetic (the host moves the filter
before completing), what the VF still received goes to the tap, the device is
closed, and ``pci_ejected`` answers. A host that forces the path back
(SWITCH_DATA_PATH from the host, or the association withdrawn) moves transmit
back the same way. Connections live on: the tap never changed.

    python -m sriov.netvsc_vf --ctl FD --ifname eth0
"""
from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time

from hypervisor.partition import GuestPages
from netvsp import netvsc_driver as ND
from netvsp import nvsp as N

from .vf_driver import TAP_BUF, TAP_DESC, TX_FULL, VfDriver, tap_footprint
from .vfio_user import Client

log = logging.getLogger("hvnet.netvsc_vf")
DRAIN_S = 0.2            # how long a going VF may take to finish what it posted
SWITCH_S = 2.0           # how long the host may take to complete SWITCH_DATA_PATH


class Failover:
    """The VF of one NetVSC NIC: added, paired, used, removed."""

    def __init__(self, g: ND.Guest):
        self.g = g
        self.vf: VfDriver | None = None
        self.client: Client | None = None
        self.serial: int | None = None
        self.vf_tx = False                   # the tap's frames go through the VF
        self.pending = False                 # a SWITCH_DATA_PATH to the VF awaits completion
        self.stop = False
        self.thread: threading.Thread | None = None
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # the VF's rings and buffers: set aside once, the same pages for every VF the
        # host hands this VM (a bump allocator would run out after a few re-adds)
        self.area_size = tap_footprint()
        self.area = g.pages.alloc(self.area_size)
        g.nic.on_vf = self._on_vf
        g.nic.on_datapath = lambda path: self._tx_via_vf(False)

    # ---- the primary channel's thread (it owns the ring to the host) ----------------
    def _on_vf(self, allocated: bool, serial: int) -> None:
        log.info("VF association: %s, serial %d", "allocated" if allocated else "withdrawn",
                 serial)
        if allocated:
            self._pair()
        else:
            self._tx_via_vf(False)

    def _pair(self) -> None:
        """Ask for the VF data path once the VF and its association are both here
        and their serials match (Linux's netvsc_vf_join, by serial)."""
        nic = self.g.nic
        if (self.vf is None or self.pending or not nic.vf_alloc
                or nic.vf_serial != self.serial or nic.datapath == N.DATAPATH_VF):
            return
        self.pending = True
        nic.request_data_path(N.DATAPATH_VF, self._switched)

    def _switched(self, path: int) -> None:
        self.pending = False
        if path == N.DATAPATH_VF and self.vf is not None:
            log.info("data path switched to VF")
            self._tx_via_vf(True)

    # ---- any thread ------------------------------------------------------------------
    def _tx_via_vf(self, on: bool) -> None:
        if on == self.vf_tx:
            return
        self.vf_tx = on
        for d in self.g.drivers:
            d.tap_tx(not on)
        os.eventfd_write(self.wake, 1)
        if not on:
            log.info("data path switched to synthetic")

    # ---- the control channel's thread --------------------------------------------------
    def serve(self) -> None:
        ctl = self.g.ctl
        while True:
            got = ctl.recv(max_fds=1)
            if got is None:
                os._exit(0)                  # the host is gone: so is this VM
            msg, fds = got
            kind = msg.get("type")
            if kind == "pci_add" and len(fds) == 1:
                try:
                    ok, why = self._add(int(msg.get("serial", -1)), fds[0])
                except Exception as e:       # this thread must live: the next add may work
                    log.exception("adding the VF failed")
                    ok, why = False, f"adding the VF failed: {e}"
                ctl.send({"type": "pci_added", "ok": ok, "why": why})
            elif kind == "pci_eject":
                for fd in fds:
                    os.close(fd)
                try:
                    self._remove()
                except Exception:
                    log.exception("removing the VF failed")
                ctl.send({"type": "pci_ejected"})
            else:
                for fd in fds:
                    os.close(fd)
                log.warning("control message not understood: %r", msg)

    def _add(self, serial: int, fd: int) -> tuple[bool, str]:
        if self.vf is not None:
            os.close(fd)
            return False, "a VF is already here"
        client = Client(socket.socket(fileno=fd), timeout=30)
        pages = GuestPages(self.area + self.area_size, start=self.area)
        drv = None
        try:
            client.version()
            drv = VfDriver(client, self.g.ram, pages, rx_buf=TAP_BUF, ndesc=TAP_DESC)
            mac = drv.bring_up(own_mac=self.g.link.mac)
        except Exception as e:               # a VF that does not come up is not used
            log.warning("the VF did not come up: %s", e)
            if drv is not None:
                drv.close()
            client.close()
            return False, f"the VF did not come up: {e}"
        if mac != self.g.link.mac:
            # Linux pairs a VF with its synthetic NIC only when the MACs match
            drv.close()
            client.close()
            return False, f"the VF's MAC {mac.hex(':')} is not the NIC's"
        drv.attach_tap(self.g.tapfds)
        drv.tap_io(False)                    # compile the loops before traffic
        self.client, self.vf, self.serial, self.stop = client, drv, serial, False
        self.thread = threading.Thread(target=self._loop, args=(drv,), name="vf",
                                       daemon=True)
        self.thread.start()
        log.info("VF up, serial %d", serial)
        self.g.drivers[0].call(self._pair)
        return True, ""

    def _remove(self) -> None:
        """The host asks for the VF back (4.3's graceful removal), as Linux's netvsc
        lets a VF go: transmit back to the synthetic channels, what the VF was
        given finished (or given up after DRAIN_S), the data path switched to
        synthetic (the host moves the filter back before it completes), what the
        VF still received handed to the tap, then the device closed."""
        self._tx_via_vf(False)
        drv = self.vf
        if drv is None:
            return
        deadline = time.monotonic() + DRAIN_S
        while drv.tx_pending() and time.monotonic() < deadline:
            time.sleep(0.002)
        nic = self.g.nic
        if nic.datapath == N.DATAPATH_VF:
            done = threading.Event()
            self.g.drivers[0].call(
                lambda: nic.request_data_path(N.DATAPATH_SYNTHETIC, lambda p: done.set()))
            if not done.wait(SWITCH_S):
                log.warning("the host did not complete the switch to synthetic")
        self.stop = True
        os.eventfd_write(self.wake, 1)
        if self.thread is not None:
            self.thread.join(5)
        self.vf = None
        drv.close()
        self.client.close()
        self.client = None
        log.info("VF removed")

    # ---- the VF's own thread ---------------------------------------------------------
    def _loop(self, drv: VfDriver) -> None:
        try:
            self._run(drv)
        except BaseException:
            log.exception("the VF's data path stopped")
            self._tx_via_vf(False)

    def _run(self, drv: VfDriver) -> None:
        ep = select.epoll()
        ep.register(drv.irq, select.EPOLLIN)
        ep.register(self.wake, select.EPOLLIN)
        taps = [int(fd) for fd in drv.tapfds]
        for fd in taps:
            ep.register(fd, 0)
        watching = False
        while not self.stop:
            tx = self.vf_tx
            if tx != watching:
                for fd in taps:
                    ep.modify(fd, select.EPOLLIN if tx else 0)
                watching = tx
            for fd, _ in ep.poll(1.0):
                if fd == drv.irq or fd == self.wake:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            while not self.stop:
                got, sent, why = drv.tap_io(self.vf_tx)
                if got or sent:
                    continue
                if why == TX_FULL:           # the device has our frames: wait for DD
                    select.select([drv.irq], [], [], 0.001)
                    continue
                break
        drv.tap_io(False)                    # what arrived last still reaches the stack
        ep.close()


def main(argv=None) -> int:
    a = ND.parse_args(argv, "python -m sriov.netvsc_vf")
    logging.basicConfig(level=logging.INFO, format="netvsc_vf %(levelname)s %(message)s")
    g = ND.attach(a)
    if g is None:
        return 2
    f = Failover(g)
    threading.Thread(target=f.serve, name="control", daemon=True).start()
    ND.run(g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
