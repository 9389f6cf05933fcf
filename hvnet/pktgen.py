"""A paced UDP frame generator and a time-stamping receiver: the packet-rate,
RFC 2544 zero-loss and latency measurements of ``hvnet bench e2e``.

Both ends run as child processes in the namespaces of the path under test, one
per end, for as long as the path is built; the parent sends them one JSON
command per line on stdin and reads one JSON answer per line (``Pair``).

- **Sender** (client namespace): an AF_PACKET raw socket on the interface that
  holds the client's address, bypassing the qdisc like trafgen. One compiled loop
  (``send_paced``) writes each frame's sequence number and the CLOCK_REALTIME
  time just before its ``send()``, at the asked rate (RFC 2544 section 23: a
  constant rate). Between frames it sleeps (timer slack 1 ns) and spins only when
  the next is due within SLEEP_NS; a frame that is late goes at once. So a late
  wake-up sends a few frames back to back: the price of not taking a whole core
  from the path under test, which on two cores shares them with the generator
  (spinning, pinned VMQ workers lost frames at a tenth of their rate).
  Rate 0 is as fast as one core can send.
- **Receiver** (server namespace): an AF_PACKET TPACKET_V3 ring on the server's
  interface, so frames are counted where they leave the path (RFC 2544's output
  port), before the server's IP stack, which still sees them (UDP to a closed
  port). ``drain`` walks the ring blocks; a frame's one-way latency is the
  kernel's receive time stamp minus the sender's stamp: one machine, one clock.
  Frames of an earlier trial (a different ``trial`` id) are not counted.

Frames: Ethernet II, IPv4 (no options, DF), UDP with checksum 0 (none, RFC 768),
then the payload: seq u32 @42, send time in ns u64 @46, trial id u16 @54. Sizes
follow RFC 2544 (section 9): 64 to 1518 bytes including the 4-byte FCS, so the
frame handed to the kernel is 4 bytes shorter.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time

import numpy as np

from switch.byteorder import be16, le16, le32, put_be16, put_le, put_le32
from switch.checksum import sum16
from switch.kernel import helper, kernel
from switch.port import mac_to_int
from switch.syscalls import clock_gettime, clock_nanosleep, send

CLOCK_REALTIME = 0
TIMER_ABSTIME = 1
PR_SET_TIMERSLACK = 29
SLEEP_NS = 10_000          # a frame due later than this is slept for ...
SPIN_NS = 0                # ... until this long before it is due, then spun to
FCS = 4
MIN_SIZE, MAX_SIZE = 64, 1518
HDRS = 14 + 20 + 8
OFF_SEQ, OFF_TS, OFF_TRIAL = 42, 46, 54
SOL_PACKET = 263
PACKET_RX_RING, PACKET_VERSION, PACKET_STATISTICS = 5, 10, 6
PACKET_QDISC_BYPASS, PACKET_IGNORE_OUTGOING = 20, 23
TPACKET_V3 = 2
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
ETH_P_IP = 0x0800
BLOCK_SIZE, BLOCK_NR = 1 << 20, 64
LAT_CAPACITY = 1 << 21     # latency samples kept per trial (the rest are only counted)


# ---- compiled loops --------------------------------------------------------------------------

@helper
def _now(ts):
    clock_gettime(CLOCK_REALTIME, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@kernel
def send_paced(fd, frame, length, trial, count, period_ns, deadline_ns, ts, out):
    """Send ``count`` copies of ``frame[:length]`` one ``period_ns`` apart (0: back to
    back), each with its sequence number and send time, stopping at ``deadline_ns``.
    ``out`` = [sends done, sends failed, first send ns, last send ns]; ``ts`` is 4 int64
    of scratch (the clock's reading, then the wake-up time)."""
    t0 = _now(ts)
    sent = 0
    failed = 0
    last = t0
    put_le(frame, OFF_TRIAL, trial, 2)
    for i in range(count):
        due = t0 + i * period_ns
        now = _now(ts)
        if now >= deadline_ns:
            break
        if due - now > SLEEP_NS:
            t = due - SPIN_NS
            ts[2] = t // 1_000_000_000
            ts[3] = t % 1_000_000_000
            clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, ts.ctypes.data + 16,
                            ts.ctypes.data + 16)
            now = _now(ts)
        while now < due:
            now = _now(ts)
        put_le32(frame, OFF_SEQ, i)
        put_le(frame, OFF_TS, now, 8)
        if send(fd, frame.ctypes.data, length, 0) < 0:
            failed += 1
        else:
            sent += 1
        last = now
    out[0] = sent
    out[1] = failed
    out[2] = t0
    out[3] = last


