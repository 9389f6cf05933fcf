"""SR-IOV management against a folder laid out like sysfs (the kernel's rules for
sriov_numvfs, VF links, IOMMU groups, binding to vfio-pci), VF settings checked as
the kernel's handlers check them, and netlink VF configuration against a real
interface in a namespace the test creates (veth has no VFs: a clear refusal)."""
from __future__ import annotations

import errno
import os

import pytest

from sriov import iov

PF = "0000:03:00.0"
VFS = {0: "0000:03:10.0", 1: "0000:03:10.2", 2: "0000:03:10.4", 10: "0000:03:11.4"}


@pytest.fixture
def sysfs(tmp_path):
    root = tmp_path / "sys"
    devs = root / "bus" / "pci" / "devices"
    drivers = root / "bus" / "pci" / "drivers"
    groups = root / "kernel" / "iommu_groups"
    for d in ("ixgbe", "ixgbevf", "vfio-pci"):
        (drivers / d).mkdir(parents=True)
        (drivers / d / "unbind").write_text("")
    (root / "bus" / "pci" / "drivers_probe").write_text("")

    def dev(bdf, driver=None, group=None):
        p = devs / bdf
        p.mkdir(parents=True)
        (p / "driver_override").write_text("(null)\n")
        if driver:
            (p / "driver").symlink_to(drivers / driver)
        if group is not None:
            (groups / str(group) / "devices").mkdir(parents=True, exist_ok=True)
            (groups / str(group) / "devices" / bdf).symlink_to(p)
            (p / "iommu_group").symlink_to(groups / str(group))
        return p
    pf = dev(PF, "ixgbe", 12)
    (pf / "sriov_totalvfs").write_text("63\n")
    (pf / "sriov_numvfs").write_text("0\n")
    (pf / "sriov_drivers_autoprobe").write_text("1\n")
    for n, bdf in VFS.items():
        v = dev(bdf, "ixgbevf", 40 + n)
        (v / "physfn").symlink_to(pf)
        (pf / f"virtfn{n}").symlink_to(v)
    dev("0000:03:10.1", "ixgbe", 41)            # a stranger in VF 1's group
    return root


def test_enabling_vfs_follows_the_kernels_rules(sysfs):
    pf = iov.PciFunction(PF, str(sysfs))
    assert (pf.total_vfs, pf.num_vfs) == (63, 0)
    with pytest.raises(iov.IovError, match="64 VFs asked, the PF has 63") as e:
        pf.set_num_vfs(64)
    assert e.value.errno == errno.ERANGE
    pf.set_num_vfs(4, autoprobe=False)
    assert (sysfs / "bus/pci/devices" / PF / "sriov_numvfs").read_text() == "4"
    assert (sysfs / "bus/pci/devices" / PF / "sriov_drivers_autoprobe").read_text() == "0"
    with pytest.raises(iov.IovError, match="4 VFs already enabled; disable them") as e:
        pf.set_num_vfs(8)
    assert e.value.errno == errno.EBUSY
    pf.set_num_vfs(4)                                   # the same count: nothing to do
    pf.set_num_vfs(0)
    pf.set_num_vfs(8)
    assert pf.num_vfs == 8


def test_vfs_groups_and_drivers_are_read_from_the_links(sysfs):
    pf = iov.PciFunction(PF, str(sysfs))
    vfs = pf.vfs()
    assert [v.bdf for v in vfs] == [VFS[0], VFS[1], VFS[2], VFS[10]]   # virtfn10 last
    assert all(v.physfn.bdf == PF for v in vfs) and pf.physfn is None
    assert vfs[1].iommu_group == 41 and vfs[1].group_members() == ["0000:03:10.1", VFS[1]]
    assert vfs[1].driver == "ixgbevf"


def test_binding_a_vf_to_vfio_and_what_keeps_its_group_unviable(sysfs):
    vf = iov.PciFunction(VFS[1], str(sysfs))
    vf.bind_vfio()
    assert (sysfs / "bus/pci/devices" / VFS[1] / "driver_override").read_text() == "vfio-pci"
    assert (sysfs / "bus/pci/drivers/ixgbevf/unbind").read_text() == VFS[1]
    assert (sysfs / "bus/pci/drivers_probe").read_text() == VFS[1]
    # (a real kernel now links vfio-pci; here the link is moved by hand)
    link = sysfs / "bus/pci/devices" / VFS[1] / "driver"
    link.unlink()
    link.symlink_to(sysfs / "bus/pci/drivers/vfio-pci")
    assert vf.unviable_members() == ["0000:03:10.1 (ixgbe)"]


@pytest.mark.parametrize("bdf,err", [("03:00.0", ValueError), ("0000:03:00.8", ValueError),
                                     ("0000:09:00.0", iov.IovError)])
def test_bad_or_missing_functions_are_named(sysfs, bdf, err):
    with pytest.raises(err, match=bdf.replace(".", r"\.")):
        iov.PciFunction(bdf, str(sysfs))


def test_a_function_without_sriov_says_so(sysfs):
    with pytest.raises(iov.IovError, match="has no sriov_totalvfs"):
        _ = iov.PciFunction(VFS[0], str(sysfs)).total_vfs


def test_vf_settings_are_checked_before_netlink():
    s = iov.vf_settings(3, mac="02:00:00:00:00:07", vlan=100, qos=5, spoofchk=True,
                        trust=False, link_state="disable")
    assert s == {"vf": 3, "mac": "02:00:00:00:00:07", "vlan": {"vlan": 100, "qos": 5},
                 "spoofchk": 1, "trust": 0, "link_state": 2}
    for bad in ({"vf": -1}, {"vf": 0, "mac": "03:00:00:00:00:01"},
                {"vf": 0, "vlan": 4096}, {"vf": 0, "vlan": 5, "qos": 8},
                {"vf": 0, "link_state": "up"}, {"vf": 0, "mac": "02:00"}):
        with pytest.raises(ValueError):
            iov.vf_settings(**bad)


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")
def test_netlink_vf_settings_on_an_interface_without_vfs_are_refused_clearly():
    from hvnet import e2e, nsexec
    with e2e.veth_peer(f"v{os.getpid() % 10000}") as path:
        code = ("from sriov import iov\n"
                "assert iov.get_vfs('va') == []\n"
                "try:\n"
                "    iov.set_vf('va', 0, mac='02:00:00:00:00:09')\n"
                "except iov.IovError as e:\n"
                "    print(e)\n")
        import sys
        r = nsexec.run(path.client_ns, [sys.executable, "-c", code], timeout=60)
        assert r.returncode == 0, r.stderr
        assert "va: setting VF 0" in r.stdout and "no SR-IOV VF settings" in r.stdout
