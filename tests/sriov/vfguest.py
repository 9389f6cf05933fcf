"""A guest for one VF in tests: a vfio-user client on a socket pair served by the
NIC, 16 MiB of guest RAM, and the VF driver over them (not yet brought up)."""
from __future__ import annotations

import socket

from hypervisor.partition import GuestMemory, GuestPages
from sriov.vf_driver import VfDriver
from sriov.vfio_user import Client


def vf_guest(nic, k: int, ram_size: int = 16 << 20):
    """(client, guest RAM, driver) of VF ``k``; the caller closes all three."""
    a, b = socket.socketpair()
    nic.serve(k, b)
    cl = Client(a)
    cl.version()
    ram = GuestMemory(ram_size)
    return cl, ram, VfDriver(cl, ram, GuestPages(ram.size))
