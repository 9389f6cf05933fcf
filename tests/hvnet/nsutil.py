"""What the namespace tests share: the ``hvnet`` command line as users run it,
the namespaces a run left, and a TCP sender and receiver that check the data."""
from __future__ import annotations

import subprocess
import sys

from pyroute2 import netns

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
