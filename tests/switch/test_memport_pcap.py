"""In-memory ports and pcap output."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from scapy.all import Dot1Q, Ether, rdpcap

from examples.pcap_capture import PcapCapture
from switch.batch import PacketBatch
from switch.memport import MemoryPorts
from switch.pcap import PcapWriter
from switch.parse import parse_batch
from switch.properties import VlanProperty
from tests.conftest import Rig, udp

BCAST = "ff:ff:ff:ff:ff:ff"


def test_memory_port_queues_in_order_and_in_batches():
    r = Rig(2)
    frames = [udp(1, BCAST, sport=1000 + k) for k in range(600)]
    assert r.mem.inject(r.ports[0], frames) == 600
    polls = 0
    while r.mem.pending():
        r.sw.poll()
        polls += 1
    assert polls == 3                                   # 256 + 256 + 88
    assert r.mem.collect(r.ports[1]) == frames


def test_full_input_queue_refuses_what_does_not_fit():
    m = MemoryPorts(in_frames=4, in_bytes=1 << 12)
    r = Rig(2)
    p = r.sw.add_port("p9", "synthetic", mac="02:00:00:00:00:09", kind=m)
    assert m.inject(p, [udp(9, BCAST)] * 6) == 4


def test_inject_only_from_own_ports():
    r = Rig(2)
    with pytest.raises(ValueError, match="not one of this memory port kind's ports"):
        r.mem.inject(9999, [udp(1, BCAST)])


def test_full_output_counts_drops_on_the_port():
    r = Rig(2)
    r.mem.outq = r.mem.outq[:, :3].copy()
    r.send(1, *[udp(1, BCAST, sport=k) for k in range(5)])
    d = r.sw.counters.port_dict(r.ports[1].port_id)
    assert d["tx_packets"] == 3 and d["drops_out"] == {
        "destination port could not take the frame (queue full)": 2}


def test_capture_extension_writes_a_pcap_that_scapy_and_tshark_read(tmp_path):
    r = Rig(3)
    r.sw.add_port_property(r.ports[0], VlanProperty("trunk", allowed=(7,)))
    r.sw.add_port_property(r.ports[1], VlanProperty("access", access_vlan=7))
    path = tmp_path / "in.pcap"
    cap = r.sw.install(PcapCapture(path))
    sent = [udp(1, BCAST, vid=7, prio=3, sport=k) for k in range(300)] + [udp(2, BCAST)]
    r.send(1, *sent[:300])
    r.send(2, sent[300])
    r.sw.uninstall(cap.name)
    pk = rdpcap(str(path))
    assert [bytes(p) for p in pk] == sent               # tags put back as on the wire
    assert pk[0][Dot1Q].vlan == 7 and pk[0][Dot1Q].prio == 3
    if shutil.which("tshark"):
        out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "vlan.id"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.split().count("7") == 300


def test_pcap_snaplen_clips_but_keeps_wire_length(tmp_path):
    b = PacketBatch()
    f = udp(1, BCAST, vid=3, payload=b"z" * 100)
    b.append_frames([f])
    parse_batch(b.meta, b.data, 0, b.n)
    path = tmp_path / "s.pcap"
    with PcapWriter(path, snaplen=14) as w:
        w.write_batch(b.meta, b.data, b.n, 0)
    raw = path.read_bytes()
    caplen, wire = int.from_bytes(raw[32:36], "little"), int.from_bytes(raw[36:40], "little")
    assert (caplen, wire) == (14, len(f))
    assert raw[40:54] == f[:14]


def test_egress_capture_leaves_out_dropped_packets(tmp_path):
    r = Rig(3)
    path = tmp_path / "out.pcap"
    r.sw.install(PcapCapture(path, "egress"))
    r.send(1, udp(1, BCAST), udp(5, BCAST))              # the second is spoofed: dropped
    r.sw.uninstall("pcap-capture")
    assert len(rdpcap(str(path))) == 1
    assert Ether(bytes(rdpcap(str(path))[0])).src == "02:00:00:00:00:01"


@pytest.mark.parametrize("direction", ["sideways"])
def test_capture_direction_is_checked(tmp_path, direction):
    with pytest.raises(ValueError):
        PcapCapture(tmp_path / "x.pcap", direction)


def test_a_batch_with_an_impossible_source_is_dropped_not_followed():
    from switch.batch import SRC_PORT
    r = Rig(2)
    b = r.sw.new_batch()
    b.append_frames([udp(1, BCAST)] * 2, src_port=r.ports[0].port_id)
    b.meta[SRC_PORT, 1] = 10**9
    assert r.sw.process(b) == 1
    assert r.sw.counters.port_dict(0)["drops_in"] == {"source NIC is not connected": 1}
