"""SR-IOV management: a PF's virtual functions through sysfs, their binding to
vfio-pci, and their MAC, VLAN, spoof checking, trust and link state through
netlink (e1000_vfio.md B.8, B.9).

Every sysfs path hangs off ``root`` (``/sys`` by default), so the whole flow runs
against a folder laid out like sysfs as well as against the kernel. The kernel's
own rules for ``sriov_numvfs`` (B.8: above ``sriov_totalvfs`` is ERANGE, one
non-zero count to another is EBUSY, the same count is nothing to do) are checked
here first, so the error says what is wrong rather than only the errno.
"""
from __future__ import annotations

import errno
import os
import re

BDF = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")


class IovError(OSError):
    pass


class PciFunction:
    """One PCI function (a PF or a VF) under ``root``/bus/pci/devices."""

    def __init__(self, bdf: str, root: str = "/sys"):
        if not BDF.match(bdf):
            raise ValueError(f"{bdf!r} is not a PCI address (DDDD:BB:DD.F, lower-case hex)")
        self.bdf, self.root = bdf, root
        self.path = os.path.join(root, "bus", "pci", "devices", bdf)
        if not os.path.isdir(self.path):
            raise IovError(errno.ENOENT, f"no PCI function {bdf} under {root}")

    def _read(self, name: str) -> str:
        try:
            with open(os.path.join(self.path, name)) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise IovError(errno.ENOENT, f"{self.bdf} has no {name} (not SR-IOV capable, "
                           f"or CONFIG_PCI_IOV is off)") from None

    def _write(self, name: str, value: str, path: str | None = None) -> None:
        target = path or os.path.join(self.path, name)
        try:
            with open(target, "w") as f:
                f.write(value)
        except OSError as e:
            raise IovError(e.errno, f"writing {value!r} to {target}: "
                           f"{os.strerror(e.errno or 0)}") from None

    # ---- the PF's side ------------------------------------------------------------------
    @property
    def total_vfs(self) -> int:
        return int(self._read("sriov_totalvfs"))

    @property
    def num_vfs(self) -> int:
        return int(self._read("sriov_numvfs"))

    def set_num_vfs(self, n: int, autoprobe: bool | None = None) -> None:
        """Enable ``n`` VFs (0 disables). ``autoprobe`` False keeps host drivers from
        binding the new VFs (set before enabling, B.8)."""
        total, now = self.total_vfs, self.num_vfs
        if not 0 <= n <= total:
            raise IovError(errno.ERANGE, f"{self.bdf}: {n} VFs asked, the PF has "
                           f"{total} (sriov_totalvfs)")
        if n == now:
            return
        if n and now:
            raise IovError(errno.EBUSY, f"{self.bdf}: {now} VFs already enabled; disable "
                           f"them (0) before enabling {n}")
        if autoprobe is not None:
            self._write("sriov_drivers_autoprobe", "1" if autoprobe else "0")
        self._write("sriov_numvfs", str(n))

    def vfs(self) -> list["PciFunction"]:
        """The VFs in order of their number (virtfnN links)."""
        out = []
        for name in os.listdir(self.path):
            if m := re.fullmatch(r"virtfn(\d+)", name):
                bdf = os.path.basename(os.readlink(os.path.join(self.path, name)))
                out.append((int(m[1]), PciFunction(bdf, self.root)))
        return [f for _, f in sorted(out)]

    # ---- any function ------------------------------------------------------------------
    @property
    def physfn(self) -> "PciFunction | None":
        link = os.path.join(self.path, "physfn")
        if not os.path.islink(link):
            return None
        return PciFunction(os.path.basename(os.readlink(link)), self.root)

    @property
    def iommu_group(self) -> int | None:
        link = os.path.join(self.path, "iommu_group")
        return int(os.path.basename(os.readlink(link))) if os.path.islink(link) else None

    def group_members(self) -> list[str]:
        g = self.iommu_group
        if g is None:
            return []
        return sorted(os.listdir(os.path.join(self.root, "kernel", "iommu_groups", str(g),
                                              "devices")))

    @property
    def driver(self) -> str | None:
        link = os.path.join(self.path, "driver")
        return os.path.basename(os.readlink(link)) if os.path.islink(link) else None

    def bind_vfio(self) -> None:
        """driver_override "vfio-pci", unbind from the current driver, probe again
        (B.8). The group is viable only once every member is bound so: say which
        are not."""
        self._write("driver_override", "vfio-pci")
        current = self.driver
        if current and current != "vfio-pci":
            self._write("unbind", self.bdf, os.path.join(self.path, "driver", "unbind"))
        if self.driver != "vfio-pci":
            self._write("drivers_probe", self.bdf,
                        os.path.join(self.root, "bus", "pci", "drivers_probe"))

    def unviable_members(self) -> list[str]:
        """Members of this function's IOMMU group bound to a driver other than
        vfio-pci: each keeps the group from being viable (B.1)."""
        bad = []
        for bdf in self.group_members():
            d = PciFunction(bdf, self.root).driver
            if d not in (None, "vfio-pci"):
                bad.append(f"{bdf} ({d})")
        return bad


