"""``hvnet bench fastpath``: the in-memory switch pipeline on one core.

Eight in-memory ports (four access ports on VLAN 10, four trunks carrying VLAN
10 tagged), 1,000 learned MACs spread over them, 64-byte UDP frames between
random MAC pairs, the example 5-tuple ACL filter extension with eight rules
that all miss (so every packet walks the whole list), batches of 256. Per batch:
receive (copy in), parse, ACL filter, built-in ingress policies, learning
forwarding with VLAN tagging, delivery plan, transmit (copy out). Reported:
packets per second of CPU time of the one thread doing all of it, and of wall
time, beside a plain per-packet Python loop doing the same work on the same
traffic in the same run.
"""
from __future__ import annotations

import os
import random
import struct
import time

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


def run(seconds: float = 3.0, cpu: int | None = None, batch: int = 256,
        peer: bool = True) -> dict:
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
    out = {
        "mpps_per_core": rx / cpu_s / 1e6,
        "mpps_wall": rx / wall / 1e6,
        "packets": rx, "delivered": tx, "dropped": dropped, "batches": batches,
        "ns_per_packet": cpu_s / rx * 1e9, "cpu_seconds": cpu_s, "wall_seconds": wall,
        "batch_size": sw.batch_capacity, "ports": N_PORTS, "macs": N_MACS, "frame_bytes": 64,
        "cpu": cpu,
    }
    if peer:
        # Same run, same core, same traffic: the plain-Python switch as the yardstick.
        out.update(run_peer(min(seconds, 2.0)))
        out["ratio_vs_python"] = out["mpps_per_core"] / out["python_mpps_per_core"]
    return out


def _python_peer(traffic, vlan_of, trunk, acl_rules, seconds):
    """The same work in plain per-packet Python: parse, 5-tuple ACL, VLAN classify,
    learn, look up, tag or untag, copy out. The yardstick for "no per-packet Python"."""
    import struct as st
    fdb: dict[tuple[bytes, int], int] = {}
    out: list[bytes] = []
    n = 0
    t0 = time.thread_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for port, f in traffic:
            et = st.unpack_from("!H", f, 12)[0]
            if et == 0x8100:
                tci = st.unpack_from("!H", f, 14)[0]
                vid = tci & 0xFFF
                f = f[:12] + f[16:]
                vlan = vid if trunk[port] else -1
            else:
                vlan = vlan_of[port]
            if vlan < 0:
                continue
            ihl = (f[14] & 15) * 4
            proto = f[23]
            dst = st.unpack_from("!I", f, 30)[0]
            sport, dport = st.unpack_from("!HH", f, 14 + ihl)
            denied = False
            for net, mask, p, dp in acl_rules:
                if proto == p and (dst & mask) == net and dport == dp:
                    denied = True
                    break
            if denied:
                continue
            fdb[(f[6:12], vlan)] = port
            q = fdb.get((f[0:6], vlan))
            if q is None or q == port:
                continue
            if trunk[q]:
                f = f[:12] + st.pack("!HH", 0x8100, vlan) + f[12:]
            out.append(f)
            n += 1
        if len(out) > 100000:
            out.clear()
    return n / (time.thread_time() - t0)


def run_peer(seconds: float = 1.0) -> dict:
    """Measure the plain-Python peer on the benchmark's own traffic."""
    sw, mem = build()
    traffic = []
    for j in range(int(mem.state[1])):
        o, ln, pid = int(mem.inq[1, j]), int(mem.inq[2, j]), int(mem.inq[0, j])
        traffic.append((pid, bytes(mem.indata[o:o + ln])))
    vlan_of = {p.port_id: (10 if k < N_PORTS // 2 else 0)
               for k, p in enumerate(sorted(sw.ports.values(), key=lambda p: p.port_id))}
    trunk = {p.port_id: k >= N_PORTS // 2
             for k, p in enumerate(sorted(sw.ports.values(), key=lambda p: p.port_id))}
    rules = [((192 << 24) | (168 << 16) | (r << 8), 0xFFFFFF00, 6, 1000 + r) for r in range(8)]
    pps = _python_peer(traffic, vlan_of, trunk, rules, seconds)
    return {"python_mpps_per_core": pps / 1e6}
