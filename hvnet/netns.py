"""Network namespaces and links for a topology, through netlink (pyroute2).

Every object a topology creates carries its prefix and is written to a record
file as soon as it exists, so that a crashed run can be cleaned from the record
alone and nothing outside the topology is ever touched. Interface names are
checked against the kernel's 15-character limit before anything is created.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

IFNAMSIZ = 15          # usable characters in a Linux interface name
IFA_F_NODAD = 0x02     # linux/if_addr.h
ROOT = None            # the namespace this process runs in


class NetnsError(RuntimeError):
    """A namespace or link operation failed; the message says which object and why."""


def _check_ifname(name: str) -> None:
    if not name or len(name) > IFNAMSIZ or "/" in name or " " in name:
        raise NetnsError(f"interface name {name!r} is not usable: at most {IFNAMSIZ} "
                         "characters, no '/' or spaces (shorten the topology or NIC name)")


class Netns:
    """The namespaces and links of one topology, named ``<prefix>-...`` and recorded."""

    def __init__(self, prefix: str, record: str | os.PathLike | None = None):
        if not prefix or len(prefix) > 8 or not prefix.replace("-", "").isalnum():
            raise NetnsError(f"prefix {prefix!r}: 1-8 letters, digits or '-' (it starts "
                             "every interface name, which the kernel caps at 15)")
        self.prefix = prefix
        self.record_path = Path(record) if record else None
        self.namespaces: list[str] = []
        self.root_links: list[str] = []
        if self.record_path and self.record_path.exists():
            data = json.loads(self.record_path.read_text())
            self.namespaces = list(data.get("namespaces", []))
            self.root_links = list(data.get("root_links", []))

    # ---- naming --------------------------------------------------------------------------
    def name(self, short: str) -> str:
        return f"{self.prefix}-{short}"

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix + "-")

    def _save(self) -> None:
        if self.record_path is None:
            return
        self.record_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"prefix": self.prefix, "namespaces": self.namespaces,
                                   "root_links": self.root_links}))
        os.replace(tmp, self.record_path)

    # ---- namespaces ----------------------------------------------------------------------
    def add_namespace(self, short: str) -> str:
        full = self.name(short)
        if full in netns.listnetns():
            raise NetnsError(f"network namespace {full!r} already exists: is the topology "
                             "already up, or left over from a crash? (hvnet clean)")
        try:
            netns.create(full)
        except OSError as e:
            raise NetnsError(f"cannot create network namespace {full!r}: {e}") from e
        self.namespaces.append(full)
        self._save()
        self.set_up(full, "lo")
        return full

    # ---- links ---------------------------------------------------------------------------
    def _ipr(self, ns: str | None):
        return IPRoute() if ns is ROOT else NetNS(ns)

    def _index(self, nl, ns, ifname) -> int:
        idx = nl.link_lookup(ifname=ifname)
        if not idx:
            raise NetnsError(f"no interface {ifname!r} in namespace {ns or 'root'!r}")
        return idx[0]

    def add_veth(self, a: tuple[str | None, str], b: tuple[str | None, str]) -> None:
        """A veth pair: end ``a`` = (namespace or None for this one, name), end ``b`` likewise."""
        (ns_a, if_a), (ns_b, if_b) = a, b
        for ifname in (if_a, if_b):
            _check_ifname(ifname)
        for ns, ifname in (a, b):
            if ns is ROOT and not self.owns(ifname):
                raise NetnsError(f"{ifname!r} would be created outside the topology's "
                                 f"namespaces without its prefix {self.prefix!r}-")
        peer = {"ifname": if_b}
        fd = None
        if ns_b is not ROOT:
            # By descriptor: pyroute2 would look a name up in /var/run/netns, and a
            # rootless run keeps its namespaces elsewhere (hvnet.rootless).
            fd = os.open(os.path.join(netns.NETNS_RUN_DIR, ns_b), os.O_RDONLY | os.O_CLOEXEC)
            peer["net_ns_fd"] = fd
        try:
            with self._ipr(ns_a) as nl:
                nl.link("add", ifname=if_a, kind="veth", peer=peer)
        except NetlinkError as e:
            raise NetnsError(f"cannot create veth {if_a!r}<->{if_b!r}: "
                             f"{os.strerror(e.code)}") from e
        finally:
            if fd is not None:
                os.close(fd)
        for ns, ifname in (a, b):
            if ns is ROOT:
                self.root_links.append(ifname)
        self._save()

    def add_tap(self, ns: str | None, ifname: str, multi_queue: bool = False) -> None:
        """A persistent tap device, to be opened later (IFF_VNET_HDR) by whoever serves
        it; ``multi_queue``: opened once per queue (IFF_MULTI_QUEUE)."""
        _check_ifname(ifname)
        if ns is ROOT and not self.owns(ifname):
            raise NetnsError(f"tap {ifname!r} in the root namespace needs the prefix "
                             f"{self.prefix!r}-")
        try:
            with self._ipr(ns) as nl:
                if multi_queue:
                    nl.link("add", ifname=ifname, kind="tuntap", mode="tap",
                            ifr={"multi_queue": True})
                else:
                    nl.link("add", ifname=ifname, kind="tuntap", mode="tap")
        except NetlinkError as e:
            raise NetnsError(f"cannot create tap {ifname!r}: {os.strerror(e.code)}") from e
        if ns is ROOT:
            self.root_links.append(ifname)
            self._save()

    def add_bridge(self, ns: str | None, ifname: str) -> None:
        """A Linux bridge (no STP, no VLAN filtering: tagged frames pass as they are)."""
        _check_ifname(ifname)
        if ns is ROOT and not self.owns(ifname):
            raise NetnsError(f"bridge {ifname!r} in the root namespace needs the prefix "
                             f"{self.prefix!r}-")
        try:
            with self._ipr(ns) as nl:
                nl.link("add", ifname=ifname, kind="bridge", br_stp_state=0,
                        br_forward_delay=0)
        except NetlinkError as e:
            raise NetnsError(f"cannot create bridge {ifname!r}: {os.strerror(e.code)}") from e
        if ns is ROOT:
            self.root_links.append(ifname)
            self._save()

    def set_master(self, ns: str | None, ifname: str, master: str) -> None:
        with self._ipr(ns) as nl:
            nl.link("set", index=self._index(nl, ns, ifname),
                    master=self._index(nl, ns, master))

    def set_up(self, ns: str | None, ifname: str, up: bool = True) -> None:
        with self._ipr(ns) as nl:
            nl.link("set", index=self._index(nl, ns, ifname), state="up" if up else "down")

    def set_tx_checksum(self, ns: str | None, ifname: str, on: bool) -> None:
        """Transmit checksum offload (and with it TSO) on or off, as ``ethtool -K tx``:
        off, the interface sends only complete frames with finished checksums."""
        from pyroute2.ethtool import Ethtool
        if ns is not ROOT:
            netns.pushns(ns)
        try:
            et = Ethtool()
            try:
                f = et.get_features(ifname)
                f.features["tx-checksum-ip-generic"].enable = on
                et.set_features(ifname, f)
            finally:
                et.close()
        except Exception as e:
            raise NetnsError(f"cannot set tx checksum offload of {ifname!r}: {e}") from e
        finally:
            if ns is not ROOT:
                netns.popns()

    def set_mtu(self, ns: str | None, ifname: str, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise NetnsError(f"MTU {mtu} of {ifname!r} out of range 68..65535")
        with self._ipr(ns) as nl:
            nl.link("set", index=self._index(nl, ns, ifname), mtu=mtu)

    def set_mac(self, ns: str | None, ifname: str, mac: str) -> None:
        with self._ipr(ns) as nl:
            nl.link("set", index=self._index(nl, ns, ifname), address=mac)

    def add_address(self, ns: str | None, ifname: str, cidr: str, dad: bool = False) -> None:
        """Add an address. IPv6 addresses skip duplicate address detection unless ``dad``:
        the topology owns every address on its links, and DAD would keep a fresh
        address tentative (unusable) for a second or two."""
        iface = ipaddress.ip_interface(cidr)
        extra = {} if dad or iface.version == 4 else {"flags": IFA_F_NODAD}
        with self._ipr(ns) as nl:
            try:
                nl.addr("add", index=self._index(nl, ns, ifname), address=str(iface.ip),
                        prefixlen=iface.network.prefixlen, **extra)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise NetnsError(f"cannot add {cidr} to {ifname!r}: "
                                     f"{os.strerror(e.code)}") from e

    def add_route(self, ns: str | None, dst: str, gateway: str) -> None:
        net = ipaddress.ip_network(dst, strict=False) if dst != "default" else None
        kw = {"gateway": gateway}
        if net is None:
            fam = ipaddress.ip_address(gateway).version
            kw["dst"] = "0.0.0.0/0" if fam == 4 else "::/0"
        else:
            kw["dst"] = str(net)
        with self._ipr(ns) as nl:
            try:
                nl.route("add", **kw)
            except NetlinkError as e:
                raise NetnsError(f"cannot add route {dst} via {gateway} in "
                                 f"{ns or 'root'!r}: {os.strerror(e.code)}") from e

    def links(self, ns: str | None) -> list[str]:
        with self._ipr(ns) as nl:
            return [link.get_attr("IFLA_IFNAME") for link in nl.get_links()]

    # ---- teardown ------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Delete everything recorded (namespaces take their links with them). Returns
        what was removed; objects already gone are skipped."""
        removed = []
        existing = set(netns.listnetns())
        for ns in reversed(self.namespaces):
            if ns in existing and self.owns(ns):
                netns.remove(ns)
                removed.append(f"netns {ns}")
        with IPRoute() as ip:
            for ifname in reversed(self.root_links):
                idx = ip.link_lookup(ifname=ifname)
                if idx and self.owns(ifname):
                    try:
                        ip.link("del", index=idx[0])
                        removed.append(f"link {ifname}")
                    except NetlinkError as e:
                        # A veth dies with its peer's namespace, possibly right now.
                        if e.code != errno.ENODEV:
                            raise
        self.namespaces, self.root_links = [], []
        if self.record_path and self.record_path.exists():
            self.record_path.unlink()
        return removed


def clean_recorded(record: str | os.PathLike) -> list[str]:
    """Remove what a (possibly crashed) run recorded in ``record``; nothing else."""
    path = Path(record)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return Netns(data["prefix"], path).teardown()
