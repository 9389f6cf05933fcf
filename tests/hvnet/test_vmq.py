"""VMQ on a running topology's uplink, in namespaces (issue 6): queues handed out
by weight, first come first served; frames from the physical network sorted to
their VM's queue and worker; VMMQ spreading one VM's flows by Toeplitz over its
queues; the indirection table changed while a checked TCP stream runs; queues
given back when the VM goes. a and b are synthetic VMs with queue workers, so
their queues' deliveries go into NetVSP's rings from the workers, beside the
data-path thread's (two workers at once into b's, VMMQ), and b goes while they run."""
from __future__ import annotations

import json
import os
import sys

import pytest

from hvnet import nsexec

from . import nsutil
from .nsutil import hvnet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NAME = f"q{os.getpid() % 10000}"
TOPO = f"""
name: {NAME}
switches:
  sw0: {{uplink: {{mtu: 1500, vmq: {{queues: 3, workers: true}}}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: synthetic, mac: "02:00:00:71:00:0a",
               addresses: [10.71.0.1/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: synthetic, mac: "02:00:00:71:00:0b",
               addresses: [10.71.0.2/24], vmq: {{queues: 2}}}}]}}
  c: {{nics: [{{switch: sw0, kind: tap, mac: "02:00:00:71:00:0c", addresses: [10.71.0.3/24],
              vmq: {{weight: 0}}}}]}}
  d: {{nics: [{{switch: sw0, kind: synthetic, mac: "02:00:00:71:00:0d",
               addresses: [10.71.0.4/24]}}]}}
physical:
  p: {{switch: sw0, mac: "02:00:00:71:00:09", addresses: [10.71.0.9/24]}}
"""
P_IP = "10.71.0.9"
SENDER = r"""
import socket, sys, time
dst, sports, n = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
for sp in sports:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sp))
    for k in range(n):
        s.sendto(b"v" * 200, (dst, 9))
        if k % 32 == 31:
            time.sleep(0.002)      # no bursts over the uplink ring's 256 frames
    s.close()
"""


def ns(m):
    return f"{NAME}-{m}"


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    yield from nsutil.running(tmp_path_factory.mktemp("vmq"), NAME, TOPO)


def vmq(env):
    s = json.loads(hvnet(env, "stats", "--json", check=True).stdout)["sw0"]
    return s["vmq"], s.get("vmq_notes", {})


def by_port(queues):
    out = {}
    for q in queues:
        out.setdefault(q["port"], []).append(q)
    return out


def test_queues_by_weight_first_come_first_served(topo):
    env, _ = topo
    queues, notes = vmq(env)
    bp = by_port(queues)
    assert [q["queue"] for q in bp["sw0.uplink"]] == [0]
    assert len(bp["a.eth0"]) == 1 and not bp["a.eth0"][0]["rss"]
    assert bp["a.eth0"][0]["filters"] == [{"mac": 0x02000071000a, "vlan": -1}]
    assert len(bp["b.eth0"]) == 2 and all(q["rss"] for q in bp["b.eth0"])
    assert "c.eth0" not in bp and notes["c.eth0"] == "VMQ weight 0: no queue"
    # d asked for a queue after a and b took all three
    assert "d.eth0" not in bp and "no free VMQ queue" in notes["d.eth0"]
    assert all(q["state"] == "RUNNING" for q in queues)
    assert {q["cpu"] for q in queues} <= set(os.sched_getaffinity(0))
    text = hvnet(env, "stats", check=True).stdout
    assert "VMQ on the uplink" in text and "(RSS)" in text


def _send(dst, sports, n):
    r = nsexec.run(ns("p"), [sys.executable, "-c", SENDER, dst, ",".join(map(str, sports)),
                             str(n)], timeout=60)
    assert r.returncode == 0, r.stderr


def test_frames_go_to_their_vms_queue(topo):
    env, _ = topo
    assert nsutil.ping(ns("p"), "10.71.0.1") and nsutil.ping(ns("p"), "10.71.0.3")
    before = {q["queue"]: q["packets"] for q in vmq(env)[0]}
    _send("10.71.0.1", [4000], 300)
    _send("10.71.0.3", [4001], 200)
    a_q = by_port(vmq(env)[0])["a.eth0"][0]["queue"]

    def grew():
        return {q["queue"]: q["packets"] - before[q["queue"]] for q in vmq(env)[0]}
    assert nsutil.until(lambda: grew()[a_q] >= 300 and grew()[0] >= 200), grew()
    grew = grew()
    assert grew[a_q] >= 300
    assert grew[0] >= 200                      # c has no queue: the default queue
    assert sum(grew.values()) < 300 + 200 + 40  # nothing counted twice


