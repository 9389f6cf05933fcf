"""A topology up in real namespaces through the ``hvnet`` command line, as users run it.

One topology for the module: the host vNIC (internal port, a tap in namespace
``host``) and ``nas`` behind the uplink (AF_PACKET rings on a veth, a Linux
bridge for the physical network), two VMs on VLAN 10. The daemon runs detached;
everything goes through the CLI and its control socket. State lives in a
temporary directory (HVNET_STATE_DIR), names carry a per-process prefix, and the
module ends with ``hvnet down`` and a check that nothing is left.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import NetNS, netns
from scapy.all import ICMP, IP, rdpcap

from hvnet import nsexec

from .nsutil import RECEIVER, SENDER, hvnet, ours

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NAME = f"r{os.getpid() % 10000}"
TOPO = f"""
name: {NAME}
switches:
  sw0:
    uplink: {{mtu: 1500}}
vms:
  vm1:
    nics: [{{switch: sw0, kind: tap, mac: "02:00:00:88:00:01", addresses: [10.88.10.1/24],
             vlan: {{mode: access, id: 10}}}}]
  vm2:
    nics: [{{switch: sw0, kind: tap, mac: "02:00:00:88:00:02", addresses: [10.88.10.2/24],
             vlan: {{mode: access, id: 10}}}}]
host:
  - {{switch: sw0, namespace: host, addresses: [10.88.0.1/24, "fd88::1/64"]}}
physical:
  nas: {{switch: sw0, mac: "02:00:00:88:00:fe", addresses: [10.88.0.2/24, "fd88::2/64"]}}
