"""Two network namespaces on tap ports of one switch: real Linux stacks through hvnet.

The taps carry virtio-net headers with offloads on, so TCP's 64 KiB segments
and their partial checksums cross the switch as they are.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from pyroute2 import netns

from hvnet.netns import Netns
from switch.switch import Switch
from switch.tap import TapPorts, open_tap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def open_tap_in(ns: str, ifname: str) -> int:
    netns.pushns(ns)
    try:
        return open_tap(ifname)
    finally:
        netns.popns()


class Running:
    """The switch polled in a thread until stopped."""

    def __init__(self, sw):
        self.sw, self.stop, self.error = sw, threading.Event(), None
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        try:
            self.sw.run(self.stop)
        except BaseException as e:      # surfaced by the test
            self.error = e

    def close(self):
        self.stop.set()
        self.t.join(10)
        assert self.error is None, self.error


@pytest.fixture
def pair(tmp_path):
    nn = Netns(f"p{os.getpid() % 10000}", tmp_path / "state.json")
    sw = Switch("tapsw")
    taps = sw.add_kind(TapPorts())
    run = None
    try:
        a, b = nn.add_namespace("a"), nn.add_namespace("b")
        for ns, addr, mac in ((a, "10.66.0.1/24", "02:00:00:00:66:01"),
                              (b, "10.66.0.2/24", "02:00:00:00:66:02")):
            nn.add_tap(ns, "eth0")
            nn.set_mac(ns, "eth0", mac)
            nn.add_address(ns, "eth0", addr)
            nn.add_address(ns, "eth0", "fd66::" + addr.split(".")[-1].split("/")[0] + "/64")
            nn.set_up(ns, "eth0")
            port = sw.add_port(f"tap-{ns}", "internal", kind=taps)
            taps.attach(port, open_tap_in(ns, "eth0"))
        sw.warm()                  # compile/load the kernels before the first ping
        run = Running(sw)
        yield sw, a, b
    finally:
        if run:
            run.close()
        taps.close()
        nn.teardown()


def ns_run(ns, *cmd, timeout=30, **kw):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True,
                          timeout=timeout, **kw)


def test_ping_both_ways_and_neighbour_discovery(pair):
    sw, a, b = pair
    assert ns_run(a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.66.0.2").returncode == 0
    assert ns_run(b, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.66.0.1").returncode == 0
    assert ns_run(a, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "fd66::2").returncode == 0
    neigh = ns_run(a, "ip", "neigh", "show", text=True).stdout
    assert "10.66.0.2" in neigh and "fd66::2" in neigh and "02:00:00:00:66:02" in neigh
    st = sw.stats()
    assert st["counters"]["learned_macs"] >= 2
    assert st["ports"][f"tap-{a}"]["rx_packets"] >= 6


SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.66.0.2", 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d: break
    h.update(d); n += len(d)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = """
import socket, sys
data = bytes(range(256)) * (64 * 1024 * 1024 // 256)
s = socket.create_connection(("10.66.0.2", 5001), timeout=20); s.sendall(data); s.close()
"""


def test_tcp_transfer_data_arrives_intact_as_super_packets(pair):
    sw, a, b = pair
    srv = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", SERVER],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        assert ns_run(a, sys.executable, "-c", CLIENT, timeout=120).returncode == 0
        n, digest = srv.stdout.readline().split()
        srv.wait(30)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    data = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest()
    # 64 MiB in far fewer frames than 1500-byte segments would need: GSO crossed the switch
    rx = sw.stats()["ports"][f"tap-{a}"]["rx_packets"]
    assert rx < len(data) // 1448 // 4, rx


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 not installed")
def test_iperf3_through_the_switch(pair):
    sw, a, b = pair
    srv = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s", "-1", "-B", "10.66.0.2"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = ns_run(a, "iperf3", "-c", "10.66.0.2", "-t", "2", "-J", timeout=60, text=True)
        assert r.returncode == 0, r.stderr
        import json
        bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
        assert bps > 0
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait()
