"""``hvnet bench fastpath``: the in-memory switch pipeline on one core.

Eight in-memory ports (four access ports on VLAN 10, four trunks carrying VLAN
10 tagged), 1,000 learned MACs spread over them, 64-byte UDP frames between
random MAC pairs, the example 5-tuple ACL filter extension with eight rules
that all miss (so every packet walks the whole list), batches of 256. Per batch:
receive (copy in), parse, ACL filter, built-in ingress policies, learning
forwarding with VLAN tagging, delivery plan, transmit (copy out). Reported:
packets per second of CPU time of the one thread doing all of it, and of wall
time.
"""
from __future__ import annotations

import os
import random
import struct
import time

import numpy as np

from examples.acl_filter import AclFilter, five_tuple
from switch.memport import MemoryPorts
from switch.properties import SecurityProperty, VlanProperty
from switch.switch import Switch

N_PORTS = 8
N_MACS = 1000


def _frame(dmac: int, smac: int, vid: int | None, sport: int, dport: int, size: int = 64) -> bytes:
    """A UDP/IPv4 frame of ``size`` bytes on the wire (FCS excluded: 60 + 4)."""
    eth = dmac.to_bytes(6, "big") + smac.to_bytes(6, "big")
    if vid is not None:
        eth += struct.pack("!HH", 0x8100, vid)
    eth += b"\x08\x00"
    payload_len = max(0, size - 4 - len(eth) - 28)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + payload_len, 0, 0, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    udp = struct.pack("!HHHH", sport, dport, 8 + payload_len, 0)
    return eth + ip + udp + bytes(payload_len)


def build(seed: int = 1, frames: int = 4096, batch: int = 256):
    rng = random.Random(seed)
    sw = Switch("bench", max_ports=N_PORTS, batch_capacity=batch)
    mem = MemoryPorts(in_frames=frames + N_MACS, in_bytes=(frames + N_MACS) * 128,
                      out_frames=4096, out_bytes=1 << 18, replay=True, keep=False)
    ports = []
    for k in range(N_PORTS):
        vlan = (VlanProperty("access", access_vlan=10) if k < N_PORTS // 2
                else VlanProperty("trunk", allowed=(10, 20, 30)))
        ports.append(sw.add_port(f"p{k + 1}", "synthetic", mac=0x020000000000 + k + 1, kind=mem,
                                 properties=[vlan, SecurityProperty(allow_mac_spoofing=True)]))
    acl = AclFilter([five_tuple("deny", dst=f"192.168.{r}.0/24", proto="tcp", dport=1000 + r,
                                weight=r + 1) for r in range(8)])
    sw.install(acl)
    macs = [(0x020000100000 + m, ports[m % N_PORTS]) for m in range(N_MACS)]
    tagged = {p.port_id: (k >= N_PORTS // 2) for k, p in enumerate(ports)}
    # Learn every MAC once (a gratuitous broadcast from each).
    for mac, port in macs:
        mem.inject(port, [_frame(0xFFFFFFFFFFFF, mac, 10 if tagged[port.port_id] else None, 1, 2)])
    mem.state[5] = 0
    while mem.pending():
        sw.poll()
    mem.clear_output()
    # The measured traffic: unicast between random MAC pairs on different ports.
    traffic = []
    for _ in range(frames):
        (s, sp), (d, dp) = rng.sample(macs, 2)
        while dp is sp:
            d, dp = rng.choice(macs)
        traffic.append((sp, _frame(d, s, 10 if tagged[sp.port_id] else None,
                                   rng.randrange(1024, 65535), rng.randrange(1, 1024))))
    for port, f in traffic:
        mem.inject(port, [f])
    mem.state[5] = 1
    return sw, mem


def run(seconds: float = 3.0, cpu: int | None = None, batch: int = 256) -> dict:
    if cpu is None:
        cpu = max(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        cpu = None
    sw, mem = build(batch=batch)
    for _ in range(200):          # warm caches and every compiled path
        sw.poll()
    before = sw.counters.port.copy()
    batches = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    deadline = t0 + seconds
    while True:
        for _ in range(100):
            sw.poll()
        batches += 100
        if time.perf_counter() >= deadline:
            break
    wall, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    after = sw.counters.port
    rx = int((after[:, 0] - before[:, 0]).sum())
    tx = int((after[:, 2] - before[:, 2]).sum())
    dropped = int((after[:, 4] - before[:, 4]).sum())
    return {
        "mpps_per_core": rx / cpu_s / 1e6,
        "mpps_wall": rx / wall / 1e6,
        "packets": rx, "delivered": tx, "dropped": dropped, "batches": batches,
        "ns_per_packet": cpu_s / rx * 1e9, "cpu_seconds": cpu_s, "wall_seconds": wall,
        "batch_size": sw.batch_capacity, "ports": N_PORTS, "macs": N_MACS, "frame_bytes": 64,
        "cpu": cpu,
    }
