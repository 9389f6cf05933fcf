"""Review: the guest's RAM as the host maps it (hypervisor/partition.py GuestMemory,
handed to the NetVSC driver process by hvnet/runtime.py with SCM_RIGHTS).

Every NetVSP access to guest memory (ring kernels, buffers, GPA-direct reads)
goes through the host's MAP_SHARED mapping of the memfd. The guest process
holds the same memfd, writable; were it unsealed, ftruncate() on it would shrink
the file under the host's mapping and the host's next access to a page past the
new end would raise SIGBUS, killing the whole daemon (every VM's NIC). So the
memfd is sealed against shrinking (MFD_ALLOW_SEALING + F_SEAL_SHRINK) before the
fd leaves the host; these tests hold it to that. (A review finding, fixed.)

The crash is shown in a child process so the test run survives it.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap

from hypervisor.partition import GuestMemory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from hypervisor.partition import GuestMemory
    from netvsp.vmbus import ring as RG
    ram = GuestMemory(1 << 20)
    RG.Ring(ram.mem, 0x1000, 0x4000).init()
    guest_fd = os.dup(ram.fd)            # the fd the NetVSC driver process received
    try:
        os.ftruncate(guest_fd, 0)        # what a hostile guest does with it
    except OSError:
        pass                             # sealed: refused, as it should be
    # the host's ring kernel, as NetVSP polls the guest-to-host ring
    print("read_pos", RG.ring_read_pos(ram.mem, 0x1000, 0x4000), flush=True)
""")


def test_a_guest_shrinking_its_ram_memfd_cannot_kill_the_host():
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, \
        f"host process died with {r.returncode} (SIGBUS = -7) after the guest truncated " \
        f"the guest-RAM memfd; stderr: {r.stderr[-300:]}"


def test_guest_ram_memfd_is_sealed_against_shrinking():
    ram = GuestMemory(1 << 16)
    try:
        try:
            seals = fcntl.fcntl(ram.fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        assert seals & fcntl.F_SEAL_SHRINK, f"seals {seals:#x}: F_SEAL_SHRINK missing"
    finally:
        ram.close()
