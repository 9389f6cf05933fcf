"""Shared fixtures: small switches with in-memory ports, and frame builders."""
from __future__ import annotations

import pytest
from scapy.all import IP, UDP, Ether, Dot1Q, raw

from switch.memport import MemoryPorts
from switch.properties import SecurityProperty
from switch.switch import Switch


def mac(n: int) -> str:
    return f"02:00:00:00:00:{n:02x}"


def udp(src: int, dst: int | str, vid: int | None = None, sport=1000, dport=2000,
        ipsrc="10.0.0.1", ipdst="10.0.0.2", prio: int = 0, payload=b"x" * 18) -> bytes:
    d = dst if isinstance(dst, str) else mac(dst)
    e = Ether(src=mac(src), dst=d)
    if vid is not None:
        e = e / Dot1Q(vlan=vid, prio=prio)
    return raw(e / IP(src=ipsrc, dst=ipdst) / UDP(sport=sport, dport=dport) / payload)


class Rig:
    """A switch with in-memory ports p1..pN whose NIC MACs are 02:..:0k."""

    def __init__(self, n=3, strict=False, spoof=False, **kw):
        self.sw = Switch("test", max_ports=max(8, n), strict=strict, **kw)
        self.mem = MemoryPorts()
        props = [SecurityProperty(allow_mac_spoofing=True)] if spoof else []
        self.ports = [self.sw.add_port(f"p{k}", "synthetic", mac=mac(k), kind=self.mem,
                                       properties=list(props))
                      for k in range(1, n + 1)]

    def send(self, port_no: int, *frames) -> dict[int, list[bytes]]:
        """Inject from p<port_no>, switch everything, return {port_no: [frames]}."""
        self.mem.inject(self.ports[port_no - 1], list(frames))
        while self.mem.pending():
            self.sw.poll()
        byid = self.mem.collect_by_port()
        return {k: byid.get(p.port_id, []) for k, p in enumerate(self.ports, 1)
                if byid.get(p.port_id)}

    def drops(self, port_no: int) -> dict:
        return self.sw.counters.port_dict(self.ports[port_no - 1].port_id)["drops_in"]

    def drops_out(self, port_no: int) -> dict:
        return self.sw.counters.port_dict(self.ports[port_no - 1].port_id)["drops_out"]


@pytest.fixture
def rig():
    return Rig()
