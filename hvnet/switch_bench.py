"""``hvnet bench switch``: two namespaces through hvnet's switch, beside the peers.

The same two endpoints as baseline.md (10.9.0.1 and 10.9.0.2, fixed MACs, default
offloads) joined in turn by a direct veth pair, a Linux bridge, and two hvnet
paths brought up by the real daemon (``hvnet up``):

- ``hvnet tap-tap``: two VMs whose NICs are tap ports of one switch;
- ``hvnet synthetic``: two VMs with synthetic NICs (NetVSC and NetVSP over VMBus);
- ``hvnet e1000-synthetic`` / ``synthetic-e1000``: a VM with an emulated e1000 NIC
  and one with a synthetic NIC, traffic from the first to the second;
- ``hvnet internal-uplink``: the host vNIC (internal port, a tap) to a host on the
  physical network behind the uplink (AF_PACKET rings on a veth, a Linux bridge
  on the far side); ``internal-uplink-v3`` the same with TPACKET_V3 rings (not
  run by default; ``--paths`` picks);
- ``hvnet vmq``: a host on the physical network to a synthetic VM whose NIC owns a
  VMQ queue of the uplink (its frames skip the forwarding lookup and are switched
  by the queue's own worker thread).

Measurements and the table come from hvnet.e2e (iperf3 TCP with 1 and 4 streams,
64-byte UDP packets per second, ping), every path built and torn down per round,
ratios against the veth pair of the same run.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Iterator

from . import e2e

TOPOLOGIES = {
    "tap-tap": """
name: {name}
switches: {{sw0: {{}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: tap, mac: "{a_mac}", addresses: [{a_ip}/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: tap, mac: "{b_mac}", addresses: [{b_ip}/24]}}]}}
""",
    "synthetic": """
name: {name}
switches: {{sw0: {{}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: synthetic, mac: "{a_mac}", addresses: [{a_ip}/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: synthetic, mac: "{b_mac}", addresses: [{b_ip}/24]}}]}}
""",
    "e1000-synthetic": """
name: {name}
switches: {{sw0: {{}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: e1000, mac: "{a_mac}", addresses: [{a_ip}/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: synthetic, mac: "{b_mac}", addresses: [{b_ip}/24]}}]}}
""",
    "synthetic-e1000": """
name: {name}
switches: {{sw0: {{}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: synthetic, mac: "{a_mac}", addresses: [{a_ip}/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: e1000, mac: "{b_mac}", addresses: [{b_ip}/24]}}]}}
""",
    "internal-uplink": """
name: {name}
switches: {{sw0: {{uplink: {{mtu: 1500}}}}}}
host: [{{switch: sw0, namespace: a, mac: "{a_mac}", addresses: [{a_ip}/24]}}]
physical:
  b: {{switch: sw0, mac: "{b_mac}", addresses: [{b_ip}/24]}}
""",
    "vmq": """
name: {name}
switches: {{sw0: {{uplink: {{mtu: 1500, vmq: {{queues: 2}}}}}}}}
vms:
  b: {{nics: [{{switch: sw0, kind: synthetic, mac: "{b_mac}", addresses: [{b_ip}/24]}}]}}
physical:
  a: {{switch: sw0, mac: "{a_mac}", addresses: [{a_ip}/24]}}
""",
    "sriov": """
name: {name}
switches: {{sw0: {{uplink: {{mtu: 1500, sriov: {{vfs: 2}}}}}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: sriov, mac: "{a_mac}", addresses: [{a_ip}/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: sriov, mac: "{b_mac}", addresses: [{b_ip}/24]}}]}}
""",
    "internal-uplink-v3": """
name: {name}
switches: {{sw0: {{uplink: {{mtu: 1500, tpacket: 3}}}}}}
host: [{{switch: sw0, namespace: a, mac: "{a_mac}", addresses: [{a_ip}/24]}}]
physical:
  b: {{switch: sw0, mac: "{b_mac}", addresses: [{b_ip}/24]}}
""",
}


def _hvnet(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hvnet.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _wait_vf(env, name: str, seconds: float = 30.0) -> None:
    """Until both sriov NICs run on their VFs (the guest asks once its VF is up)."""
    import json
    import time
    deadline = time.monotonic() + seconds
    while True:
        r = _hvnet(env, "stats", "--json")
        nics = json.loads(r.stdout)["sw0"]["sriov"]["nics"] if r.returncode == 0 else {}
        if nics and all(v["datapath"] == "vf" for v in nics.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"hvnet up (sriov): the VMs are not on their VFs: {nics}")
        time.sleep(0.2)


def _path(kind: str):
    @contextlib.contextmanager
    def factory(prefix: str) -> Iterator[e2e.Path]:
        name = prefix[:6]
        with tempfile.TemporaryDirectory(prefix="hvnet-bench-") as tmp:
            env = {**os.environ, "HVNET_STATE_DIR": os.path.join(tmp, "state")}
            f = os.path.join(tmp, "t.yaml")
            with open(f, "w") as fh:
                fh.write(TOPOLOGIES[kind].format(name=name, a_mac=e2e.A_MAC, b_mac=e2e.B_MAC,
                                                 a_ip=e2e.A_IP, b_ip=e2e.B_IP))
            r = _hvnet(env, "up", f, "--json", timeout=400)
            if r.returncode != 0:
                raise RuntimeError(f"hvnet up ({kind}): {r.stderr.strip()}")
            try:
                if kind == "sriov":
                    _wait_vf(env, name)
                e2e.wait_reachable(f"{name}-a", e2e.B_IP)
                yield e2e.Path(f"hvnet {kind}", f"{name}-a", f"{name}-b", e2e.B_IP)
            finally:
                if _hvnet(env, "down", name).returncode != 0:
                    _hvnet(env, "clean", "--force")
    factory.__name__ = f"hvnet {kind}"
    return factory


PATHS = {"veth": e2e.veth_peer, "bridge": e2e.bridge_peer}
PATHS.update({k: _path(k) for k in TOPOLOGIES})
DEFAULT_PATHS = ("veth", "bridge", "tap-tap", "synthetic", "internal-uplink")


def main(a, out, err) -> int:
    tests = ("tcp1", "tcp4", "udp64", "ping")
    names = a.paths.split(",") if a.paths else list(DEFAULT_PATHS)
    bad = [n for n in names if n not in PATHS]
    if bad:
        err.print(f"hvnet bench switch: unknown path {', '.join(bad)}; paths are "
                  f"{', '.join(PATHS)}")
        return 2
    paths = [PATHS[k] for k in names]
    with err.status("starting") as status:
        result = e2e.compare(paths, tests=tests, seconds=a.seconds, repeats=a.repeats,
                             progress=lambda s: status.update(s))
    if a.json:
        print(json.dumps(result))
    else:
        out.print(e2e.table(result))
        for key, r in result["results"].items():
            for e in r.get("errors", []):
                err.print(f"[red]{key}: {e}[/red]")
    return 0 if not any(r.get("errors") for r in result["results"].values()) else 1
