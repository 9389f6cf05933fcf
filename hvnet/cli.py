"""The ``hvnet`` command line."""
from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console


def _cmd_demo(args) -> int:
    from . import demo
    demo.run(Console(), pcap_path=args.pcap)
    return 0


def _cmd_bench(args) -> int:
    if args.what == "fastpath":
        from . import fastpath_bench
        if not args.json:
            Console(stderr=True).print(f"[dim]running the in-memory fast path for "
                                       f"{args.seconds:g} s on one core...[/dim]")
        r = fastpath_bench.run(seconds=args.seconds, batch=args.batch, peer=not args.no_peer)
        if args.json:
            print(json.dumps(r))
        else:
            from rich.table import Table
            t = Table(title="hvnet bench fastpath (in-memory pipeline, one core)")
            t.add_column("metric")
            t.add_column("value", justify="right")
            t.add_row("Mpps per core (CPU time)", f"{r['mpps_per_core']:.2f}")
            t.add_row("Mpps (wall time)", f"{r['mpps_wall']:.2f}")
            t.add_row("ns per packet", f"{r['ns_per_packet']:.0f}")
            if "python_mpps_per_core" in r:
                t.add_row("plain-Python switch, same run (Mpps per core)",
                          f"{r['python_mpps_per_core']:.2f}")
                t.add_row("ratio", f"x{r['ratio_vs_python']:.1f}")
            t.add_row("packets / delivered / dropped",
                      f"{r['packets']} / {r['delivered']} / {r['dropped']}")
            t.add_row("setup", f"{r['ports']} ports, {r['macs']} MACs, {r['frame_bytes']}-byte "
                      f"frames, batches of {r['batch_size']}, CPU {r['cpu']}")
            Console().print(t)
        return 0
    print(f"hvnet bench: unknown benchmark {args.what!r}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvnet", description="Hyper-V's network dataplane on Linux")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="run the demo: ports, extensions, traffic, a report")
    d.add_argument("--pcap", help="where the capture extension writes (default: a temp file)")
    d.set_defaults(func=_cmd_demo)
    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("what", choices=["fastpath"], help="which benchmark")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--seconds", type=float, default=5.0, help="measuring time (default 5)")
    b.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    b.add_argument("--no-peer", action="store_true",
                   help="skip the plain-Python peer measured beside it")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        if args.seconds <= 0:
            print("hvnet bench: --seconds must be positive", file=sys.stderr)
            return 2
        if not 1 <= args.batch <= 4096:
            print(f"hvnet bench: --batch {args.batch} out of range 1..4096", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
