"""Intercepts: register accesses as VM exits over a socket, posted writes batched
ahead of the next synchronous access, and a hostile guest's datagrams refused."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from hypervisor import intercept as I


class Model:
    def __init__(self):
        self.regs = {}
        self.log = []

    def read(self, off, size):
        self.log.append(("r", off))
        return self.regs.get(off, 0)

    def write(self, off, value, size):
        self.log.append(("w", off, value))
        self.regs[off] = value


@pytest.fixture
def rig():
    host, guest = I.pair()
    m = Model()
    srv = I.InterceptServer(host, {I.MMIO: (m.read, m.write)})
    stop = threading.Event()

    def serve():
        import select
        while not stop.is_set() and not srv.closed:
            if select.select([srv.fileno()], [], [], 0.05)[0]:
                srv.pump()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = I.InterceptClient(guest, sync={I.MMIO: {0x3818}})
    try:
        yield m, srv, cli, guest
    finally:
        stop.set()
        t.join(5)
        host.close()
        guest.close()


def test_posted_writes_go_ahead_of_the_next_read_in_one_exit(rig):
    m, srv, cli, _ = rig
    for k in range(10):
        cli.write(I.MMIO, 0x100 + 4 * k, k)
    assert srv.exits == 0 and cli.npending == 10
    assert cli.read(I.MMIO, 0x104) == 1
    assert cli.exits == 1 and srv.exits == 1 and srv.accesses == 11
    assert m.log[:10] == [("w", 0x100 + 4 * k, k) for k in range(10)] and m.log[10] == ("r", 0x104)


def test_a_synchronous_write_is_applied_before_it_returns(rig):
    m, srv, cli, _ = rig
    cli.write(I.MMIO, 0x2818, 5)                 # posted
    cli.write(I.MMIO, 0x3818, 7)                 # the doorbell: synchronous
    assert m.regs == {0x2818: 5, 0x3818: 7} and cli.exits == 1
    cli.write(I.MMIO, 0x10, 1)
    cli.flush()
    assert m.regs[0x10] == 1 and cli.exits == 2


def test_values_are_masked_to_the_access_size(rig):
    m, _, cli, _ = rig
    m.regs[0x40] = 0x12345678
    assert cli.read(I.MMIO, 0x40, 2) == 0x5678 and cli.read(I.MMIO, 0x40, 1) == 0x78
    cli.write(I.MMIO, 0x44, 0x1FF, 1)
    cli.flush()
    assert m.regs[0x44] == 0xFF


@pytest.mark.parametrize("data", [b"\x01", b"\x00" * 15, b"\x00" * 17,
                                  b"\x00" * (16 * (I.MAX_BATCH + 1)),
                                  np.array([(9, 0, 4, 1, 0, 0)], dtype=I.ACCESS).tobytes(),
                                  np.array([(1, 7, 4, 1, 0, 0)], dtype=I.ACCESS).tobytes(),
                                  np.array([(1, I.CONFIG, 4, 1, 0, 0)], dtype=I.ACCESS).tobytes(),
                                  np.array([(1, 0, 3, 1, 0, 0)], dtype=I.ACCESS).tobytes()])
def test_malformed_datagrams_are_refused_and_the_model_keeps_serving(rig, data):
    m, srv, cli, guest = rig
    guest.send(data)
    got = np.frombuffer(guest.recv(64), dtype=I.REPLY)
    assert got["status"][0] == I.REFUSED and srv.malformed == 1 and m.log == []
    m.regs[0] = 42
    assert cli.read(I.MMIO, 0) == 42                  # still serving


def test_a_refused_access_raises_on_the_guest_side():
    host, guest = I.pair()
    srv = I.InterceptServer(host, {I.MMIO: (lambda o, s: 1 // 0, lambda o, v, s: None)})
    cli = I.InterceptClient(guest, timeout=5)
    t = threading.Thread(target=lambda: [srv.pump() or __import__("time").sleep(0.01)
                                          for _ in range(100)], daemon=True)
    t.start()
    with pytest.raises(I.InterceptError):
        cli.read(I.MMIO, 0)
    t.join(5)
    assert srv.malformed == 1
    host.close()
    guest.close()
