"""What the namespace tests share: the ``hvnet`` command line as users run it,
the namespaces a run left, and a TCP sender and receiver that check the data."""
from __future__ import annotations

import subprocess
import sys
import time

from pyroute2 import NetNS, netns

from hvnet import nsexec

RECEIVER = """
import hashlib, socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])), family=socket.AF_INET)
print("listening", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    h.update(b); n += len(b)
print(n, h.hexdigest())
"""
SENDER = """
import hashlib, random, socket, sys
blk = random.Random(7).randbytes(1 << 20)
h = hashlib.sha256()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
for k in range(int(sys.argv[3])):
    b = blk[k:] + blk[:k]            # every MiB different
    c.sendall(b); h.update(b)
c.close()
print((int(sys.argv[3]) << 20), h.hexdigest())
"""


def hvnet(env, *args, timeout=120, check=False):
    r = subprocess.run([sys.executable, "-m", "hvnet.cli", *args], capture_output=True,
                       text=True, timeout=timeout, env={**env, "COLUMNS": "200"})
    if check:
        assert r.returncode == 0, f"hvnet {' '.join(args)}: {r.stderr}"
    return r


def ours(prefix):
    return sorted(n for n in netns.listnetns() if n.startswith(prefix + "-"))


def ping(ns, dst, count=3, wait=2):
    return nsexec.run(ns, ["ping", "-c", str(count), "-i", "0.2", "-W", str(wait), dst],
                      timeout=60).returncode == 0


def until(cond, seconds=10.0):
    t = time.monotonic() + seconds
    while time.monotonic() < t:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def carrier(ns, ifname="eth0"):
    with NetNS(ns) as n:
        return n.get_links(ifname=ifname)[0].get_attr("IFLA_CARRIER")


class Tcp:
    """A checked TCP transfer of ``mib`` MiB from namespace ``src`` to ``dst_ip``
    in namespace ``dst``: ``finish`` waits for it and asserts the receiver got
    exactly what was sent; ``stop`` ends both processes."""

    def __init__(self, src, dst, dst_ip, port, mib):
        self.mib = mib
        self.rx = nsexec.popen(dst, [sys.executable, "-c", RECEIVER, dst_ip, str(port)],
                               stdout=subprocess.PIPE, text=True)
        self.tx = None
        assert self.rx.stdout.readline().strip() == "listening"
        self.tx = nsexec.popen(src, [sys.executable, "-c", SENDER, dst_ip, str(port), str(mib)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self):
        try:
            sent, err = self.tx.communicate(timeout=240)
            assert self.tx.returncode == 0, err
            got, _ = self.rx.communicate(timeout=60)
            assert sent.split() == got.split() and int(got.split()[0]) == self.mib << 20
        finally:
            self.stop()

    def stop(self):
        for p in (self.tx, self.rx):
            if p is not None:
                nsexec.stop(p)


def iperf3(client_ns, server_ns, server_ip, port, seconds=2):
    """One iperf3 TCP run; the parsed JSON end section."""
    import json
    srv = nsexec.popen(server_ns, ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = nsexec.run(client_ns, ["iperf3", "-c", server_ip, "-p", str(port), "-t",
                                       str(seconds), "-J"], timeout=60)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert r.returncode == 0, r.stdout[-500:]
        return json.loads(r.stdout)["end"]
    finally:
        nsexec.stop(srv)


def running(directory, name, text):
    """A topology brought up from ``text`` with its state under ``directory``:
    a generator for module fixtures, yielding (env, run directory) and taking
    it down after, checking that nothing of it is left."""
    import os
    env = {**os.environ, "HVNET_STATE_DIR": str(directory / "state")}
    f = directory / f"{name}.yaml"
    f.write_text(text)
    try:
        hvnet(env, "up", str(f), check=True, timeout=300)
        yield env, directory / "state" / name
    finally:
        hvnet(env, "down", name, timeout=120)
        if ours(name):
            hvnet(env, "clean", "--force")
        assert not ours(name), f"left behind: {ours(name)}"


def port_stats(env, switch="sw0"):
    import json
    return json.loads(hvnet(env, "stats", "--json", check=True).stdout)[switch]["ports"]


TCP_SINK = r"""
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=lambda c=c: [None for _ in iter(lambda: c.recv(65536), b"")],
                     daemon=True).start()
"""
TCP_FROM = r"""
import socket, sys
dst, dport, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
for sp in [int(x) for x in sys.argv[3].split(",")]:
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", sp))
    c.connect((dst, dport))
    c.sendall(b"t" * n)
    c.close()
"""


def tcp_sink(ns, ip, port):
    """A TCP server in ``ns`` that takes any number of connections and discards
    what they send (stopped with nsexec.stop)."""
    p = nsexec.popen(ns, [sys.executable, "-c", TCP_SINK, ip, str(port)],
                     stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


def tcp_flows(ns, dst, port, sports, nbytes):
    """One TCP connection from each of ``sports`` in turn, ``nbytes`` each."""
    r = nsexec.run(ns, [sys.executable, "-c", TCP_FROM, dst, str(port),
                        ",".join(map(str, sports)), str(nbytes)], timeout=120)
    assert r.returncode == 0, r.stderr


def rss_index(src, dst, sport, dport, n):
    """The queue or channel index a TCP/IPv4 flow lands on with the default key and
    the default indirection table (entry i = i % n): Toeplitz over the 4-tuple."""
    import ipaddress

    import numpy as np

    from switch.toeplitz import DEFAULT_KEY, key_table, toeplitz
    tup = np.frombuffer(ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
                        + sport.to_bytes(2, "big") + dport.to_bytes(2, "big"), np.uint8)
    return (int(toeplitz(key_table(DEFAULT_KEY), tup, 0, 12)) & 127) % n


def in_ns(ns, fn):
    """``fn()`` run with this thread inside network namespace ``ns`` (sockets it
    opens stay there), back in the original one afterwards."""
    netns.pushns(ns)
    try:
        return fn()
    finally:
        netns.popns()
