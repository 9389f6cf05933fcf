"""The report of ``hvnet bench e2e``: a Markdown page, the JSON it was made from,
and PNG plots (matplotlib), all from the dict ``e2e.compare`` returns.

Cells are "median (min-max) xRATIO" over the rounds, the ratio against the
direct veth pair of the same run (RFC 2544 section 26.1 throughput and section
26.2 latency, reported per frame size as RFC 8204 does for vswitches).
"""
from __future__ import annotations

import json
import os
import re

THROUGHPUT = (("tcp1", "TCP, 1 stream", "Gbit/s"), ("tcp4", "TCP, 4 streams", "Gbit/s"),
              ("pps64", "64 B, sender at full speed", "kpps"),
              ("zl64", "zero loss, 64 B", "kpps"), ("zl512", "zero loss, 512 B", "kpps"),
              ("zl1518", "zero loss, 1518 B", "kpps"))


def _num(v: float, unit: str) -> str:
    if unit == "kpps":
        return f"{v / 1e3:.0f}" if v >= 1e4 else f"{v / 1e3:.1f}"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def _cell(c: dict | None, unit: str) -> str:
    if not c or c.get("median") is None:
        return "failed" if c else "-"
    s = f"{_num(c['median'], unit)} ({_num(c['min'], unit)}-{_num(c['max'], unit)})"
    if c.get("ratio") is not None:
        s += f" ×{c['ratio']:.2f}"
    if c["runs"] and all(run.get("bound") == "sender" for run in c["runs"]):
        s += " ≥"                        # lost nothing at the sender's top rate
    return s


def latency_tests(result: dict) -> dict[int, list[tuple[int, str]]]:
    """{frame size: [(load %, test name), ...]} of the latency tests that ran."""
    out: dict[int, list[tuple[int, str]]] = {}
    for t in result["settings"]["tests"]:
        if m := re.fullmatch(r"lat(\d+)@(\d+)", t):
            out.setdefault(int(m[1]), []).append((int(m[2]), t))
    return {k: sorted(v) for k, v in sorted(out.items())}


