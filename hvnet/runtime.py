"""A topology brought up in network namespaces, with its switches running.

What ``up`` builds, every name carrying the topology's prefix ``<name>-``:

- each VM: namespace ``<name>-<vm>``; each NIC ``k`` the tap ``eth<k>`` there, with
  the NIC's MAC, MTU, addresses and gateway. The NIC's provider serves it (kind
  ``tap``: the tap itself is the switch port).
- each host vNIC (internal port): namespace ``<name>-<ns>`` and the tap
  ``vEth-<switch>`` in it, served by the switch (vswitch_vmq_sriov.md 2.1).
- each switch with a simulated uplink: namespace ``<name>-<switch>-lan`` stands for
  the physical network. The veth ``uplink`` there is the external port (read and
  written through AF_PACKET rings); its peer ``wire`` is the physical network's
  side: a Linux bridge ``lan`` with, per physical host P, a veth ``p-<P>`` whose
  peer is ``eth0`` in namespace ``<name>-<P>``. When a physical host sits on a
  tagged VLAN, the physical network is instead a plain L2 switch of hvnet's own
  (``<switch>-lan``: built-in forwarding, the wire as its trunk, each host a tap
  on an access port), because the kernel's bridge cannot tag without 802.1Q
  support. An uplink with ``interface:`` uses that existing interface instead.

Each switch runs its data path (``Switch.run``) in a thread of its own; the
kernels release the GIL. Control operations (a port added, a property changed, a
capture started) take the switch's data-path lock, so they fall between batches.
Everything is recorded as it is created (hvnet.netns), so a crashed run can be
removed by ``hvnet clean``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import select
import socket
import threading
import time
from pathlib import Path

from pyroute2 import netns as pr_netns

from switch.afpacket import PacketRingPorts, RingSocket
from switch.port import mac_to_str
from switch.rxfilter import filter_vlan
from switch.switch import Switch
from switch.tap import TapPorts, open_tap

from .capture import PortCapture
from .netns import Netns
from .topology import HostNic, Nic, PortSettings, Topology, TopologyError

MAX_PORTS = 256
log = logging.getLogger("hvnet.daemon")


class RuntimeError_(RuntimeError):
    """A request the running topology cannot carry out; the message says why."""


def _in_ns(ns: str | None, fn, *a):
    """Call ``fn`` with this thread in namespace ``ns`` (sockets and fds opened there
    stay bound to it), then come back."""
    if ns is None:
        return fn(*a)
    pr_netns.pushns(ns)
    try:
        return fn(*a)
    finally:
        pr_netns.popns()


def host_mac(topology: str, key: str) -> str:
    """A stable locally administered MAC for a host vNIC the file gave none."""
    h = hashlib.sha256(f"{topology}/{key}".encode()).digest()
    return "02:48:56:" + ":".join(f"{b:02x}" for b in h[:3])


class VmNic:
    """What every NIC provider knows of its NIC: the VM's namespace, the tap
    ``eth<k>`` there, and the switch port's name."""

    def __init__(self, rt: "Runtime", nic: Nic):
        self.rt, self.nic = rt, nic
        self.ns = rt.nn.name(nic.vm)
        self.ifname = f"eth{nic.index}"
        self.port_name = f"{nic.vm}.{self.ifname}"


class TapNic(VmNic):
    """NIC kind ``tap``: the VM's tap device is the switch port itself."""

    def attach(self):
        rt, ps = self.rt, self.nic.port
        rt.make_tap(self.ns, self.ifname, mac_to_str(ps.mac), ps)
        return rt.add_tap_port(self.nic.switch, self.port_name, "synthetic", self.ns,
                               self.ifname, ps)


