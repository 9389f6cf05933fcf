"""Running without root: what the kernel allows, and what to say when it does not.

hvnet needs CAP_NET_ADMIN (namespaces, taps, veths, AF_PACKET) and
CAP_SYS_ADMIN for named network namespaces (bind mounts). An unprivileged user
gets both inside a user namespace of their own, where the kernel allows one.
"""
from __future__ import annotations

import os
from pathlib import Path


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


def explain() -> str:
    b = userns_blockers()
    if b:
        return ("hvnet needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), and this user "
                "cannot have them in a user namespace: " + "; ".join(b))
    return ("hvnet runs topologies as root in this version: run it with sudo. (This "
            "kernel would allow a user namespace; running inside one is not built yet.)")