def markdown(result: dict, plots: list[str] = ()) -> str:
    m, s = result["machine"], result["settings"]
    tests = set(s["tests"])
    cols = [c for c in THROUGHPUT if c[0] in tests]
    lines = [f"# hvnet bench e2e, {m['date']}", "",
             f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, kernel {m['kernel']}, "
             f"load average at start {', '.join(f'{x:.2f}' for x in m.get('loadavg_at_start', []))}; "
             f"{m.get('iperf3', '')}.",
             f"Settings: {s['repeats']} round(s), each building every path in turn; TCP "
             f"{s['seconds']:g} s per test; packet-generator trials of {s['trial_s']:g} s, "
             f"{s['steps']} binary-search steps per frame size.", ""]
    if cols:
        lines += ["## Throughput", "",
                  "Median (min-max) over the rounds, ×ratio to the direct veth pair's median. "
                  "Zero loss: the highest rate with no frame lost (RFC 2544 throughput), frame "
                  "sizes with FCS; ≥ marks a path that lost nothing even at the sender's top "
                  "rate, so its limit lies beyond what one sending core offers.", "",
                  "| path | " + " | ".join(f"{label}, {unit}" for _, label, unit in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for key in result["paths"]:
            r = result["results"][key]
            lines.append(f"| {key} | " + " | ".join(_cell(r.get(t), unit)
                                                   for t, _, unit in cols) + " |")
        lines.append("")
    for size, loads in latency_tests(result).items():
        lines += [f"## One-way latency, {size}-byte frames", "",
                  "Microseconds from the sender's send() to the kernel's receive stamp at the "
                  "far interface, p50 / p99 / p99.9 (medians over the rounds), at a share of "
                  "the path's own zero-loss rate.", "",
                  "| path | " + " | ".join(f"{pct} %" for pct, _ in loads) + " |",
                  "|---|" + "---|" * len(loads)]
        for key in result["paths"]:
            r = result["results"][key]
            row = []
            for _, t in loads:
                med = r.get(t, {}).get("medians", {})
                row.append(" / ".join(_num(med[k], "us") for k in ("p50_us", "p99_us",
                                                                    "p999_us"))
                           if "p50_us" in med else ("failed" if t in r else "-"))
            lines.append(f"| {key} | " + " | ".join(row) + " |")
        lines.append("")
    errs = [(k, e) for k in result["paths"] for e in result["results"][k].get("errors", [])]
    if errs:
        lines += ["## Failures", ""] + [f"- {k}: {e}" for k, e in errs] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in plots] + [""]
    return "\n".join(lines)


def plots(result: dict, folder: str) -> list[str]:
    """throughput.png (TCP), zero_loss.png (frames/s by size, log scale) and
    latency.png (percentiles against load), for what the run measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths, res = result["paths"], result["results"]
    made = []

    def bars(ax, tests, scale, ylabel, log=False):
        width = 0.8 / max(len(tests), 1)
        x = np.arange(len(paths))
        for j, (t, label) in enumerate(tests):
            med, lo, hi = [], [], []
            for p in paths:
                c = res[p].get(t) or {}
                v = c.get("median")
                med.append((v or 0) / scale)
                lo.append(((v or 0) - (c.get("min") or 0)) / scale if v else 0)
                hi.append(((c.get("max") or 0) - (v or 0)) / scale if v else 0)
            ax.bar(x + (j - (len(tests) - 1) / 2) * width, med, width, yerr=[lo, hi],
                   capsize=2, label=label)
        ax.set_xticks(x, paths, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)

    caption = (f"{result['machine']['cpu_model']}, {result['machine']['nproc']} CPUs, "
               f"{result['machine']['date'][:16]}")
    bar_note = "; bars: median, whiskers: min-max"
    tests = set(result["settings"]["tests"])
    tcp = [(t, label) for t, label in (("tcp1", "1 stream"), ("tcp4", "4 streams"))
           if t in tests]
    if tcp:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        bars(ax, tcp, 1, "TCP throughput, Gbit/s")
        ax.set_title("TCP between two namespaces (iperf3)\n" + caption + bar_note,
                     fontsize="small")
        made.append(_save(fig, folder, "throughput.png"))
    zl = [(t, f"{t[2:]} B") for t in ("zl64", "zl512", "zl1518") if t in tests]
    if zl:
        fig, ax = plt.subplots(figsize=(9, 4.5))
        bars(ax, zl, 1e3, "zero-loss rate, kframes/s", log=True)
        ax.set_title("RFC 2544 throughput (no frame lost), by frame size\n" + caption
                     + bar_note,
                     fontsize="small")
        made.append(_save(fig, folder, "zero_loss.png"))
    lat = latency_tests(result)
    if lat:
        fig, axes = plt.subplots(1, len(lat), figsize=(5 * len(lat), 4.5), squeeze=False)
        for ax, (size, loads) in zip(axes[0], lat.items()):
            for p in paths:
                xs, p50, p99 = [], [], []
                for pct, t in loads:
                    med = res[p].get(t, {}).get("medians", {})
                    if "p50_us" in med:
                        xs.append(pct)
                        p50.append(med["p50_us"])
                        p99.append(med["p99_us"])
                if xs:
                    line, = ax.plot(xs, p50, marker="o", label=f"{p} p50")
                    ax.plot(xs, p99, marker="x", ls="--", color=line.get_color())
            ax.set_yscale("log")
            ax.set_xlabel("load, % of the path's zero-loss rate")
            ax.set_ylabel("one-way latency, µs (solid p50, dashed p99)")
            ax.set_title(f"{size}-byte frames", fontsize="small")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1, 1))
        fig.suptitle("One-way latency against load (medians over the rounds)\n" + caption,
                     fontsize="small")
        made.append(_save(fig, folder, "latency.png"))
    return made


def _save(fig, folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def write(result: dict, folder: str) -> dict[str, str | list[str]]:
    """e2e.json, the plots and e2e.md into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    js = os.path.join(folder, "e2e.json")
    with open(js, "w") as f:
        json.dump(result, f, indent=1)
    pngs = plots(result, folder)
    md = os.path.join(folder, "e2e.md")
    with open(md, "w") as f:
        f.write(markdown(result, pngs))
    return {"json": js, "markdown": md, "plots": pngs}