class PartitionNic(VmNic):
    """A NIC whose guest side is a driver process in the VM's namespace, over a
    partition: guest RAM (a memfd) and a control channel, the tap ``eth<k>``
    made here and owned by the driver. Subclasses say which driver runs and
    build the host side (``host``), the descriptors the driver gets besides
    guest RAM, and the switch port."""
    RAM = 64 << 20
    DRIVER = ""              # the guest driver's module
    WHAT = ""                # how it is named in messages and the run directory
    PORT_TYPE = ""
    MULTI_QUEUE = False      # the tap has a queue per channel (vRSS)
    kind_of: str = ""        # the Runtime attribute holding this NIC kind per switch

    def attach(self):
        import subprocess
        import sys

        from hypervisor.partition import ControlChannel, GuestMemory

        from . import nsexec
        from .rundir import RunDir
        rt, ps = self.rt, self.nic.port
        rt.nn.add_tap(self.ns, self.ifname, multi_queue=self.MULTI_QUEUE)
        rt.nn.set_mac(self.ns, self.ifname, mac_to_str(ps.mac))
        rt.nn.set_mtu(self.ns, self.ifname, ps.mtu)
        for a in ps.addresses:
            rt.nn.add_address(self.ns, self.ifname, a)
        self.ram = GuestMemory(self.RAM, name=f"{self.port_name}-ram")
        guest_fds = self.host()
        ctl, guest_ctl = ControlChannel.pair()
        self.proc = nsexec.popen(self.ns, [sys.executable, "-m", self.DRIVER,
                                           "--ctl", str(guest_ctl.fileno()),
                                           "--ifname", self.ifname],
                                 pass_fds=[guest_ctl.fileno()], stdin=subprocess.DEVNULL)
        RunDir(rt.state_dir.name, rt.state_dir.parent).record_process(
            self.proc.pid, f"{self.WHAT} driver of {self.port_name}")
        guest_ctl.close()
        ctl.send({"type": "attach", "ram": self.RAM, "mtu": ps.mtu},
                 [self.ram.fd, *[f.fileno() if hasattr(f, "fileno") else f for f in guest_fds]])
        for f in guest_fds:
            if hasattr(f, "close"):
                f.close()
        self.ctl = ctl
        sw = rt.switches[self.nic.switch]
        kind = getattr(rt, self.kind_of)[self.nic.switch]
        with sw._dp_lock:
            port = sw.add_port(self.port_name, self.PORT_TYPE, mac=ps.mac, mtu=ps.mtu,
                               kind=kind, properties=ps.properties())
            if port is None:
                raise RuntimeError_(f"switch {self.nic.switch!r} refused port "
                                    f"{self.port_name!r} (an extension vetoed it)")
            self.attach_port(kind, port)
        rt.port_switch[self.port_name] = self.nic.switch
        rt.port_ns[self.port_name] = (self.ns, self.ifname)
        rt.after_start.append(self._wait_up)
        return port

    def _wait_up(self):
        """The driver brings the NIC up while the data path runs; then the tap's
        link, addresses and routes are set in the VM."""
        if not select.select([self.ctl.fileno()], [], [], 300)[0]:
            raise RuntimeError_(f"{self.port_name}: the {self.WHAT} driver did not come up")
        got = self.ctl.recv()
        if got is None or got[0].get("type") != "up":
            raise RuntimeError_(f"{self.port_name}: the {self.WHAT} driver failed ({got})")
        ps = self.nic.port
        self.rt.nn.set_up(self.ns, self.ifname)
        if ps.gateway:
            self.rt.nn.add_route(self.ns, "default", ps.gateway)

    def detach(self):
        from . import nsexec
        nsexec.stop(self.proc)
        self.ctl.close()


class SyntheticNic(PartitionNic):
    """NIC kind ``synthetic``: a partition with the SynIC message port and a VMBus
    server, a NetVSP device on the host, the NetVSC driver process in the VM
    (netvsp.netvsc_driver)."""
    DRIVER, WHAT, PORT_TYPE, kind_of = "netvsp.netvsc_driver", "NetVSC", "synthetic", \
        "synthetic"
    MULTI_QUEUE = True
    RAM = 128 << 20          # room for a ring pair and a transmit arena per vRSS channel

    def host(self):
        from hypervisor.synic import MessagePort
        from netvsp.netvsp import NetvspDevice
        from netvsp.vmbus.server import VmbusServer
        host_port, guest_port = MessagePort.pair()
        self.server = VmbusServer(host_port, self.ram)
        self.device = NetvspDevice(self.ram, self.server, self.nic.port.mac,
                                   mtu=self.nic.port.mtu)
        return [guest_port]

    def attach_port(self, kind, port):
        kind.attach(port, self.device, self.server)

    def set_link(self, up: bool) -> None:
        self.device.indicate_link(up)


class E1000VmNic(PartitionNic):
    """NIC kind ``e1000``: an emulated Intel 82540EM; the device model on the host
    (netvsp.e1000), reached by intercepts, interrupting through an eventfd; the
    e1000 guest driver process in the VM (netvsp.e1000.driver)."""
    DRIVER, WHAT, PORT_TYPE, kind_of = "netvsp.e1000.driver", "e1000", "emulated", "emulated"

    def host(self):
        from hypervisor import intercept
        from hypervisor.partition import Doorbell
        from netvsp.e1000.port import E1000Nic
        host_io, guest_io = intercept.pair()
        self.irq = Doorbell()
        self.device = E1000Nic(self.ram.mem, self.nic.port.mac.to_bytes(6, "big"), host_io,
                               self.irq)
        return [guest_io, self.irq.fd]

    def attach_port(self, kind, port):
        kind.attach(port, self.device)

    def set_link(self, up: bool) -> None:
        self.device.dev.set_link(up)      # under the switch's data-path lock (set_link)


