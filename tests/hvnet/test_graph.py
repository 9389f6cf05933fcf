"""Topology pictures: PNG and SVG come out readable, big topologies do not overlap."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from itertools import combinations
from pathlib import Path

import pytest

from hvnet.graph import _layout, render
from hvnet.topology import load, parse
from switch.port import mac_to_str

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "topologies" / "demo.yaml"


def big_topology(per_switch: int = 8):
    """Two switches with ``per_switch`` VMs each, trunks, host vNICs, uplinks, and one
    VM with a NIC on each switch."""
    vms = []
    for s in range(2):
        for i in range(per_switch):
            vlan = ("{mode: trunk, native: 1, allowed: '10-20,30,40-45'}" if i == 0 else
                    f"{{mode: access, id: {10 + i % 4}}}" if i % 3 else "untagged")
            nics = [f"{{switch: sw{s}, kind: synthetic, mac: '02:00:00:00:{s:02x}:{i:02x}', "
                    f"addresses: [10.{s}.{i}.1/24], vlan: {vlan}}}"]
            if s == 0 and i == 1:
                nics.append("{switch: sw1, kind: sriov, mac: '02:00:00:01:00:99'}")
            vms.append(f"  vm{s}x{i}:\n    nics:\n" + "".join(f"      - {n}\n" for n in nics))
    text = (
        "name: big\n"
        "switches:\n"
        "  sw0: {extensions: [{type: acl-filter}, {type: pcap-capture}], uplink: {mtu: 9000}}\n"
        "  sw1: {uplink: {sriov: {vfs: 2}}}\n"
        "vms:\n" + "".join(vms) +
        "host:\n"
        "  - {switch: sw0, namespace: hosta, addresses: [10.0.0.1/24]}\n"
        "  - {switch: sw1, namespace: hostb, vlan: {mode: access, id: 11}}\n"
        "physical:\n"
        "  router: {switch: sw0, mac: '02:00:00:00:00:fe', addresses: [10.0.10.254/24], vlan: 10}\n"
        "  nas: {switch: sw0, addresses: [10.0.0.9/24]}\n"
        "  peer: {switch: sw1, addresses: [10.1.0.9/24], vlan: 30}\n"
    )
    return parse(text, "big.yaml")


def test_png(tmp_path):
    from matplotlib.image import imread
    out = tmp_path / "demo.png"
    render(load(DEMO), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = imread(str(out)).shape[:2]
    assert w > 300 and h > 300


def test_svg_has_the_names(tmp_path):
    topo = load(DEMO)
    out = tmp_path / "demo.svg"
    render(topo, str(out))
    text = out.read_text()
    ET.fromstring(text)            # well-formed XML
    # Taken from the file, so the test follows demo.yaml as it changes.
    words = list(topo.vms) + list(topo.switches) + list(topo.physical) + ["host vNIC"]
    words += [" | ".join([s.name] + [e.type for e in s.extensions])
              for s in topo.switches.values()]
    for nics in topo.vms.values():
        for n in nics:
            words += [mac_to_str(n.port.mac)] + n.port.addresses
            if n.port.vlan is not None and n.port.vlan.mode == "access":
                words += [f"access vlan {n.port.vlan.access_vlan}",
                          f"VLAN {n.port.vlan.access_vlan}"]
    words += [f"vlan {p.vlan} tagged" for p in topo.physical.values() if p.vlan]
    for word in words:
        assert word in text, word


@pytest.mark.parametrize("names", [("vm1.eth0", "host.vEth-sw0", "sw0.uplink"),  # runtime
                                   ("vm1", "host", "uplink")])                     # hvnet demo
def test_running_counters_are_written(tmp_path, names):
    out = tmp_path / "run.svg"
    running = {n: {"rx_packets": 4711 + k, "tx_packets": 42} for k, n in enumerate(names)}
    render(load(DEMO), str(out), running=running)
    text = out.read_text()
    assert all(f"rx {4711 + k}  tx 42" in text for k in range(3))
    assert text.count("  tx ") == 3


def test_two_switches_eight_vms_each(tmp_path):
    topo = big_topology(8)
    out = tmp_path / "big.svg"
    render(topo, str(out))
    text = out.read_text()
    assert all(f"vm{s}x{i}" in text for s in range(2) for i in range(8))
    assert "sw0 | acl-filter | pcap-capture" in text and "allowed 10-20,30," in text
    png = tmp_path / "big.png"
    render(topo, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("per_switch", [1, 3, 8, 12])
def test_boxes_do_not_overlap(per_switch):
    boxes, lines, (x0, x1, y0, y1) = _layout(big_topology(per_switch), None)
    top = [b for b in boxes if b.kind != "port"]
    for a, b in combinations(top, 2):
        apart = (a.x + a.w <= b.x or b.x + b.w <= a.x or a.y + a.h <= b.y or b.y + b.h <= a.y)
        assert apart, (a.title, b.title)
    for vm in (b for b in boxes if b.kind == "vm"):
        for p in vm.children:   # ports inside their VM, side by side
            assert vm.x <= p.x and p.x + p.w <= vm.x + vm.w and vm.y <= p.y
        for p, q in zip(vm.children, vm.children[1:]):
            assert p.x + p.w <= q.x
    for b in top:
        assert x0 <= b.x and b.x + b.w <= x1 and y0 <= b.y and b.y + b.h <= y1


@pytest.mark.parametrize("name", ["topo.pdf", "topo", "topo.PNG.txt"])
def test_bad_extension(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.png, \.svg"):
        render(load(DEMO), str(tmp_path / name))
    assert not (tmp_path / name).exists()


def test_import_does_not_load_matplotlib():
    r = subprocess.run([sys.executable, "-c", "import sys, hvnet.graph; "
                        "sys.exit('matplotlib' in sys.modules)"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr or "matplotlib imported at module level"