"""
@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    d = tmp_path_factory.mktemp("rt")
    env = {**os.environ, "HVNET_STATE_DIR": str(d / "state")}
    f = d / "t.yaml"
    f.write_text(TOPO)
    r = hvnet(env, "up", str(f), "--json")
    try:
        assert r.returncode == 0, r.stderr
        yield env, json.loads(r.stdout), d
    finally:
        hvnet(env, "down", NAME)
        left = ours(NAME)
        if left:                                   # leave the machine clean anyway
            hvnet(env, "clean", "--force")
        assert not left, f"left behind: {left}"
        assert not (d / "state" / NAME).exists()


def ns(m):
    return f"{NAME}-{m}"


def ping(src, dst, count=3):
    return nsexec.run(ns(src), ["ping", "-c", str(count), "-i", "0.2", "-W", "1", dst],
                      timeout=30).returncode == 0


def test_up_reports_ports_and_ps_lists_it(topo):
    env, st, _ = topo
    assert sorted(p["port"] for p in st["ports"]) == [
        "host.vEth-sw0", "sw0.uplink", "vm1.eth0", "vm2.eth0"]
    types = {p["port"]: p["type"] for p in st["ports"]}
    assert types["sw0.uplink"] == "external" and types["host.vEth-sw0"] == "internal"
    rows = json.loads(hvnet(env, "ps", "--json", check=True).stdout)
    row = next(r for r in rows if r["name"] == NAME)
    assert row["state"] == "running" and row["ports"] == 4 and row["errors"] == []
    assert ours(NAME) == sorted(ns(m) for m in ("host", "nas", "sw0-lan", "vm1", "vm2"))


def test_internal_port_and_uplink_ping_both_ways_with_arp_and_nd(topo):
    assert ping("host", "10.88.0.2") and ping("nas", "10.88.0.1")
    assert ping("host", "fd88::2") and ping("nas", "fd88::1")
    with NetNS(ns("host")) as nl:
        neigh = {n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR") for n in nl.get_neighbours()}
    assert neigh.get("10.88.0.2") == "02:00:00:88:00:fe"          # ARP through the switch
    assert neigh.get("fd88::2") == "02:00:00:88:00:fe"            # and neighbour discovery


def _transfer(src, dst, addr, mib, port):
    rx = nsexec.popen(ns(dst), [sys.executable, "-c", RECEIVER, addr, str(port)],
                      stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "listening"
        tx = nsexec.run(ns(src), [sys.executable, "-c", SENDER, addr, str(port), str(mib)],
                        timeout=120)
        assert tx.returncode == 0, tx.stderr
        got, _ = rx.communicate(timeout=60)
        return tx.stdout.split(), got.split()
    finally:
        nsexec.stop(rx)


def test_tcp_transfer_is_intact_both_ways_and_crosses_as_super_packets(topo):
    env = topo[0]
    before = json.loads(hvnet(env, "stats", "--json", check=True).stdout)["sw0"]["ports"]
    sent, got = _transfer("host", "nas", "10.88.0.2", 48, 5301)
    assert sent == got and int(got[0]) == 48 << 20
    sent, got = _transfer("nas", "host", "10.88.0.1", 48, 5302)
    assert sent == got
    after = json.loads(hvnet(env, "stats", "--json", check=True).stdout)["sw0"]["ports"]

    def avg(port, d):
        n = after[port][f"{d}_packets"] - before[port][f"{d}_packets"]
        return (after[port][f"{d}_bytes"] - before[port][f"{d}_bytes"]) / max(n, 1)
    # GSO super-packets, not MTU-sized frames, crossed the switch in both directions:
    # from the host's tap to the uplink ring and from the uplink ring to the tap.
    assert avg("host.vEth-sw0", "rx") > 3000 and avg("sw0.uplink", "tx") > 3000
    assert avg("sw0.uplink", "rx") > 3000 and avg("host.vEth-sw0", "tx") > 3000


def test_iperf3_between_the_internal_port_and_the_physical_network(topo):
    srv = nsexec.popen(ns("nas"), ["iperf3", "-s", "-1", "-B", "10.88.0.2", "-p", "5303"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            r = nsexec.run(ns("host"), ["iperf3", "-c", "10.88.0.2", "-p", "5303", "-t", "1",
                                        "-J"], timeout=60)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert r.returncode == 0, r.stdout[-500:]
        bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
        assert bps > 1e8
    finally:
        nsexec.stop(srv)


def test_capture_file_reads_back_in_scapy_and_tshark(topo, tmp_path):
    env = topo[0]
    pcap = tmp_path / "host.pcap"
    cap = subprocess.Popen([sys.executable, "-m", "hvnet.cli", "capture", "-t", NAME,
                            "host.vEth-sw0", "-w", str(pcap), "-c", "10", "--seconds", "20"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert ping("host", "10.88.0.2", count=5)
        _, errs = cap.communicate(timeout=30)
    finally:
        nsexec.stop(cap)
    assert cap.returncode == 0, errs
    pkts = rdpcap(str(pcap))
    echo = [p for p in pkts if ICMP in p]
    req = [p for p in echo if p[ICMP].type == 8]
    rep = [p for p in echo if p[ICMP].type == 0]
    assert req and rep
    assert all(p[IP].src == "10.88.0.1" and p[IP].dst == "10.88.0.2" for p in req)
    assert all(p[IP].src == "10.88.0.2" and p[IP].dst == "10.88.0.1" for p in rep)
    if os.path.exists("/usr/bin/tshark"):
        t = subprocess.run(["tshark", "-r", str(pcap), "-Y", "icmp", "-T", "fields", "-e",
                            "icmp.type"], capture_output=True, text=True, timeout=60)
        assert t.returncode == 0, t.stderr
        assert sorted(set(t.stdout.split())) == ["0", "8"]


def test_vlan_change_at_run_time_cuts_off_and_restores(topo):
    env = topo[0]
    assert ping("vm1", "10.88.10.2")
    r = hvnet(env, "set", "-t", NAME, "vm2.eth0", "vlan={mode: access, id: 20}", check=True)
    assert "vlan set" in r.stdout
    assert not ping("vm1", "10.88.10.2", count=2)
    hvnet(env, "set", "-t", NAME, "vm2.eth0", "vlan={mode: access, id: 10}", check=True)
    assert ping("vm1", "10.88.10.2")


def test_acl_set_and_deleted_at_run_time(topo):
    env = topo[0]
    hvnet(env, "set", "-t", NAME, "vm2.eth0",
          "acl=[{direction: in, action: deny, protocol: icmp, weight: 5}]", check=True)
    assert not ping("vm1", "10.88.10.2", count=2)
    st = json.loads(hvnet(env, "stats", "-t", NAME, "vm2.eth0", "--json", check=True).stdout)
    assert st["sw0"]["ports"]["vm2.eth0"]["drops_out"]["port ACL denied (inbound to the port)"]
    hvnet(env, "set", "-t", NAME, "vm2.eth0", "acl=none", check=True)
    assert ping("vm1", "10.88.10.2")


def test_vm_added_and_removed_at_run_time(topo):
    env = topo[0]
    spec = ('{nics: [{switch: sw0, kind: tap, mac: "02:00:00:88:00:03", '
            'addresses: [10.88.10.3/24], vlan: {mode: access, id: 10}}]}')
    r = hvnet(env, "vm", "-t", NAME, "add", "vm3", "--spec", spec, check=True)
    assert "vm3.eth0" in r.stdout
    assert ping("vm3", "10.88.10.1")
    r = hvnet(env, "exec", "-t", NAME, "vm3", "--", "cat", "/proc/net/dev")
    assert r.returncode == 0 and "eth0" in r.stdout
    hvnet(env, "vm", "-t", NAME, "rm", "vm3", check=True)
    assert ns("vm3") not in netns.listnetns()
    st = json.loads(hvnet(env, "stats", "-t", NAME, "--json", check=True).stdout)
    assert "vm3.eth0" not in st["sw0"]["ports"]
    # a duplicate MAC is refused with its place named, and nothing is made
    r = hvnet(env, "vm", "-t", NAME, "add", "vm4", "--spec",
              '{nics: [{switch: sw0, kind: tap, mac: "02:00:00:88:00:01"}]}')
    assert r.returncode != 0 and "already used by vms.vm1.nics[0]" in r.stderr
    assert ns("vm4") not in netns.listnetns()


def test_bad_requests_get_errors_and_the_daemon_keeps_serving(topo):
    env, _, d = topo
    sock = d / "state" / NAME / "control.sock"
    for raw, want in ((b"this is not json\n", "not JSON"),
                      (b'{"op": "nosuch"}\n', "unknown op"),
                      (b'{"op": "stats", "bogus": 1}\n', "bad arguments"),
                      (b'["op"]\n', "expected an object"),
                      (b'{"op": "set", "port": "nope", "key": "vlan", "value": "x"}\n', "")):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(sock))
            s.sendall(raw)
            reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and want in reply["error"]
    r = hvnet(env, "stats", "-t", NAME, "nosuch.port")
    assert r.returncode == 1 and "no port 'nosuch.port'" in r.stderr
    r = hvnet(env, "set", "-t", NAME, "vm1.eth0", "vlan={mode: access, id: 5000}")
    assert r.returncode == 1 and "5000" in r.stderr
    r = hvnet(env, "exec", "-t", NAME, "nosuch", "--", "true")
    assert r.returncode == 1 and "no machine 'nosuch'" in r.stderr
    assert hvnet(env, "ps", "--json", check=True).stdout.count('"running"') >= 1
    assert ping("host", "10.88.0.2", count=1)


def test_graph_of_the_running_topology(topo, tmp_path):
    env = topo[0]
    out = tmp_path / "g.svg"
    hvnet(env, "graph", "-t", NAME, "-o", str(out), check=True)
    svg = out.read_text()
    assert "vm1" in svg and "sw0" in svg and "nas" in svg


# ---------------------------------------------------------------- crash and clean-up
def test_kill_9_then_clean_leaves_nothing(tmp_path):
    name = f"k{os.getpid() % 10000}"
    env = {**os.environ, "HVNET_STATE_DIR": str(tmp_path / "state")}
    f = tmp_path / "k.yaml"
    f.write_text(TOPO.replace(f"name: {NAME}", f"name: {name}"))
    try:
        hvnet(env, "up", str(f), check=True)
        run = tmp_path / "state" / name
        pid = json.loads((run / "daemon.json").read_text())["pid"]
        assert (run / "control.sock").exists() and ours(name)
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or \
                    Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        rows = json.loads(hvnet(env, "ps", "--json", check=True).stdout)
        assert [r["state"] for r in rows if r["name"] == name] == ["dead"]
        assert ours(name)                          # the crash left its namespaces
        r = hvnet(env, "clean", check=True)
        assert "netns" in r.stdout
        assert not ours(name)
        assert not run.exists()
        assert not Path(f"/proc/{pid}").exists() or "Z" in \
            Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    finally:
        if ours(name):
            hvnet(env, "clean", "--force")


# ---------------------------------------------------------------- invalid files create nothing
BAD = {
    "unknown key": (TOPO + "colour: blue\n", "colour: unknown key"),
    "bad MAC": (TOPO.replace('"02:00:00:88:00:02"', '"02:00:00:88:00"'),
                "vms.vm2.nics[0].mac"),
    "duplicate MAC": (TOPO.replace('"02:00:00:88:00:02"', '"02:00:00:88:00:01"'),
                      "already used by vms.vm1.nics[0]"),
    "unknown switch": (TOPO.replace("{switch: sw0, kind: tap, mac: \"02:00:00:88:00:02\"",
                                    "{switch: sw9, kind: tap, mac: \"02:00:00:88:00:02\""),
                       "vms.vm2.nics[0].switch: no switch named 'sw9'"),
    "VLAN out of range": (TOPO.replace("id: 10}", "id: 4095}", 1),
                          "vms.vm1.nics[0].vlan.id"),
    "not YAML": ("name: [unclosed\n", "not valid YAML"),
    "sriov NIC without an SR-IOV uplink": (
        TOPO.replace("kind: tap, mac: \"02:00:00:88:00:02\"",
                     "kind: sriov, mac: \"02:00:00:88:00:02\""),
        "vms.vm2.nics[0].kind: an sriov NIC needs an SR-IOV uplink"),
    "extension that cannot start": (TOPO.replace("    uplink: {mtu: 1500}",
                                                 "    uplink: {mtu: 1500}\n    extensions:\n"
                                                 "      - {type: acl-filter, args: {bogus: 1}}"),
                                    "cannot create 'acl-filter'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_topology_says_where_and_creates_nothing(case, tmp_path):
    text, want = BAD[case]
    name = f"b{os.getpid() % 10000}"
    env = {**os.environ, "HVNET_STATE_DIR": str(tmp_path / "state")}
    f = tmp_path / "bad.yaml"
    f.write_text(text.replace(f"name: {NAME}", f"name: {name}"))
    try:
        r = hvnet(env, "up", str(f))
        assert r.returncode == 2, r.stderr
        assert want in r.stderr
        assert str(f) in r.stderr or case == "extension that cannot start"
        assert not ours(name)                  # (other tests may make theirs meanwhile)
        assert not (tmp_path / "state" / name).exists()
    finally:
        if (tmp_path / "state" / name).exists():      # it came up after all: take it down
            hvnet(env, "clean", "--force")


# ---------------------------------------------------------------- an uplink without offloads
def test_uplink_without_offloads_segments_in_the_switch(tmp_path):
    """uplink offloads: false: no virtio headers on the rings, so the switch cuts the
    host's 64 KiB segments into MTU frames with finished checksums (switch/gso.py),
    and the data still arrives intact both ways."""
    name = f"o{os.getpid() % 10000}"
    env = {**os.environ, "HVNET_STATE_DIR": str(tmp_path / "state")}
    f = tmp_path / "o.yaml"
    f.write_text(TOPO.replace(f"name: {NAME}", f"name: {name}")
                 .replace("uplink: {mtu: 1500}", "uplink: {mtu: 1500, offloads: false}"))
    def here(m):
        return f"{name}-{m}"
    try:
        hvnet(env, "up", str(f), check=True)
        for src, dst, addr, port in (("host", "nas", "10.88.0.2", 5311),
                                     ("nas", "host", "10.88.0.1", 5312)):
            rx = nsexec.popen(here(dst), [sys.executable, "-c", RECEIVER, addr, str(port)],
                              stdout=subprocess.PIPE, text=True)
            try:
                assert rx.stdout.readline().strip() == "listening"
                tx = nsexec.run(here(src), [sys.executable, "-c", SENDER, addr, str(port), "16"],
                                timeout=120)
                assert tx.returncode == 0, tx.stderr
                got, _ = rx.communicate(timeout=60)
                assert tx.stdout.split() == got.split()
            finally:
                nsexec.stop(rx)
        st = json.loads(hvnet(env, "stats", "--json", check=True).stdout)["sw0"]["ports"]
        host, up = st["host.vEth-sw0"], st["sw0.uplink"]
        # super-packets in: an average above a full frame needs some. (Not more: TCP
        # sizes its GSO segments by its pacing rate, smaller on a loaded machine;
        # a run beside another test suite averaged 2500 bytes.)
        assert host["rx_bytes"] / host["rx_packets"] > 1514
        # ...and MTU frames out: the switch segmented them (counters count what the
        # switch delivered, before segmentation, so look at the wire's own counter)
        with NetNS(here("nas")) as nl:
            link = nl.get_links(ifname="eth0")[0]
            stats = link.get_attr("IFLA_STATS64")
        assert stats["rx_bytes"] / stats["rx_packets"] <= 1514
        assert up["dropped_out"] == 0
    finally:
        hvnet(env, "clean", "--force")


# ---------------------------------------------------------------- rootless
def test_rootless_run_lives_in_its_own_user_namespace(tmp_path):
    """HVNET_ROOTLESS=1 takes the path a non-root user takes (hvnet.rootless): the
    daemon unshares a user, mount and network namespace and keeps its machines'
    namespaces to itself; hvnet exec joins them; they die with the daemon."""
    name = f"u{os.getpid() % 10000}"
    env = {**os.environ, "HVNET_STATE_DIR": str(tmp_path / "state"), "HVNET_ROOTLESS": "1"}
    f = tmp_path / "u.yaml"
    f.write_text(TOPO.replace(f"name: {NAME}", f"name: {name}"))
    try:
        hvnet(env, "up", str(f), check=True)
        info = json.loads((tmp_path / "state" / name / "daemon.json").read_text())
        assert info["rootless"] and not ours(name)     # nothing in the host's /run/netns
        assert Path(f"/proc/{info['pid']}/ns/user").resolve() != \
            Path("/proc/self/ns/user").resolve()
        for src, dst in (("vm1", "10.88.10.2"), ("host", "10.88.0.2")):
            r = hvnet(env, "exec", "-t", name, src, "--", "ping", "-c", "2", "-W", "1", dst)
            assert r.returncode == 0, r.stdout + r.stderr
        r = hvnet(env, "exec", "-t", name, "vm1", "--", "cat", "/proc/self/uid_map")
        assert r.stdout.split()[:2] == ["0", str(os.geteuid())]
        os.kill(info["pid"], signal.SIGKILL)
        hvnet(env, "clean", check=True)
        assert not (tmp_path / "state" / name).exists()
    finally:
        hvnet(env, "clean", "--force")