@kernel
def drain(ring, block_size, block_nr, state, port, trial, lat, stats):
    """Count this trial's frames in the blocks the kernel handed over, give the blocks
    back. ``state[0]`` is the next block; ``stats`` = [received, latency samples,
    malformed ring entries, other frames, negative latencies]. The ring is the
    kernel's, but its offsets are still checked before use."""
    while True:
        b = state[0]
        base = b * block_size
        if le32(ring, base + 8) & TP_STATUS_USER == 0:
            break
        npk = le32(ring, base + 12)
        p = le32(ring, base + 16)
        for _ in range(npk):
            if p < 48 or p + 48 > block_size:
                stats[2] += 1
                break
            h = base + p
            snap = le32(ring, h + 12)
            mac = le16(ring, h + 24)
            f = h + mac
            if mac < 48 or p + mac + snap > block_size:
                stats[2] += 1
            elif (snap >= OFF_TRIAL + 2 and be16(ring, f + 12) == ETH_P_IP
                  and ring[f + 23] == 17 and be16(ring, f + 36) == port
                  and le16(ring, f + OFF_TRIAL) == trial):
                rx = le32(ring, h + 4) * 1_000_000_000 + le32(ring, h + 8)
                tx = le32(ring, f + OFF_TS) | (le32(ring, f + OFF_TS + 4) << 32)
                stats[0] += 1
                d = rx - tx
                if d < 0:
                    stats[4] += 1           # the wall clock stepped back mid-trial
                elif stats[1] < lat.shape[0]:
                    lat[stats[1]] = d
                    stats[1] += 1
            else:
                stats[3] += 1
            nxt = le32(ring, h)
            if nxt == 0:
                break
            p += nxt
        put_le32(ring, base + 8, TP_STATUS_KERNEL)   # the block goes back
        state[0] = (b + 1) % block_nr


# ---- frames and interfaces -------------------------------------------------------------------

def build_frame(size: int, src_mac: str, dst_mac: str, src_ip: str, dst_ip: str,
                sport: int, dport: int) -> np.ndarray:
    """The frame of ``size`` bytes on the wire (FCS included), as the kernel takes it."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"frame size {size}: {MIN_SIZE}..{MAX_SIZE} bytes, FCS included")
    n = size - FCS
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, n - 14, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    udp = struct.pack("!HHHH", sport, dport, n - 34, 0)
    head = (mac_to_int(dst_mac).to_bytes(6, "big") + mac_to_int(src_mac).to_bytes(6, "big")
            + b"\x08\x00" + ip + udp)
    frame = np.zeros(n, dtype=np.uint8)
    frame[:HDRS] = np.frombuffer(head, dtype=np.uint8)
    put_be16(frame, 24, ~sum16(frame, 14, 20) & 0xFFFF)     # the IPv4 header checksum
    return frame


def interface_of(ip: str) -> tuple[str, str]:
    """(name, MAC) of the interface holding ``ip`` in this process's namespace."""
    from pyroute2 import IPRoute
    with IPRoute() as nl:
        for a in nl.get_addr():
            if a.get_attr("IFA_ADDRESS") == ip:
                link = nl.get_links(a["index"])[0]
                return link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS")
    raise RuntimeError(f"no interface holds {ip} in this namespace")


# ---- the two ends ----------------------------------------------------------------------------

class Sender:
    def __init__(self, src_ip: str):
        self.ifname, self.mac = interface_of(src_ip)
        self.src_ip = src_ip
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        self.sock.bind((self.ifname, 0))
        self.ts = np.zeros(4, dtype=np.int64)
        self.out = np.zeros(4, dtype=np.int64)
        # Sleeps end when asked, not up to 50 us later (the default timer slack).
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)

    def send(self, size: int, rate: float, seconds: float, trial: int, dst_mac: str,
             dst_ip: str, port: int) -> dict:
        frame = build_frame(size, self.mac, dst_mac, self.src_ip, dst_ip, port, port)
        if rate > 0:
            count, period = max(1, int(rate * seconds)), int(1e9 / rate)
        else:
            count, period = 1 << 40, 0
        # A sender that cannot keep the rate stops a quarter second late, not never.
        deadline = time.time_ns() + int(seconds * 1e9) + (250_000_000 if rate > 0 else 0)
        send_paced(self.sock.fileno(), frame, len(frame), trial, count, period, deadline,
                   self.ts, self.out)
        ok, failed, t0, t1 = (int(x) for x in self.out)
        # A send() that fails is the first device refusing the frame (veth or tap
        # dropping it: the path's loss, reported to us because the qdisc is
        # bypassed), so it counts as offered.
        sent = ok + failed
        elapsed = max(t1 - t0, 1) / 1e9
        return {"sent": sent, "failed": failed, "seconds": elapsed,
                "offered_fps": sent / elapsed if sent > 1 else 0.0}

    def close(self):
        self.sock.close()