class SriovVmNic(SyntheticNic):
    """NIC kind ``sriov``: a synthetic NIC (its NetVSP device, the switch port) whose
    guest driver (sriov.netvsc_vf) also takes a VF of the switch's SR-IOV uplink
    when one is free, as Hyper-V assigns one to an IOV-enabled vNIC
    (vswitch_vmq_sriov.md 4.2, 4.3; checklist 38-40). Without a free VF it stays
    synthetic, like a VM beyond the NIC's VFs.

    Assignment: the VF reset, its VPort created, the NIC's MAC as its admin MAC;
    the VF goes to the VM (``pci_add`` with a vfio-user socket), then the VF
    association (NVSP 128). The data path moves when the guest asks
    (SWITCH_DATA_PATH, 129): the vNIC's filter moves between the default VPort
    and the VF's. Removal: the guest asked to let the VF go (``pci_eject``: it
    switches back to synthetic, the filter follows), a surprise removal after
    EJECT_S (NetVSP's withdraw_vf moves data path and filter back itself), the
    association withdrawn, then the VPort deleted and the VF reset and freed."""
    DRIVER, WHAT = "sriov.netvsc_vf", "NetVSC+VF"
    RAM = 160 << 20          # a synthetic NIC's, and the VF's rings and buffers
    EJECT_S = 5.0
    ADD_S = 120.0            # the guest's VF driver may compile its loops first

    def host(self):
        fds = super().host()
        self.sriov = self.rt.sriov[self.nic.switch]
        self.vf: int | None = None
        self.vport: int | None = None
        self.mac = self.nic.port.mac      # its filter: on the default VPort (Runtime._pf_filter)
        self.device.on_data_path = self._data_path
        self.ctl_lock = threading.Lock()
        return fds

    def attach(self):
        port = super().attach()
        self.rt.after_start.append(self._first_vf)
        return port

    def _first_vf(self):
        try:
            self.vf_add()
        except RuntimeError_ as e:
            self.rt.vf_notes[self.port_name] = str(e)
            log.warning("%s", e)

    def _data_path(self, channel, path) -> bool:
        """NetVSP's backend for SWITCH_DATA_PATH (on the switch's data-path thread,
        which also steers VF frames): the filter to the VF's VPort or back."""
        from netvsp import nvsp as N
        from sriov.eswitch import DEFAULT_VPORT
        es = self.sriov.eswitch
        if path == N.DATAPATH_VF:
            if self.vport is None:
                return False
            es.move_filters(self.mac, DEFAULT_VPORT, self.vport)
        elif self.vport is not None:
            es.move_filters(self.mac, self.vport, DEFAULT_VPORT)
        return True

    def _reply(self, want: str, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.ctl.fileno()], [], [], left)[0]:
                return None
            got = self.ctl.recv()
            if got is None:
                return None
            for fd in got[1]:
                os.close(fd)
            if got[0].get("type") == want:
                return got[0]

    def vf_add(self) -> str:
        from sriov.ixgbevf import VfPolicy
        with self.ctl_lock:
            if self.vf is not None:
                return f"{self.port_name}: VF {self.vf} is already assigned"
            nic, sw = self.sriov, self.rt.switches[self.nic.switch]
            taken = {p.vf for provs in self.rt.nics.values() for p in provs
                     if isinstance(p, SriovVmNic) and p.vf is not None}
            free = [k for k in range(len(nic.vfs)) if k not in taken]
            if not free:
                raise RuntimeError_(f"{self.port_name}: every VF of switch "
                                    f"{self.nic.switch!r}'s uplink is assigned: the NIC "
                                    "stays synthetic")
            k = free[0]
            with sw._dp_lock:
                nic.vfs[k].reset()
                nic.vfs[k].policy = VfPolicy(self.mac.to_bytes(6, "big"))
                self.vport = nic.eswitch.create_vport(k)
                self.vf = k
            host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            nic.serve(k, host_end)
            self.ctl.send({"type": "pci_add", "serial": k + 1}, [guest_end.fileno()])
            guest_end.close()
            got = self._reply("pci_added", self.ADD_S)
            if got is None or not got.get("ok"):
                self._free(k, sw)
                why = "no answer" if got is None else got.get("why", "refused")
                raise RuntimeError_(f"{self.port_name}: the guest did not take VF {k} "
                                    f"({why}): the NIC stays synthetic")
            with sw._dp_lock:
                offered = self.device.offer_vf(k + 1)
            self.rt.vf_notes.pop(self.port_name, None)
            return (f"{self.port_name}: VF {k} assigned" +
                    ("" if offered else " (the guest cannot team with a VF yet)"))

    def vf_remove(self) -> str:
        with self.ctl_lock:
            if self.vf is None:
                return f"{self.port_name}: no VF to remove"
            k, sw = self.vf, self.rt.switches[self.nic.switch]
            # 4.3: the guest lets the VF go first (it switches its data path back,
            # and the filter follows); on a timeout it is taken (surprise removal)
            self.ctl.send({"type": "pci_eject"})
            ejected = self._reply("pci_ejected", self.EJECT_S) is not None
            with sw._dp_lock:
                self.device.withdraw_vf()        # data path and filter back, if not yet
            self._free(k, sw)
            return (f"{self.port_name}: VF {k} removed" +
                    ("" if ejected else " (surprise removal: the guest did not answer)"))

    def _free(self, k: int, sw) -> None:
        from sriov.eswitch import DEFAULT_VPORT
        es = self.sriov.eswitch
        with sw._dp_lock:
            if self.vport is not None:
                es.move_filters(self.mac, self.vport, DEFAULT_VPORT)
                for f, _, _ in es.filters(self.vport):      # what the VF's mailbox set
                    es.clear_filter(f)
                es.delete_vport(self.vport)
            self.vport = None
        self.sriov.unserve(k)                              # FLR
        self.vf = None

    def info(self) -> dict:
        from netvsp import nvsp as N
        return {"vf": self.vf, "vport": self.vport,
                "datapath": "vf" if self.device.datapath == N.DATAPATH_VF else "synthetic"}

    def detach(self):
        if self.vf is not None and self.proc.poll() is None:
            try:
                self.vf_remove()
            except Exception:
                log.warning("%s: VF removal failed", self.port_name, exc_info=True)
        super().detach()


NIC_PROVIDERS = {"tap": TapNic, "synthetic": SyntheticNic, "e1000": E1000VmNic,
                 "sriov": SriovVmNic}


