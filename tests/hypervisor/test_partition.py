"""Guest RAM shared with a guest process, doorbells, and the control channel."""
from __future__ import annotations

import os
import select
import subprocess
import sys

import numpy as np
import pytest

from hypervisor.partition import (ControlChannel, ControlError, Doorbell, GuestMemory,
                                  GuestMemoryError, MAX_MESSAGE, gpa_ok)
from switch.kernel import kernel

GUEST = r"""
import os, sys
from hypervisor.partition import ControlChannel, Doorbell, GuestMemory
import socket
ch = ControlChannel(socket.socket(fileno=int(sys.argv[1])))
msg, fds = ch.recv()
ram = GuestMemory(msg["ram"], fd=fds[0])
ram.write(0x1000, b"written by the guest")
Doorbell(fds[1]).ring()
ch.send({"type": "done", "saw": ram.read(0x2000, 5).decode()})
ch.sock.sendmsg([b"not json"])
ch.send({"type": "spam"}, [os.open("/dev/null", os.O_RDONLY) for _ in range(3)])
"""


def test_guest_process_shares_ram_and_rings_the_doorbell():
    ram = GuestMemory(1 << 20)
    bell = Doorbell()
    host, guest = ControlChannel.pair()
    ram.write(0x2000, b"hello")
    p = subprocess.Popen([sys.executable, "-c", GUEST, str(guest.fileno())],
                         pass_fds=[guest.fileno()])
    try:
        guest.close()
        host.send({"type": "ram", "ram": ram.size}, [ram.fd, bell.fd])
        r, _, _ = select.select([bell.fd], [], [], 30)
        assert r and bell.take() == 1 and bell.take() == 0
        assert ram.read(0x1000, 20) == b"written by the guest"
        msg, fds = host.recv()
        assert msg == {"type": "done", "saw": "hello"} and fds == []
        with pytest.raises(ControlError, match="not JSON"):
            host.recv()
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ControlError, match="descriptors"):
            host.recv(max_fds=2)          # more than asked for: refused, and closed
        assert len(os.listdir("/proc/self/fd")) == before
        assert host.recv() is None        # the guest has gone
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        host.close()
        bell.close()
        ram.close()


def test_gpa_checks_refuse_everything_outside():
    ram = GuestMemory(8 * 4096)
    try:
        assert ram.read(8 * 4096 - 4, 4) == bytes(4)
        for gpa, n in ((8 * 4096 - 3, 4), (-1, 1), (0, -1), (2**63 - 1, 2), (8 * 4096, 1)):
            with pytest.raises(GuestMemoryError):
                ram.read(gpa, n)
    finally:
        ram.close()


@kernel
def _check_all(mem, gpas, lens, out):
    for k in range(gpas.shape[0]):
        out[k] = gpa_ok(mem, gpas[k], lens[k])


def test_gpa_ok_in_compiled_code_cannot_overflow():
    mem = np.zeros(4096, dtype=np.uint8)
    big = np.iinfo(np.int64).max
    cases = [(0, 4096, True), (4095, 1, True), (4096, 0, True), (4096, 1, False),
             (0, 4097, False), (-1, 0, False), (0, -1, False), (big, big, False),
             (1, big, False), (big, 1, False), (-big, big, False)]
    gpas = np.array([c[0] for c in cases], dtype=np.int64)
    lens = np.array([c[1] for c in cases], dtype=np.int64)
    out = np.zeros(len(cases), dtype=np.bool_)
    _check_all(mem, gpas, lens, out)
    assert out.tolist() == [c[2] for c in cases]


def test_memfd_smaller_than_announced_is_refused():
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    try:
        with pytest.raises(GuestMemoryError, match="not the 8192"):
            GuestMemory(8192, fd=fd)
    finally:
        os.close(fd)


def test_oversized_control_message_is_refused_on_both_ends():
    a, b = ControlChannel.pair()
    try:
        with pytest.raises(ControlError, match="at most"):
            a.send({"type": "x", "blob": "y" * MAX_MESSAGE})
        a.sock.sendmsg([b"{" + b" " * MAX_MESSAGE + b"}"])
        with pytest.raises(ControlError, match="over"):
            b.recv()
        a.sock.sendmsg([b'["no", "type"]'])
        with pytest.raises(ControlError, match="type"):
            b.recv()
    finally:
        a.close()
        b.close()
