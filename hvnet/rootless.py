"""Running without root: a user namespace of the daemon's own, where the kernel allows.

hvnet needs CAP_NET_ADMIN (namespaces, taps, veths, AF_PACKET) and CAP_SYS_ADMIN
for named network namespaces (bind mounts). Not being root, the daemon first
unshares a user namespace, in which this user is root, and a mount namespace
(user_namespaces(7)): every network namespace it then creates belongs to that
user namespace, so it has those capabilities there and nowhere else (an uplink
on a real interface of the host is therefore impossible rootless). The named
namespaces are bind mounts under the run directory (not /run/netns, which only
root may write), visible in the daemon's mount namespace; ``hvnet exec`` and the
demo join the daemon's user and mount namespaces first (setns(2)) and then the
machine's network namespace. When the daemon dies, its namespaces go with it.

Set HVNET_ROOTLESS=1 to run this way as root too (how the tests exercise it).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from pyroute2 import netns as pr_netns

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def userns_blockers() -> list[str]:
    """Why this user cannot create a user namespace here (empty: it can)."""
    out = []
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        out.append("user.max_user_namespaces is 0 (sysctl -w user.max_user_namespaces=15000)")
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        out.append("kernel.unprivileged_userns_clone is 0 "
                   "(sysctl -w kernel.unprivileged_userns_clone=1)")
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        out.append("AppArmor restricts unprivileged user namespaces "
                   "(sysctl -w kernel.apparmor_restrict_unprivileged_userns=0)")
    if not os.path.exists("/dev/net/tun"):
        out.append("/dev/net/tun is missing (the tun module: modprobe tun)")
    return out


def wanted() -> bool:
    return os.geteuid() != 0 or os.environ.get("HVNET_ROOTLESS") == "1"


def explain() -> str:
    return ("hvnet needs root, or a user namespace of its own, and this user cannot have "
            "one here: " + "; ".join(userns_blockers()))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)} ({explain() if userns_blockers() else ''})")


def enter_own(netns_dir: Path) -> None:
    """Make this (still single-threaded) process root of a new user namespace, with a
    private mount namespace and a network namespace of its own (it must be able to
    come back to its own after working inside a machine's, and it has no rights in
    the host's), and keep named network namespaces in ``netns_dir``."""
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET),
           "unshare(user, mount and network namespaces)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    # Mounts made from here on (the namespaces' bind mounts) stay in this namespace.
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    netns_dir.mkdir(parents=True, exist_ok=True)
    pr_netns.NETNS_RUN_DIR = str(netns_dir)


def join(pid: int, netns_dir: str) -> None:
    """Enter the user and mount namespaces of a rootless daemon (``pid``), so its
    machines' network namespaces can be entered by name. Single-threaded callers only
    (a child between fork and exec, or the CLI)."""
    for kind in ("user", "mnt"):
        fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, 0), f"setns({kind} namespace of the daemon, pid {pid})")
        finally:
            os.close(fd)
    pr_netns.NETNS_RUN_DIR = netns_dir