# ---- VF settings through the PF's netlink (B.9) ----------------------------------------------

LINK_STATES = {"auto": 0, "enable": 1, "disable": 2}


def vf_settings(vf: int, mac: str | None = None, vlan: int | None = None, qos: int = 0,
                spoofchk: bool | None = None, trust: bool | None = None,
                link_state: str | None = None) -> dict:
    """The ``vf`` argument pyroute2's ``link("set", vf=...)`` takes, checked as
    netdevsim's handlers check it (vf >= 0, VLAN 0-4095, QoS 0-7, no multicast MAC)."""
    if vf < 0:
        raise ValueError(f"VF number {vf} is negative")
    s: dict = {"vf": vf}
    if mac is not None:
        b = bytes(int(x, 16) for x in mac.split(":"))
        if len(b) != 6:
            raise ValueError(f"bad MAC {mac!r}")
        if b[0] & 1:
            raise ValueError(f"{mac} is a multicast MAC: a VF cannot have it")
        s["mac"] = mac
    if vlan is not None:
        if not 0 <= vlan <= 4095 or not 0 <= qos <= 7:
            raise ValueError(f"VLAN {vlan} / QoS {qos}: VLAN 0-4095 (0 = none), QoS 0-7")
        s["vlan"] = {"vlan": vlan, "qos": qos}
    if spoofchk is not None:
        s["spoofchk"] = int(spoofchk)
    if trust is not None:
        s["trust"] = int(trust)
    if link_state is not None:
        if link_state not in LINK_STATES:
            raise ValueError(f"link state {link_state!r}: one of {', '.join(LINK_STATES)}")
        s["link_state"] = LINK_STATES[link_state]
    return s


def set_vf(pf_ifname: str, vf: int, **settings) -> None:
    """Configure VF ``vf`` of the PF netdev ``pf_ifname`` (RTM_SETLINK with
    IFLA_VFINFO_LIST), in this process's network namespace."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    s = vf_settings(vf, **settings)
    with IPRoute() as nl:
        idx = nl.link_lookup(ifname=pf_ifname)
        if not idx:
            raise IovError(errno.ENODEV, f"no interface {pf_ifname!r}")
        try:
            nl.link("set", index=idx[0], vf=s)
        except NetlinkError as e:
            why = {errno.EOPNOTSUPP: "its driver has no SR-IOV VF settings",
                   errno.EINVAL: "the VF number or a value is out of range"}.get(e.code, "")
            raise IovError(e.code, f"{pf_ifname}: setting VF {vf} {s}: "
                           f"{os.strerror(e.code)}{'; ' + why if why else ''}") from None


def get_vfs(pf_ifname: str) -> list[dict]:
    """Each VF's MAC, VLAN, spoof checking, trust and link state, as the PF reports
    them (RTM_GETLINK with IFLA_EXT_MASK = RTEXT_FILTER_VF)."""
    from pyroute2 import IPRoute
    with IPRoute() as nl:
        idx = nl.link_lookup(ifname=pf_ifname)
        if not idx:
            raise IovError(errno.ENODEV, f"no interface {pf_ifname!r}")
        link = nl.link("get", index=idx[0], ext_mask=1)[0]
    out = []
    vfinfo = link.get_attr("IFLA_VFINFO_LIST")
    for info in (vfinfo.get_attrs("IFLA_VF_INFO") if vfinfo else []):
        d = {}
        for key, name in (("IFLA_VF_MAC", "mac"), ("IFLA_VF_VLAN", "vlan"),
                          ("IFLA_VF_SPOOFCHK", "spoofchk"), ("IFLA_VF_TRUST", "trust"),
                          ("IFLA_VF_LINK_STATE", "link_state")):
            a = info.get_attr(key)
            if a is not None:
                d["vf"] = a["vf"]
                d[name] = a.get("mac") if name == "mac" else a.get(
                    "vlan" if name == "vlan" else "setting" if name in ("spoofchk", "trust")
                    else "link_state")
        out.append(d)
    return out