class Receiver:
    def __init__(self, ip: str, port: int):
        self.ifname, self.mac = interface_of(ip)
        self.port = port
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
        try:
            s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            # Block retire 2 ms: the latency comes from kernel stamps, not from when
            # the block reaches us, so this only bounds how long a stop waits.
            s.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack(
                "7I", BLOCK_SIZE, BLOCK_NR, 2048, BLOCK_SIZE * BLOCK_NR // 2048, 2, 0, 0))
            s.bind((self.ifname, ETH_P_IP))
            self.map = mmap.mmap(s.fileno(), BLOCK_SIZE * BLOCK_NR)
        except OSError:
            s.close()
            raise
        self.sock = s
        self.ring = np.frombuffer(self.map, dtype=np.uint8)
        self.state = np.zeros(1, dtype=np.int64)
        self.stats = np.zeros(5, dtype=np.int64)
        self.lat = np.zeros(LAT_CAPACITY, dtype=np.int64)
        self.trial = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _ring_drops(self) -> int:
        # tpacket_stats_v3: tp_packets, tp_drops, tp_freeze_q_cnt; reading resets them.
        return struct.unpack("3I", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12))[1]

    def _run(self):
        poll = select.poll()
        poll.register(self.sock.fileno(), select.POLLIN)
        while not self._stop.is_set():
            poll.poll(5)
            drain(self.ring, BLOCK_SIZE, BLOCK_NR, self.state, self.port, self.trial,
                  self.lat, self.stats)

    def start(self, trial: int) -> dict:
        self.stop_thread()
        drain(self.ring, BLOCK_SIZE, BLOCK_NR, self.state, self.port, 0xFFFF, self.lat,
              self.stats)                       # leftovers of an earlier trial go
        self.trial = trial
        self.stats[:] = 0
        self._ring_drops()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return {}

    def stop_thread(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def stop(self) -> dict:
        self.stop_thread()
        drain(self.ring, BLOCK_SIZE, BLOCK_NR, self.state, self.port, self.trial, self.lat,
              self.stats)
        received, samples, bad, other, negative = (int(x) for x in self.stats)
        r = {"received": received, "ring_drops": self._ring_drops(), "malformed": bad,
             "other_frames": other, "negative_latency": negative, "samples": samples}
        if samples:
            lat = self.lat[:samples] / 1e3
            p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
            r.update(p50_us=float(p50), p99_us=float(p99), p999_us=float(p999),
                     max_us=float(lat.max()), mean_us=float(lat.mean()))
        return r

    def close(self):
        self.stop_thread()
        self.ring = None
        try:
            self.map.close()
        except BufferError:
            pass
        self.sock.close()


def warm() -> None:
    """Compile (or load from the cache) both loops before any clock starts."""
    f = build_frame(64, "02:00:00:00:00:01", "02:00:00:00:00:02", "10.0.0.1", "10.0.0.2",
                    9, 9)
    send_paced(-1, f, 0, 1, 0, 0, 0, np.zeros(4, np.int64), np.zeros(4, np.int64))
    ring = np.zeros(4096, np.uint8)
    drain(ring, 4096, 1, np.zeros(1, np.int64), 9, 1, np.zeros(1, np.int64),
          np.zeros(5, np.int64))


# ---- the parent's side -----------------------------------------------------------------------

ANSWER_S = 300.0       # a cold child compiles its loops first (two at once on two cores)


class Pair:
    """Sender in ``client_ns`` (the interface holding ``client_ip``) and receiver in
    ``server_ns`` (the one holding ``server_ip``), each a child process, both ended
    by pid when the block ends."""

    def __init__(self, client_ns: str | None, server_ns: str | None, client_ip: str,
                 server_ip: str, port: int = 7357):
        self.ns = {"tx": client_ns, "rx": server_ns}
        self.client_ip, self.server_ip, self.port = client_ip, server_ip, port
        self.procs: dict[str, object] = {}
        self.trials = 0

    def __enter__(self) -> "Pair":
        from . import nsexec
        import subprocess
        try:
            for end, ns in self.ns.items():
                self.procs[end] = nsexec.popen(
                    ns, [sys.executable, "-m", "hvnet.pktgen"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for end in self.procs:                      # both compile at once
                self._send(end, {"op": "warm"})
            for end in self.procs:
                self._answer(end, ANSWER_S)
            self.dst_mac = self._ask("rx", {"op": "receiver", "ip": self.server_ip,
                                            "port": self.port})["mac"]
            self._ask("tx", {"op": "sender", "src_ip": self.client_ip})
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        from . import nsexec
        for p in self.procs.values():
            try:
                p.stdin.close()
            except OSError:
                pass
            nsexec.stop(p)
        self.procs.clear()

    def _send(self, end: str, cmd: dict) -> None:
        p = self.procs[end]
        p.stdin.write(json.dumps(cmd) + "\n")
        p.stdin.flush()

    def _answer(self, end: str, timeout: float) -> dict:
        p = self.procs[end]
        r, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if r else ""
        if not line:
            err = ""
            if p.poll() is not None:
                err = p.stderr.read()[-800:]
            raise RuntimeError(f"packet generator ({end} in {self.ns[end]}) "
                               f"{'exited' if p.poll() is not None else 'did not answer'}"
                               f"{': ' + err.strip() if err.strip() else ''}")
        ans = json.loads(line)
        if not ans.pop("ok"):
            raise RuntimeError(f"packet generator ({end} in {self.ns[end]}): {ans['error']}")
        return ans

    def _ask(self, end: str, cmd: dict, timeout: float = 30.0) -> dict:
        self._send(end, cmd)
        return self._answer(end, timeout)

    def trial(self, size: int, rate: float, seconds: float, settle: float = 0.1) -> dict:
        """Offer ``size``-byte frames at ``rate`` frames/s (0: as fast as the sender can)
        for ``seconds``; count what arrives, ``settle`` seconds after the last one left."""
        self.trials = self.trials % 0xFFFE + 1
        self._ask("rx", {"op": "start", "trial": self.trials})
        tx = self._ask("tx", {"op": "send", "size": size, "rate": rate, "seconds": seconds,
                              "trial": self.trials, "dst_mac": self.dst_mac,
                              "dst_ip": self.server_ip, "port": self.port},
                       timeout=seconds + 30)
        time.sleep(settle)
        rx = self._ask("rx", {"op": "stop"})
        # A frame the receiver's own ring dropped cannot be told from one the path
        # lost: both count against the path (the ring is 64 MiB, so it should not).
        lost = max(tx["sent"] - rx["received"], 0) + rx["ring_drops"]
        return {"size": size, "rate": rate, **tx, **rx, "lost": lost,
                "loss_pct": 100.0 * lost / tx["sent"] if tx["sent"] else 0.0,
                "rx_fps": rx["received"] / tx["seconds"]}


def zero_loss(pair: Pair, size: int, seconds: float, steps: int, floor: float = 100.0) -> dict:
    """RFC 2544 section 26.1 throughput: the highest rate at which no frame is lost.

    The first trial runs at the sender's own top rate; a path that loses nothing
    there is faster than one sender can tell (``bound`` "sender"). Otherwise the
    rate halves until a trial loses nothing (or falls below ``floor`` frames/s: the
    path loses even a trickle, result 0), then ``steps`` trials bisect between the
    last rate that passed and the lowest that failed."""
    top = pair.trial(size, 0, seconds)
    trials = [top]
    if top["lost"] == 0:
        fps, bound = top["offered_fps"], "sender"
    else:
        bound, hi, lo, fps = "path", top["offered_fps"], 0.0, 0.0
        rate = hi / 2
        while rate >= floor:
            t = pair.trial(size, rate, seconds)
            trials.append(t)
            if t["lost"] == 0:
                lo, fps = rate, t["offered_fps"]
                break
            hi, rate = rate, rate / 2
        for _ in range(steps if fps else 0):
            mid = (lo + hi) / 2
            t = pair.trial(size, mid, seconds)
            trials.append(t)
            if t["lost"] == 0:
                lo, fps = mid, t["offered_fps"]
            else:
                hi = mid
    return {"fps": fps, "gbit_s": fps * size * 8 / 1e9, "bound": bound,
            "top_offered_fps": top["offered_fps"], "top_rx_fps": top["rx_fps"],
            "trials": trials}


# ---- the child process -----------------------------------------------------------------------

def serve(inp=sys.stdin, out=sys.stdout) -> int:
    """One JSON command per line, one JSON answer per line: ``{"ok": true, ...}`` or
    ``{"ok": false, "error": "..."}``. Ends at end of input or ``{"op": "quit"}``."""
    ends: dict[str, object] = {}
    for line in inp:
        try:
            cmd = json.loads(line)
            op = cmd.pop("op")
            if op == "quit":
                break
            if op == "warm":
                warm()
                ans = {}
            elif op == "sender":
                ends["tx"] = Sender(cmd["src_ip"])
                ans = {"ifname": ends["tx"].ifname, "mac": ends["tx"].mac}
            elif op == "receiver":
                ends["rx"] = Receiver(cmd["ip"], int(cmd["port"]))
                ans = {"ifname": ends["rx"].ifname, "mac": ends["rx"].mac}
            elif op == "send":
                ans = ends["tx"].send(**cmd)
            elif op == "start":
                ans = ends["rx"].start(int(cmd["trial"]))
            elif op == "stop":
                ans = ends["rx"].stop()
            else:
                raise ValueError(f"unknown op {op!r}")
            out.write(json.dumps({"ok": True, **ans}) + "\n")
        except Exception as e:           # answered, so the parent can say what failed
            out.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
    for end in ends.values():
        end.close()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