def test_vmmq_spreads_b_over_its_queues_and_the_table_changes_under_tcp(topo):
    env, _ = topo
    bq = [q["queue"] for q in by_port(vmq(env)[0])["b.eth0"]]
    # TCP flows whose source ports Toeplitz puts on b's first and on its second queue
    sports = {0: [], 1: []}
    for sp in range(20000, 21000):
        k = nsutil.rss_index("10.71.0.9", "10.71.0.2", sp, 5304, 2)
        if len(sports[k]) < 3:
            sports[k].append(sp)
    sink = nsutil.tcp_sink(ns("b"), "10.71.0.2", 5304)
    try:
        def flows(k):
            nsutil.tcp_flows(ns("p"), "10.71.0.2", 5304, sports[k], 1 << 20)
        seen = {k: nsutil.port_stats(env)[k]["tx_packets"] for k in ("a.eth0", "c.eth0")}
        tcp = nsutil.Tcp(ns("p"), ns("b"), "10.71.0.2", 5301, 48)   # checked, throughout
        try:
            q0 = {q["queue"]: q["packets"] for q in vmq(env)[0]}
            flows(0)
            q1 = {q["queue"]: q["packets"] for q in vmq(env)[0]}
            flows(1)
            q2 = {q["queue"]: q["packets"] for q in vmq(env)[0]}
            # all of b's frames to its second queue, while the checked stream runs
            r = hvnet(env, "vmq", "b.eth0", "1,1", check=True)
            assert "2 entries" in r.stdout
            flows(0)
            q3 = {q["queue"]: q["packets"] for q in vmq(env)[0]}
            tcp.finish()
        finally:
            tcp.stop()
    finally:
        nsexec.stop(sink)
    # 3 x 1 MiB on a queue is at least ~70 super-packets or ~2000 frames; the checked
    # stream adds to one queue throughout, so each step asserts the flows' queue
    # grew by at least that much
    def grew(a, b, q):
        return b[bq[q]] - a[bq[q]]
    assert grew(q0, q1, 0) >= 60
    assert grew(q1, q2, 1) >= 60
    assert grew(q2, q3, 1) >= 60               # the first queue's flows, moved
    # nothing of b's went to another VM: a and c saw only broadcast/neighbour traffic
    st = nsutil.port_stats(env)
    assert all(st[k]["tx_packets"] - seen[k] < 50 for k in seen)


def test_table_mistakes_are_refused(topo):
    env, _ = topo
    r = hvnet(env, "vmq", "b.eth0", "0,1,1")
    assert r.returncode != 0 and "power of two" in r.stderr
    r = hvnet(env, "vmq", "b.eth0", "0,2")
    assert r.returncode != 0 and "queues 0..1" in r.stderr
    r = hvnet(env, "vmq", "a.eth0", "0,0")
    assert r.returncode != 0 and "VMMQ" in r.stderr
    r = hvnet(env, "vmq", "b.eth0", "x")
    assert r.returncode == 2 and "comma-separated" in r.stderr


def test_queues_freed_and_allocated_while_a_checked_stream_runs(topo):
    """b goes (its two queues are freed) and e comes (it gets one) while a TCP
    stream to a, through a's queue, runs: the stream arrives byte for byte, and
    e's frames go to e's new queue."""
    env, _ = topo
    tcp = nsutil.Tcp(ns("p"), ns("a"), "10.71.0.1", 5311, 96)
    try:
        hvnet(env, "vm", "rm", "b", check=True)
        hvnet(env, "vm", "add", "e", "--spec",
              '{nics: [{switch: sw0, kind: tap, mac: "02:00:00:71:00:0e", '
              'addresses: [10.71.0.5/24]}]}', check=True)
        tcp.finish()
    finally:
        tcp.stop()
    queues, notes = vmq(env)
    bp = by_port(queues)
    assert "b.eth0" not in bp and "b.eth0" not in notes
    assert len(bp["e.eth0"]) == 1 and len(bp["a.eth0"]) == 1
    assert len(queues) == 3                     # the default queue, a's and e's
    before = bp["e.eth0"][0]["packets"]
    assert nsutil.ping(ns("p"), "10.71.0.5")
    after = by_port(vmq(env)[0])["e.eth0"][0]["packets"]
    assert after - before >= 3
    # a's queue carried the stream: nothing of it went the default way
    assert bp["a.eth0"][0]["bytes"] > 96 << 20