class Runtime:
    def __init__(self, topo: Topology, state_dir: Path):
        self.topo = topo
        self.state_dir = Path(state_dir)
        self.nn = Netns(topo.name, self.state_dir / "netns.json")
        self.switches: dict[str, Switch] = {}
        self.taps: dict[str, TapPorts] = {}
        self.rings: dict[str, PacketRingPorts] = {}
        self.synthetic: dict = {}
        self.emulated: dict = {}
        self.after_start: list = []
        self.port_switch: dict[str, str] = {}        # port name -> switch name
        self.port_ns: dict[str, tuple] = {}          # port name -> (namespace, ifname)
        self.nics: dict[str, list] = {}               # vm -> providers
        self.captures: dict[int, PortCapture] = {}
        self.links_down: set[str] = set()
        self._next_capture = 1
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.errors: list[str] = []
        self.started = None
        self.vmqs: dict = {}                         # switch -> switch.vmq.Vmq
        self.vmq_workers: dict = {}                  # switch -> its queues' workers
        self.vmq_notes: dict[str, str] = {}          # switch or port -> why it has no VMQ
        self.sriov: dict = {}                        # switch -> sriov.nic.SriovNic
        self.vf_notes: dict[str, str] = {}           # port -> why it has no VF
        self.pf_filters: dict[str, tuple] = {}       # port -> (switch, default-VPort filter)

    # ---------------------------------------------------------------- building
    def make_tap(self, ns: str, ifname: str, mac: str, ps: PortSettings) -> None:
        nn = self.nn
        nn.add_tap(ns, ifname)
        nn.set_mac(ns, ifname, mac)
        nn.set_mtu(ns, ifname, ps.mtu)
        for a in ps.addresses:
            nn.add_address(ns, ifname, a)
        nn.set_up(ns, ifname)
        if ps.gateway:
            nn.add_route(ns, "default", ps.gateway)

    def add_tap_port(self, sw_name: str, port_name: str, ptype: str, ns: str, ifname: str,
                     ps: PortSettings):
        sw = self.switches[sw_name]
        fd = _in_ns(ns, open_tap, ifname)
        try:
            with sw._dp_lock:
                port = sw.add_port(port_name, ptype, mac=ps.mac or 0, mtu=ps.mtu,
                                   kind=self.taps[sw_name], properties=ps.properties())
                if port is None:
                    raise RuntimeError_(f"switch {sw_name!r} refused port {port_name!r} "
                                        "(an extension vetoed it)")
                self.taps[sw_name].attach(port, fd)
        except BaseException:
            os.close(fd)
            raise
        self.port_switch[port_name] = sw_name
        self.port_ns[port_name] = (ns, ifname)
        return port

    def _switch(self, spec) -> None:
        sw = Switch(spec.name, max_ports=MAX_PORTS)
        self.switches[spec.name] = sw
        self.taps[spec.name] = sw.add_kind(TapPorts())
        if spec.uplink and spec.uplink.get("sriov"):
            # the uplink is an SR-IOV NIC: its PF is the external port (4.1)
            from sriov.nic import SriovNic
            from sriov.uplink import SriovUplinkPorts
            nic = SriovNic(spec.uplink["sriov"]["vfs"])
            self.sriov[spec.name] = nic
            self.rings[spec.name] = sw.add_kind(SriovUplinkPorts(nic))
        else:
            self.rings[spec.name] = sw.add_kind(PacketRingPorts())
        from netvsp.e1000.port import EmulatedPorts
        from netvsp.synthetic_port import SyntheticPorts
        self.synthetic[spec.name] = sw.add_kind(SyntheticPorts())
        self.emulated[spec.name] = sw.add_kind(EmulatedPorts())
        for e in spec.extensions:
            mod, _, cls = e.target.partition(":")
            try:
                import importlib
                ext = getattr(importlib.import_module(mod), cls)(**e.args)
            except Exception as exc:
                raise TopologyError(self.topo.source, f"switches.{spec.name}.extensions",
                                    f"cannot create {e.type!r}: {exc}") from exc
            sw.install(ext)

    def _uplink(self, spec) -> None:
        up = spec.uplink
        nn = self.nn
        mtu = up.get("mtu", 1500)
        if "interface" in up:
            ns, ifname = None, up["interface"]
        else:
            ns = nn.add_namespace(f"{spec.name}-lan")
            nn.add_veth((ns, "uplink"), (ns, "wire"))
            for i in ("uplink", "wire"):
                nn.set_mtu(ns, i, mtu)
            if self._tagged_lan(spec.name):
                self._lan_switch(spec.name, ns, mtu)
            else:
                nn.add_bridge(ns, "lan")
                nn.set_mtu(ns, "lan", mtu)
                nn.set_master(ns, "wire", "lan")
                nn.set_up(ns, "lan")
            for i in ("wire", "uplink"):
                nn.set_up(ns, i)
            ifname = "uplink"
        port = self._ring_port(spec.name, f"{spec.name}.uplink", ns, ifname, mtu,
                               up.get("offloads", True), up.get("tpacket", 2))
        if up.get("vmq"):
            self._vmq(spec, port, ns, ifname)

    def _vmq(self, spec, port, ns, ifname) -> None:
        """VMQ on the uplink, unless the link is slower than the topology allows
        (Hyper-V turns VMQ off under 10 Gb/s: vswitch_vmq_sriov.md 3.1)."""
        from pyroute2.ethtool import Ethtool

        from switch.vmq import Vmq
        cfg = spec.uplink["vmq"]
        least = cfg.get("min_link_mbps", 10000)

        def speed():
            et = Ethtool()
            try:
                return et.get_link_mode(ifname).speed or 0
            except Exception:
                return 0                      # unknown speed
            finally:
                et.close()
        mbps = _in_ns(ns, speed)
        if mbps < least:
            self.vmq_notes[spec.name] = (f"VMQ off: the uplink's link speed is {mbps} Mb/s, "
                                         f"under min_link_mbps {least}")
            log.warning("switch %s: %s", spec.name, self.vmq_notes[spec.name])
            return
        from switch.vmq_workers import QueueWorkers
        workers = cfg.get("workers", "auto")
        if workers == "auto":
            # Measured on 2 CPUs shared with the guests (README, VMQ): queue workers
            # only add hand-overs where no CPU is left for them.
            workers = len(os.sched_getaffinity(0)) >= cfg["queues"] + 2
        vmq = Vmq(cfg["queues"], port_id=port.port_id, cpus=None if workers else [])
        vmq.dynamic = cfg.get("dynamic", True)
        self.vmqs[spec.name] = vmq
        self.rings[spec.name].steer = vmq.steer
        if workers:
            self.vmq_workers[spec.name] = QueueWorkers(vmq, self.switches[spec.name])

    def _vmq_nic(self, nic, port) -> None:
        """Queues for a VM NIC, first come first served, as many as it asks for and
        are free (vswitch_vmq_sriov.md 3.1, 3.4): the MAC filter (with the access VLAN,
        or any VLAN on a trunk) on its first queue, RSS over all of them."""
        from switch.vmq import VmqError
        vmq = self.vmqs.get(nic.switch)
        name = f"{nic.vm}.eth{nic.index}"
        if vmq is None or nic.vmq.weight == 0:
            if nic.vmq.weight == 0:
                self.vmq_notes[name] = "VMQ weight 0: no queue"
            return
        vlan = filter_vlan(nic.port.vlan)
        sw = self.switches[nic.switch]
        with sw._dp_lock:
            qs = []
            try:
                for _ in range(nic.vmq.queues):
                    qs.append(vmq.allocate(port.port_id, name=name))
            except VmqError as e:
                self.vmq_notes[name] = (f"{len(qs)} of {nic.vmq.queues} queue(s): {e}"
                                        + ("; frames use the default queue" if not qs else ""))
            if not qs:
                return
            try:
                vmq.set_filter(qs[0], nic.port.mac, vlan)
            except VmqError as e:
                for q in qs:
                    vmq.free(q)
                self.vmq_notes[name] = f"no queue: {e}"
                return
            for q in qs:
                vmq.complete(q)
            if len(qs) > 1:
                table = None
                if nic.vmq.table is not None and len(qs) == nic.vmq.queues:
                    table = [qs[k] for k in nic.vmq.table]
                vmq.enable_rss(port.port_id, table=table)

    def _vmq_free(self, sw_name: str, port) -> None:
        vmq = self.vmqs.get(sw_name)
        if vmq is not None:
            # under the data-path lock: no batch holds the queues while they go
            for q in vmq.queues_of(port.port_id):
                vmq.free(q)

    def set_indirection(self, port_name: str, table: list[int]) -> list[int]:
        """Change a VM NIC's VMMQ indirection table (entries: its queue indexes)."""
        from switch.vmq import VmqError
        sw, p = self._find_port(port_name)
        vmq = self.vmqs.get(sw.name)
        qs = vmq.queues_of(p.port_id) if vmq is not None else []
        if len(qs) < 2:
            raise RuntimeError_(f"port {port_name!r} has {len(qs)} VMQ queue(s): an "
                                f"indirection table needs VMMQ (vmq: {{queues: 2 or more}})")
        bad = [x for x in table if not 0 <= x < len(qs)]
        if bad:
            raise RuntimeError_(f"indirection entries {bad}: {port_name!r} has queues "
                                f"0..{len(qs) - 1}")
        try:
            with sw._dp_lock:
                vmq.set_indirection(p.port_id, [qs[x] for x in table])
        except VmqError as e:
            raise RuntimeError_(str(e)) from None
        return vmq.indirection(p.port_id)

    def _ring_port(self, sw_name, name, ns, ifname, mtu, offloads, version=2):
        sock = _in_ns(ns, lambda: RingSocket(ifname, offloads=offloads, version=version))
        sw = self.switches[sw_name]
        with sw._dp_lock:
            port = sw.add_port(name, "external", mtu=mtu, kind=self.rings[sw_name])
            if port is None:
                sock.close()
                raise RuntimeError_(f"switch {sw_name!r} refused its uplink port {name!r}")
            self.rings[sw_name].attach(port, sock)
        self.port_switch[name] = sw_name
        self.port_ns[name] = (ns, ifname)
        return port

    def _tagged_lan(self, sw_name: str) -> bool:
        return any(p.vlan for p in self.topo.physical.values() if p.switch == sw_name)

    def _lan_switch(self, sw_name: str, ns: str, mtu: int) -> None:
        """The physical network as a plain L2 switch of hvnet's own (built-in
        forwarding, VLAN access ports, the wire as its trunk), for topologies whose
        physical hosts sit on tagged VLANs: a Linux bridge cannot tag without the
        kernel's 802.1Q support, which not every kernel has (this one's does not)."""
        lan = f"{sw_name}-lan"
        sw = Switch(lan, max_ports=MAX_PORTS)
        self.switches[lan] = sw
        self.taps[lan] = sw.add_kind(TapPorts())
        self.rings[lan] = sw.add_kind(PacketRingPorts())
        up = self.topo.switches[sw_name].uplink
        # The wire carries what the uplink can take: no offloads there, none here.
        self._ring_port(lan, f"{lan}.wire", ns, "wire", mtu, up.get("offloads", True),
                        up.get("tpacket", 2))

    def _physical(self, p) -> None:
        nn = self.nn
        lan_ns = nn.name(f"{p.switch}-lan")
        ns = nn.add_namespace(p.name)
        mtu = self.topo.switches[p.switch].uplink.get("mtu", 1500)
        ps = PortSettings(mac=p.mac, addresses=list(p.addresses), gateway=p.gateway, mtu=mtu)
        if self._tagged_lan(p.switch):
            from switch.properties import VlanProperty
            if p.mac is None:
                from switch.port import mac_to_int
                ps.mac = mac_to_int(host_mac(self.topo.name, p.name))
            if p.vlan:
                ps.vlan = VlanProperty("access", access_vlan=p.vlan)
            self.make_tap(ns, "eth0", mac_to_str(ps.mac), ps)
            self.add_tap_port(f"{p.switch}-lan", f"{p.name}.eth0", "synthetic", ns, "eth0", ps)
            return
        nn.add_veth((lan_ns, f"p-{p.name}"), (ns, "eth0"))
        nn.set_master(lan_ns, f"p-{p.name}", "lan")
        nn.set_mtu(lan_ns, f"p-{p.name}", mtu)
        nn.set_up(lan_ns, f"p-{p.name}")
        nn.set_mtu(ns, "eth0", mtu)
        if not self.topo.switches[p.switch].uplink.get("offloads", True):
            # An uplink without virtio headers must be sent complete frames, as a real
            # NIC receives them (baseline.md's "-txoff" topologies).
            nn.set_tx_checksum(ns, "eth0", False)
        if p.mac is not None:
            nn.set_mac(ns, "eth0", mac_to_str(p.mac))
        for a in p.addresses:
            nn.add_address(ns, "eth0", a)
        nn.set_up(ns, "eth0")
        if p.gateway:
            nn.add_route(ns, "default", p.gateway)

    def _host_nic(self, k: int, h: HostNic) -> None:
        ns = self.nn.name(h.namespace)
        if ns not in self.nn.namespaces:
            self.nn.add_namespace(h.namespace)
        ifname = f"vEth-{h.switch}"
        ps = h.port
        mac = mac_to_str(ps.mac) if ps.mac is not None else host_mac(self.topo.name, ifname)
        if ps.mac is None:
            from switch.port import mac_to_int
            ps.mac = mac_to_int(mac)
        self.make_tap(ns, ifname, mac, ps)
        self.add_tap_port(h.switch, f"{h.namespace}.{ifname}", "internal", ns, ifname, ps)
        self._pf_filter(h.switch, f"{h.namespace}.{ifname}", ps)

    def _pf_filter(self, sw_name: str, port_name: str, ps: PortSettings) -> None:
        """On a switch whose uplink is an SR-IOV NIC, a vNIC reached through the
        switch has its MAC/VLAN filter on the NIC's default VPort (4.2 step 2), so
        the NIC's embedded switch hands the PF what VFs send it."""
        nic = self.sriov.get(sw_name)
        if nic is None or ps.mac is None:
            return
        from sriov.eswitch import DEFAULT_VPORT
        with self.switches[sw_name]._dp_lock:
            self.pf_filters[port_name] = (sw_name, nic.eswitch.set_filter(
                DEFAULT_VPORT, ps.mac, filter_vlan(ps.vlan)))

    def _pf_unfilter(self, port_name: str) -> None:
        got = self.pf_filters.pop(port_name, None)
        if got is not None:
            sw_name, f = got
            with self.switches[sw_name]._dp_lock:
                self.sriov[sw_name].eswitch.clear_filter(f)

    def add_vm(self, vm: str, nics: list[Nic]) -> list[str]:
        self.nn.add_namespace(vm)
        provs = []
        self.nics[vm] = provs
        for n in nics:
            prov = NIC_PROVIDERS[n.kind](self, n)
            port = prov.attach()
            provs.append(prov)
            self._vmq_nic(n, port)
            self._pf_filter(n.switch, prov.port_name, n.port)
        self.topo.vms[vm] = nics
        if self.started is not None:          # added at run time: its data path runs
            for fn in self.after_start:
                fn()
            self.after_start.clear()
        return [p.port_name for p in provs]

    def remove_vm(self, vm: str) -> list[str]:
        if vm not in self.topo.vms:
            raise RuntimeError_(f"no VM {vm!r} in topology {self.topo.name!r}; VMs are "
                                f"{sorted(self.topo.vms)}")
        removed = []
        for prov in self.nics.pop(vm, []):
            if hasattr(prov, "detach"):
                prov.detach()
            name = prov.port_name
            sw = self.switches[self.port_switch[name]]
            for cid, cap in list(self.captures.items()):
                if cap.port_name == name:
                    self.capture_stop(cid)
            with sw._dp_lock:
                self._vmq_free(sw.name, sw._port(name))
                sw.remove_port(name)
            self.vmq_notes.pop(name, None)
            self._pf_unfilter(name)
            del self.port_switch[name], self.port_ns[name]
            self.links_down.discard(name)
            removed.append(name)
        del self.topo.vms[vm]
        full = self.nn.name(vm)
        if full in pr_netns.listnetns():
            pr_netns.remove(full)
        self.nn.namespaces.remove(full)
        self.nn._save()
        return removed

    def up(self) -> None:
        """Create everything; on any failure remove what was made and re-raise."""
        try:
            for spec in self.topo.switches.values():
                self._switch(spec)
            for spec in self.topo.switches.values():
                if spec.uplink is not None:
                    self._uplink(spec)
            for p in self.topo.physical.values():
                self._physical(p)
            for k, h in enumerate(self.topo.host):
                self._host_nic(k, h)
            vms, self.topo.vms = self.topo.vms, {}
            for vm, nics in vms.items():
                self.add_vm(vm, nics)
        except BaseException:
            self.teardown()
            raise

    def start(self) -> None:
        self.started = time.time()
        for sw in self.switches.values():
            sw.warm()
        for name, sw in self.switches.items():
            t = threading.Thread(target=self._loop, args=(sw,), name=f"datapath-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        for w in self.vmq_workers.values():
            w.start()
        # NICs whose guest side comes up over the running data path (synthetic)
        for fn in self.after_start:
            fn()
        self.after_start.clear()

    def _loop(self, sw: Switch) -> None:
        try:
            sw.run(self._stop)
        except BaseException as e:             # reported by status; the daemon goes on
            self.errors.append(f"switch {sw.name}: data path stopped: {e!r}")
            log.error("switch %s: data path stopped", sw.name, exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self._threads.clear()
        for w in self.vmq_workers.values():
            w.stop()
        self.vmq_workers.clear()

    def teardown(self) -> list[str]:
        self.stop()
        for provs in self.nics.values():
            for prov in provs:
                if hasattr(prov, "detach"):
                    prov.detach()
        for cid in list(self.captures):
            self.capture_stop(cid)
        for kinds in (self.taps, self.rings):
            for k in kinds.values():
                k.close()
        return self.nn.teardown()

    # ---------------------------------------------------------------- requests
    def _find_port(self, name: str):
        if name not in self.port_switch:
            raise RuntimeError_(f"no port {name!r}; ports are {sorted(self.port_switch)}")
        sw = self.switches[self.port_switch[name]]
        return sw, sw._port(name)

    def set_property(self, port_name: str, key: str, prop) -> str:
        """Set (or with ``prop`` None delete) a port's vlan, security or acl property;
        it takes effect from the next batch."""
        from switch.extension import NdisStatus
        from switch.properties import property_key
        sw, port = self._find_port(port_name)
        cls = {"vlan": "VlanProperty", "security": "SecurityProperty", "acl": "AclProperty"}[key]
        if prop is None:
            pk = next((k for k in port.properties if k[0] == cls), None)
            if pk is None:
                return f"{port_name}: no {key} property to delete"
            status = sw.delete_port_property(port, pk)
        else:
            assert property_key(prop)[0] == cls
            status = sw.update_port_property(port, prop)
        if status != NdisStatus.SUCCESS:
            raise RuntimeError_(f"{port_name}: an extension vetoed the {key} change "
                                f"({status.name})")
        return f"{port_name}: {key} {'deleted' if prop is None else 'set'}"

    def set_link(self, port_name: str, up: bool) -> str:
        """Connect or disconnect a port's cable as its NIC sees it: a synthetic NIC
        gets an RNDIS media indication (e.8), an e1000 a link status change
        (STATUS.LU, the PHY, ICR.LSC), and their drivers turn the guest tap's
        carrier on or off; a tap port (kind ``tap``, a host vNIC) has its carrier
        set directly. Frames still cross the switch; the guest's stack stops
        sending while its carrier is off."""
        from switch.tap import set_carrier
        sw, port = self._find_port(port_name)
        prov = next((p for provs in self.nics.values() for p in provs
                     if p.port_name == port_name), None)
        with sw._dp_lock:           # the indication shares the guest's ring with egress
            if isinstance(prov, PartitionNic):
                prov.set_link(up)
            elif port.port_id in self.taps[sw.name]._fd_of:
                set_carrier(self.taps[sw.name]._fd_of[port.port_id], up)
            else:
                raise RuntimeError_(f"{port_name}: a {port.type.name.lower()} port on "
                                    "an uplink has no link this switch controls")
        if up:
            self.links_down.discard(port_name)
        else:
            self.links_down.add(port_name)
        return f"{port_name}: link {'up' if up else 'down'}"

    def vf(self, port_name: str, action: str) -> str:
        """Hot-remove (``remove``) or re-add (``add``) the VF of a NIC of kind sriov,
        as live migration or host servicing does (4.3): its connections move to the
        synthetic path and back."""
        self._find_port(port_name)
        prov = next((p for provs in self.nics.values() for p in provs
                     if p.port_name == port_name), None)
        if not isinstance(prov, SriovVmNic):
            kinds = sorted(p.port_name for provs in self.nics.values() for p in provs
                           if isinstance(p, SriovVmNic))
            raise RuntimeError_(f"{port_name}: not a NIC of kind sriov; those are {kinds}")
        if action == "remove":
            return prov.vf_remove()
        if action == "add":
            return prov.vf_add()
        raise RuntimeError_(f"hvnet vf {port_name}: action must be add or remove, "
                            f"not {action!r}")

    def capture_start(self, port_name: str, path: str) -> int:
        sw, port = self._find_port(port_name)
        cap = PortCapture(path, port.port_id, port_name)
        with sw._dp_lock:
            sw.install(cap)
        cid = self._next_capture
        self._next_capture += 1
        self.captures[cid] = cap
        return cid

    def capture_status(self, cid: int) -> dict:
        cap = self.captures.get(cid)
        if cap is None:
            raise RuntimeError_(f"no capture {cid}")
        return {"id": cid, "port": cap.port_name, "path": cap.path, "frames": cap.frames}

    def capture_stop(self, cid: int) -> dict:
        cap = self.captures.pop(cid, None)
        if cap is None:
            raise RuntimeError_(f"no capture {cid}")
        sw = self.switches[self.port_switch[cap.port_name]]
        with sw._dp_lock:
            sw.uninstall(cap.name)
        cap.close()
        return {"id": cid, "port": cap.port_name, "path": cap.path, "frames": cap.frames}

    def stats(self, port: str | None = None) -> dict:
        out = {}
        for name, sw in self.switches.items():
            with sw._dp_lock:
                s = sw.stats()
            if port is not None:
                s["ports"] = {k: v for k, v in s["ports"].items() if k == port}
                if not s["ports"]:
                    continue
            vmq = self.vmqs.get(name)
            if vmq is not None:
                names = {p.port_id: p.name for p in sw.ports.values()}
                s["vmq"] = [{**q, "port": names.get(q["port"], "") if q["queue"] else
                             names.get(vmq.port_id, "")} for q in vmq.info()]
                s["vmq_moves"] = vmq.moves
                w = self.vmq_workers.get(name)
                if w is not None:
                    full = w.info()
                    for q in s["vmq"]:
                        q["full_drops"] = full.get(q["queue"], 0)
            nic = self.sriov.get(name)
            if nic is not None:
                from sriov.eswitch import C_NO_FILTER, C_RX, C_SPOOF, C_TX
                from sriov import ixgbevf_rings as R
                es = nic.eswitch
                s["sriov"] = {
                    "vfs": [{"vf": k, "tx_frames": int(nic.stats[k, R.S_TX_FRAMES]),
                             "tx_tso": int(nic.stats[k, R.S_TX_TSO]),
                             "rx_frames": int(nic.stats[k, R.S_RX_FRAMES]),
                             "rx_no_desc": int(nic.stats[k, R.S_RX_NO_DESC]),
                             "tx_bad": int(nic.stats[k, R.S_TX_BAD_DMA]
                                           + nic.stats[k, R.S_TX_BAD_OFFLOAD]),
                             "spoofed": int(es.counters[2 + k, C_SPOOF]),
                             "eswitch_rx": int(es.counters[2 + k, C_RX]),
                             "eswitch_tx": int(es.counters[2 + k, C_TX])}
                            for k in range(len(nic.vfs))],
                    "no_filter": int(es.counters[:, C_NO_FILTER].sum()),
                    "nics": {p.port_name: p.info() for provs in self.nics.values()
                             for p in provs if isinstance(p, SriovVmNic)
                             and p.nic.switch == name},
                    "notes": {k: v for k, v in self.vf_notes.items()
                              if self.port_switch.get(k) == name}}
            notes = {k: v for k, v in self.vmq_notes.items()
                     if k == name or self.port_switch.get(k) == name}
            if notes:
                s["vmq_notes"] = notes
            out[name] = s
        if port is not None and not out:
            raise RuntimeError_(f"no port {port!r}; ports are {sorted(self.port_switch)}")
        return out

    def status(self) -> dict:
        ports = []
        for name in sorted(self.port_switch):
            sw, p = self._find_port(name)
            ns, ifname = self.port_ns[name]
            ports.append({"port": name, "switch": sw.name, "type": p.type.name.lower(),
                          "id": p.port_id, "namespace": ns or "(root)", "interface": ifname,
                          "mac": self._mac_of(name),
                          "link": "down" if name in self.links_down else "up"})
        return {"name": self.topo.name, "source": self.topo.source, "started": self.started,
                "switches": {n: [e.name for e in sw.enabled_extensions()]
                             for n, sw in self.switches.items()},
                "machines": {m: self.nn.name(m) for m in self.topo.namespaces()},
                "ports": ports, "errors": list(self.errors)}

    def _mac_of(self, port_name: str) -> str:
        vm, _, ifname = port_name.partition(".")
        if vm in self.topo.vms:
            return mac_to_str(self.topo.vms[vm][int(ifname[3:])].port.mac)
        for h in self.topo.host:
            if port_name == f"{h.namespace}.vEth-{h.switch}":
                return mac_to_str(h.port.mac)
        p = self.topo.physical.get(vm)
        if p is not None and p.mac is not None:
            return mac_to_str(p.mac)
        return "-"
