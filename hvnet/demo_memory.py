"""``hvnet demo --in-memory``: the switch in memory, with extensions, traffic and a report.

An uplink (external port), the host vNIC (internal port) and three VMs
(synthetic ports; vm1 and vm2 on VLAN 10, vm3 on VLAN 20), the example pcap
capture and 5-tuple ACL extensions, DHCP guard on vm3, and traffic that shows
each decision the switch makes: learning and flooding, unicast, VLAN
separation, a trunked uplink, an ACL deny, MAC spoofing and DHCP guard.
"""
from __future__ import annotations

import os
import tempfile

from rich.console import Console
from rich.table import Table
from scapy.all import ARP, BOOTP, DHCP, ICMP, IP, TCP, UDP, Dot1Q, Ether, raw, rdpcap

from examples.acl_filter import AclFilter, five_tuple
from examples.pcap_capture import PcapCapture
from switch.memport import MemoryPorts
from switch.properties import SecurityProperty, VlanProperty
from switch.switch import Switch

MACS = {"uplink": "02:00:00:00:00:fe", "host": "02:00:00:00:00:01",
        "vm1": "02:00:00:00:01:01", "vm2": "02:00:00:00:01:02", "vm3": "02:00:00:00:01:03"}
IPS = {"uplink": "10.0.0.254", "host": "10.0.0.1", "vm1": "10.0.10.1", "vm2": "10.0.10.2",
       "vm3": "10.0.20.3"}


def _traffic():
    """(sender, description, frame) in order."""
    e = lambda s, d: Ether(src=MACS[s], dst=MACS[d] if d in MACS else d)  # noqa: E731
    ip = lambda s, d: IP(src=IPS[s], dst=IPS[d])  # noqa: E731
    return [
        ("vm1", "ARP who-has vm2 (broadcast, flooded on VLAN 10)",
         raw(e("vm1", "ff:ff:ff:ff:ff:ff") / ARP(psrc=IPS["vm1"], pdst=IPS["vm2"], hwsrc=MACS["vm1"]))),
        ("vm2", "ARP reply to vm1 (learned unicast)",
         raw(e("vm2", "vm1") / ARP(op=2, psrc=IPS["vm2"], pdst=IPS["vm1"], hwsrc=MACS["vm2"]))),
        ("vm1", "ping vm2", raw(e("vm1", "vm2") / ip("vm1", "vm2") / ICMP())),
        ("vm2", "pong vm1", raw(e("vm2", "vm1") / ip("vm2", "vm1") / ICMP(type=0))),
        ("vm1", "telnet to vm2 (the ACL extension denies TCP 23)",
         raw(e("vm1", "vm2") / ip("vm1", "vm2") / TCP(dport=23, flags="S"))),
        ("vm1", "ssh to vm2 (allowed)", raw(e("vm1", "vm2") / ip("vm1", "vm2") / TCP(dport=22, flags="S"))),
        ("vm3", "vm3 on VLAN 20 asks for vm1 (no VLAN 20 member but the uplink trunk)",
         raw(e("vm3", "ff:ff:ff:ff:ff:ff") / ARP(psrc=IPS["vm3"], pdst=IPS["vm1"], hwsrc=MACS["vm3"]))),
        ("uplink", "router on the uplink, VLAN 10 tagged, to vm1",
         raw(e("uplink", "vm1") / Dot1Q(vlan=10) / ip("uplink", "vm1") / ICMP())),
        ("vm1", "vm1 answers the router (tagged on the trunk)",
         raw(e("vm1", "uplink") / ip("vm1", "uplink") / ICMP(type=0))),
        ("vm2", "vm2 spoofs vm1's MAC (MAC spoofing off)",
         raw(Ether(src=MACS["vm1"], dst=MACS["vm2"]) / ip("vm2", "vm1") / ICMP())),
        ("vm3", "rogue DHCP offer from vm3 (DHCP guard)",
         raw(e("vm3", "ff:ff:ff:ff:ff:ff") / IP(src=IPS["vm3"], dst="255.255.255.255")
             / UDP(sport=67, dport=68) / BOOTP(op=2) / DHCP(options=[("message-type", "offer"), "end"]))),
        ("host", "host vNIC broadcast (untagged = VLAN 0: only the uplink's native VLAN)",
         raw(e("host", "ff:ff:ff:ff:ff:ff") / ARP(psrc=IPS["host"], pdst=IPS["uplink"], hwsrc=MACS["host"]))),
    ]


def run(console: Console | None = None, pcap_path: str | None = None) -> dict:
    console = console or Console()
    sw = Switch("demo")
    mem = MemoryPorts()
    ports = {
        "uplink": sw.add_port("uplink", "external", kind=mem),
        "host": sw.add_port("host", "internal", kind=mem),
        "vm1": sw.add_port("vm1", "synthetic", mac=MACS["vm1"], kind=mem,
                           properties=[VlanProperty("access", access_vlan=10)]),
        "vm2": sw.add_port("vm2", "synthetic", mac=MACS["vm2"], kind=mem,
                           properties=[VlanProperty("access", access_vlan=10)]),
        "vm3": sw.add_port("vm3", "synthetic", mac=MACS["vm3"], kind=mem,
                           properties=[VlanProperty("access", access_vlan=20),
                                       SecurityProperty(dhcp_guard=True)]),
    }
    pcap_path = pcap_path or os.path.join(tempfile.gettempdir(), "hvnet-demo.pcap")
    cap = sw.install(PcapCapture(pcap_path, "ingress"))
    sw.install(AclFilter([five_tuple("deny", proto="tcp", dport=23, weight=10)]))
    names = {p.port_id: n for n, p in ports.items()}
    steps = Table(title="Traffic through the switch", show_lines=False)
    steps.add_column("from")
    steps.add_column("what")
    steps.add_column("delivered to")
    steps.add_column("dropped because", style="red")
    for sender, what, frame in _traffic():
        before = sw.counters.drop_in[ports[sender].port_id].copy()
        mem.inject(ports[sender], [frame])
        sw.poll()
        got = mem.collect_by_port()
        to = []
        for pid, frames in sorted(got.items()):
            tagged = any(len(f) >= 14 and f[12:14] == b"\x81\x00" for f in frames)
            to.append(names[pid] + (" (tagged)" if tagged else ""))
        diff = sw.counters.drop_in[ports[sender].port_id] - before
        why = "; ".join(sw.counters.reason_text(c) for c in diff.nonzero()[0])
        steps.add_row(sender, what, ", ".join(to) or "-", why)
    cap.writer.flush()
    console.print(steps)
    st = sw.stats()
    t = Table(title=f"Ports of switch {sw.name!r}")
    for col in ("port", "type", "rx", "tx", "dropped in", "dropped out"):
        t.add_column(col, justify="right" if col not in ("port", "type") else "left")
    for name, d in st["ports"].items():
        t.add_row(name, d["type"], str(d["rx_packets"]), str(d["tx_packets"]),
                  str(d["dropped_in"]), str(d["dropped_out"]))
    console.print(t)
    c = st["counters"]
    console.print(f"MACs learned {c['learned_macs']}, frames flooded {c['flooded_packets']}, "
                  f"contract violations {c['contract_violations']}")
    read_back = len(rdpcap(pcap_path))
    console.print(f"capture extension wrote {cap.writer.records} frames to {pcap_path} "
                  f"(scapy reads back {read_back})")
    sw.uninstall(cap.name)
    return st
