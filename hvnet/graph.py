"""A picture of a topology: switches, the VMs and host vNICs on them, the uplink
and the physical hosts behind it, drawn with matplotlib into a PNG or SVG.

Each switch is a wide box labelled with its name and extension stack. Its VMs
stand above it, each NIC a small port box (kind, MAC, addresses, VLAN) with a
line down to the switch; host vNICs (internal ports) and the uplink (external
port) sit below it, and the physical hosts below the uplink. Switches stand
side by side. Lines take the colour of their access VLAN (see the legend).

The layout is computed here, in inches (one data unit is one inch at any dpi),
from the length of every label: boxes are sized to their text and placed in
rows, so nothing overlaps however many VMs a switch has; the figure grows
instead. Labels use a monospaced font so their width can be known in advance.

matplotlib is imported inside ``render`` only, so that importing this module
(and starting the CLI) stays fast.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from switch.port import mac_to_str

if TYPE_CHECKING:
    from .topology import PortSettings, Topology

FORMATS = (".png", ".svg")

# Font sizes (points) and the metrics used to size boxes before drawing.
FS_TITLE = 10.0       # VM, host and physical names
FS_SWITCH = 11.0
FS_LABEL = 7.5        # port details
MONO = "DejaVu Sans Mono"   # ships with matplotlib; every glyph is 0.602 em wide
MONO_EM = 0.61
BOLD_EM = 0.72        # generous average for bold proportional text
LINE_EM = 1.32        # line pitch of multi-line text, in font sizes

# Geometry, inches.
PAD = 0.08            # inside boxes
PORT_GAP = 0.12       # between the port boxes of one VM
ITEM_GAP = 0.35       # between boxes in a row
COL_GAP = 1.1         # between switches
SW_H = 0.55           # switch box height
GAP_UP = 1.0          # VM row bottom above the switch top
GAP_DOWN = 0.75       # host/uplink row top below the switch bottom
GAP_PHYS = 0.75       # physical hosts below the uplink
MARGIN = 0.35
MAX_PIXELS = 7000     # longest side of a PNG: big topologies get a lower dpi
DPI = 150

FILL = {"vm": "#dce9f7", "port": "#ffffff", "host": "#dff2df", "uplink": "#fbe3c8",
        "phys": "#ececec", "switch": "#2f4464"}
EDGE = {"vm": "#4a6f9c", "port": "#6b7f99", "host": "#4f8a4f", "uplink": "#b07a3a",
        "phys": "#777777", "switch": "#1c2a40"}
UNTAGGED = "#8c8c8c"
TRUNK = "#222222"


def _text_w(lines: list[str], size: float, em: float = MONO_EM) -> float:
    return max((len(s) for s in lines), default=0) * em * size / 72


def _text_h(n: int, size: float) -> float:
    return n * LINE_EM * size / 72


def _ranges(vids) -> str:
    """(10, 20, 21, 22) -> '10,20-22': trunk lists stay short on a label."""
    out, vids = [], sorted(vids)
    i = 0
    while i < len(vids):
        j = i
        while j + 1 < len(vids) and vids[j + 1] == vids[j] + 1:
            j += 1
        out.append(str(vids[i]) if i == j else f"{vids[i]}-{vids[j]}")
        i = j + 1
    return ",".join(out)


def _wrap(prefix: str, items: str, width: int = 22) -> list[str]:
    """Break a comma list over lines so one long trunk does not widen the whole row."""
    lines, cur = [], prefix
    for part in items.split(","):
        piece = part if cur == prefix else "," + part
        if len(cur) + len(piece) > width and cur != prefix:
            lines.append(cur + ",")
            cur = "  " + part
        else:
            cur += piece
    lines.append(cur)
    return lines


def _vlan(ps: PortSettings) -> tuple[list[str], object]:
    """Label lines for a port's VLAN setting and its line colour key."""
    v = ps.vlan
    if v is None or v.mode == "untagged":
        return ["untagged"], "untagged"
    if v.mode == "access":
        return [f"access vlan {v.access_vlan}"], v.access_vlan
    lines = [f"trunk native {v.native_vlan}" if v.native_vlan else "trunk"]
    if v.allowed:
        lines += _wrap("allowed ", _ranges(v.allowed))
    if v.pruned:
        lines += _wrap("pruned ", _ranges(v.pruned))
    return lines, "trunk"


def _policy(ps: PortSettings) -> list[str]:
    out = []
    if ps.mtu != 1500:
        out.append(f"mtu {ps.mtu}")
    s = ps.security
    if s is not None:
        flags = [n for n, on in (("spoof-ok", s.allow_mac_spoofing), ("dhcp", s.dhcp_guard),
                                 ("router", s.router_guard)) if on]
        if flags:
            out.append("guard " + " ".join(flags))
        if s.storm_limit:
            out.append(f"storm limit {s.storm_limit}")
    if ps.acl is not None and ps.acl.rules:
        n = len(ps.acl.rules)
        out.append(f"acl {n} rule{'s' if n != 1 else ''}")
    return out


def _counters(running: dict | None, *names: str) -> list[str]:
    """'rx N tx M' from the first of ``names`` that ``running`` has."""
    if not running:
        return []
    for n in names:
        c = running.get(n)
        if c is not None:
            return [f"rx {c.get('rx_packets', 0)}  tx {c.get('tx_packets', 0)}"]
    return []


@dataclass
class _Box:
    kind: str                 # a FILL/EDGE key
    title: str | None
    lines: list[str]
    w: float = 0.0
    h: float = 0.0
    x: float = 0.0            # lower-left corner
    y: float = 0.0
    children: list[_Box] = field(default_factory=list)
    key: object = None        # line colour key of the port this box is
    nic: object = None        # the Nic of a VM's port box

    def size(self) -> _Box:
        tw = _text_w([self.title], FS_TITLE, BOLD_EM) if self.title else 0.0
        self.w = max(tw, _text_w(self.lines, FS_LABEL)) + 2 * PAD
        self.h = (_text_h(1, FS_TITLE) if self.title else 0) \
            + _text_h(len(self.lines), FS_LABEL) + 2 * PAD
        return self

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


@dataclass
class _Line:
    x0: float
    y0: float
    x1: float
    y1: float
    key: object               # VLAN id, "untagged" or "trunk"
    tagged: bool = False      # dashed: VLAN-tagged on the wire
    marker: bool = True       # a port square where it meets the switch


def _vm_box(name: str, nics, running) -> _Box:
    vm = _Box("vm", name, [])
    for n in nics:
        vlines, key = _vlan(n.port)
        lines = [f"{n.kind} #{n.index}" + ("" if n.switch == nics[0].switch else f" > {n.switch}"),
                 mac_to_str(n.port.mac)] + n.port.addresses
        if n.port.gateway:
            lines.append(f"gw {n.port.gateway}")
        lines += vlines + _policy(n.port)
        # hvnet demo names a VM's (only) port after the VM: accept that for NIC 0.
        lines += _counters(running, f"{name}.eth{n.index}", *((name,) if n.index == 0 else ()))
        port = _Box("port", None, lines).size()
        port.key, port.nic = key, n
        vm.children.append(port)
    vm.w = max(_row_width_ports(vm), _text_w([name], FS_TITLE, BOLD_EM)) + 2 * PAD
    vm.h = PAD + _text_h(1, FS_TITLE) + max(p.h for p in vm.children) + PAD
    return vm


def _place_row(boxes: list[_Box], x0: float, width: float) -> None:
    """Centre a row of boxes (x only) in [x0, x0 + width]."""
    x = x0 + (width - _row_width(boxes)) / 2
    for b in boxes:
        b.x = x
        x += b.w + ITEM_GAP


def _row_width(boxes) -> float:
    return sum(b.w for b in boxes) + ITEM_GAP * max(len(boxes) - 1, 0)


def _row_width_ports(vm: _Box) -> float:
    return sum(p.w for p in vm.children) + PORT_GAP * (len(vm.children) - 1)


def _layout(topo: Topology, running: dict | None):
    """Every box and line, positioned; and the drawing's extent."""
    # A VM stands above the switch of its first NIC; its other NICs reach across.
    home = {vm: nics[0].switch for vm, nics in topo.vms.items()}
    cols = []
    for sname, spec in topo.switches.items():
        stack = [e.type for e in spec.extensions]
        sw = _Box("switch", " | ".join([sname] + stack), [])
        sw.w = _text_w([sw.title], FS_SWITCH, BOLD_EM) + 4 * PAD
        sw.h = SW_H
        vms = [_vm_box(vm, nics, running) for vm, nics in topo.vms.items()
               if home[vm] == sname]
        hosts = []
        for h in (h for h in topo.host if h.switch == sname):
            vlines, key = _vlan(h.port)
            lines = [f"ns {h.namespace}"] + ([mac_to_str(h.port.mac)] if h.port.mac else []) \
                + h.port.addresses + ([f"gw {h.port.gateway}"] if h.port.gateway else []) \
                + vlines + _policy(h.port) \
                + _counters(running, f"{h.namespace}.vEth-{sname}", h.namespace)
            b = _Box("host", "host vNIC", lines).size()
            b.key = key
            hosts.append(b)
        uplink, phys = None, []
        if spec.uplink is not None:
            up = spec.uplink
            lines = ["external port", f"mtu {up.get('mtu', 1500)}"] \
                + ([f"iface {up['interface']}"] if up.get("interface") else []) \
                + ([] if up.get("offloads", True) else ["no offloads"]) \
                + _counters(running, f"{sname}.uplink",
                            *(("uplink",) if len(topo.switches) == 1 else ()))
            uplink = _Box("uplink", "uplink", lines).size()
            for p in (p for p in topo.physical.values() if p.switch == sname):
                lines = ([mac_to_str(p.mac)] if p.mac is not None else []) + p.addresses \
                    + ([f"gw {p.gateway}"] if p.gateway else []) \
                    + ([f"vlan {p.vlan} tagged"] if p.vlan else ["untagged"])
                b = _Box("phys", p.name, lines).size()
                b.key = p.vlan if p.vlan else "untagged"
                phys.append(b)
        # The uplink's slot in the bottom row is as wide as the physical hosts under it.
        up_slot = max(uplink.w, _row_width(phys)) if uplink else 0.0
        bottom_w = _row_width(hosts) + (up_slot + (ITEM_GAP if hosts else 0) if uplink else 0)
        width = max(_row_width(vms), bottom_w, sw.w, 2.5)
        cols.append((sname, sw, vms, hosts, uplink, phys, up_slot, width))

    top_h = max((vm.h for c in cols for vm in c[2]), default=0.0)
    boxes: list[_Box] = []
    lines: list[_Line] = []
    switches: dict[str, _Box] = {}
    x = 0.0
    ymin = 0.0
    for sname, sw, vms, hosts, uplink, phys, up_slot, width in cols:
        sw.x, sw.y, sw.w = x, 0.0, width
        switches[sname] = sw
        boxes.append(sw)
        # VMs: bottoms aligned, so every NIC line crosses the same empty band.
        _place_row(vms, x, width)
        for vm in vms:
            vm.y = SW_H + GAP_UP
            px = vm.x + (vm.w - _row_width_ports(vm)) / 2
            for p in vm.children:
                p.x, p.y = px, vm.y + PAD
                px += p.w + PORT_GAP
            boxes.append(vm)
            boxes.extend(vm.children)
        # Host vNICs, then the uplink slot, tops aligned below the switch.
        row = list(hosts)
        slot = _Box("slot", None, [], w=up_slot) if uplink else None
        if slot:
            row.append(slot)
        _place_row(row, x, width)
        for b in hosts:
            b.y = -GAP_DOWN - b.h
            boxes.append(b)
            lines.append(_Line(b.cx, b.y + b.h, b.cx, 0.0, b.key))
            ymin = min(ymin, b.y)
        if uplink:
            uplink.x = slot.x + (slot.w - uplink.w) / 2
            uplink.y = -GAP_DOWN - uplink.h
            boxes.append(uplink)
            lines.append(_Line(uplink.cx, uplink.y + uplink.h, uplink.cx, 0.0, "trunk"))
            ymin = min(ymin, uplink.y)
            _place_row(phys, slot.x, slot.w)
            for b in phys:
                b.y = uplink.y - GAP_PHYS - b.h
                boxes.append(b)
                lines.append(_Line(uplink.cx, uplink.y, b.cx, b.y + b.h, b.key,
                                   tagged=b.key != "untagged", marker=False))
                ymin = min(ymin, b.y)
        x += width + COL_GAP

    # NIC lines last: a NIC may belong to a switch drawn later than its VM.
    for b in boxes:
        if b.kind == "port":
            sw = switches[b.nic.switch]
            tx = min(max(b.cx, sw.x + 0.15), sw.x + sw.w - 0.15)
            lines.append(_Line(b.cx, b.y, tx, SW_H, b.key))
    extent = (0.0, x - COL_GAP, ymin, SW_H + GAP_UP + top_h if top_h else SW_H)
    return boxes, lines, extent


def _colors(lines: list[_Line]) -> dict:
    """One colour per VLAN id, the same on every switch; grey untagged, black trunk."""
    from matplotlib import colormaps
    vids = sorted({ln.key for ln in lines if isinstance(ln.key, int)})
    tab = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]  # 7 is grey
    if len(vids) > len(tab):
        tab = list(colormaps["tab20"].colors)
    out = {v: tab[i % len(tab)] for i, v in enumerate(vids)}
    out.update(untagged=UNTAGGED, trunk=TRUNK)
    return out


def render(topo: Topology, out_path: str, running: dict | None = None) -> None:
    """Draw ``topo`` into ``out_path`` (.png or .svg, chosen by the extension).

    ``running``, if given, maps port names to ``{"rx_packets": int, "tx_packets": int}``
    and the counters are written on the ports. Port names are the runtime's
    (``<vm>.eth<N>``, ``<namespace>.vEth-<switch>``, ``<switch>.uplink``); the
    in-memory demo's ``<vm>``, ``<namespace>`` and (one switch) ``uplink`` work too,
    so either's ``Switch.stats()["ports"]`` can be passed as it is.
    """
    ext = os.path.splitext(str(out_path))[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{out_path}: cannot draw a {ext or 'extension-less'} file; "
                         f"allowed extensions are {', '.join(FORMATS)}")

    import matplotlib
    matplotlib.use("Agg")      # no display; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyBboxPatch, Rectangle

    boxes, lines, (x0, x1, y0, y1) = _layout(topo, running)
    colors = _colors(lines)

    # Legend entries, and a band above the drawing for them and the title.
    vids = sorted(k for k in colors if isinstance(k, int))
    handles = [Line2D([], [], color=colors[v], lw=2.5, label=f"VLAN {v}") for v in vids]
    keys = {ln.key for ln in lines}
    if "untagged" in keys:
        handles.append(Line2D([], [], color=UNTAGGED, lw=2.5, label="untagged"))
    if "trunk" in keys:
        handles.append(Line2D([], [], color=TRUNK, lw=2.5, label="trunk / all VLANs"))
    if any(ln.tagged for ln in lines):
        handles.append(Line2D([], [], color="#555555", lw=2, ls=(0, (4, 2)),
                              label="tagged on the wire"))
    fig_w = x1 - x0 + 2 * MARGIN
    per_entry = [1.0 + _text_w([h.get_label()], 9, 0.62) for h in handles]
    ncol = max(1, len(handles))
    while ncol > 1 and sum(sorted(per_entry, reverse=True)[:ncol]) > fig_w:
        ncol -= 1
    legend_h = 0.22 * -(-len(handles) // ncol) + 0.05 if handles else 0.0
    title_h = 0.45
    band = title_h + legend_h
    fig_h = y1 - y0 + 2 * MARGIN + band

    dpi = min(DPI, MAX_PIXELS / max(fig_w, fig_h))
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    try:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(x0 - MARGIN, x1 + MARGIN)
        ax.set_ylim(y0 - MARGIN, y1 + MARGIN + band)
        ax.set_aspect("equal")
        ax.axis("off")
        top = y1 + MARGIN + band

        src = os.path.basename(topo.source) if topo.source else ""
        ax.text(x0, top - 0.12, f"topology {topo.name}", fontsize=13, fontweight="bold",
                va="top", ha="left")
        if src:
            ax.text(x0 + _text_w([f"topology {topo.name}"], 13, BOLD_EM) + 0.2, top - 0.16,
                    src, fontsize=9, color="#666666", va="top", ha="left", family=MONO)
        if handles:
            ax.legend(handles=handles, loc="upper left", ncol=ncol, fontsize=9, frameon=False,
                      bbox_to_anchor=(x0 - 0.05, top - title_h), bbox_transform=ax.transData,
                      borderaxespad=0, handlelength=2.2, columnspacing=1.4)

        for ln in lines:
            ax.add_line(Line2D([ln.x0, ln.x1], [ln.y0, ln.y1], color=colors[ln.key],
                               lw=2.2 if ln.key == "trunk" else 1.8, zorder=1,
                               ls=(0, (4, 2)) if ln.tagged else "-", solid_capstyle="butt"))
            if ln.marker:
                # The switch port this line lands on.
                s = 0.13
                ax.add_patch(Rectangle((ln.x1 - s / 2, ln.y1 - s / 2), s, s, zorder=5,
                                       facecolor=colors[ln.key], edgecolor="white", lw=0.8))

        for b in boxes:
            if b.kind == "slot":
                continue
            radius = 0.03 if b.kind == "port" else 0.07
            ax.add_patch(FancyBboxPatch(
                (b.x, b.y), b.w, b.h, boxstyle=f"round,pad=0,rounding_size={radius}",
                facecolor=FILL[b.kind], edgecolor=EDGE[b.kind],
                lw=1.6 if b.kind == "switch" else 1.0,
                zorder=3 if b.kind == "port" else 2))
            if b.kind == "switch":
                ax.text(b.cx, b.y + b.h / 2, b.title, color="white", fontsize=FS_SWITCH,
                        fontweight="bold", ha="center", va="center_baseline", zorder=6)
                continue
            ty = b.y + b.h - PAD
            if b.title:
                ax.text(b.cx, ty, b.title, fontsize=FS_TITLE, fontweight="bold",
                        ha="center", va="top", zorder=6)
                ty -= _text_h(1, FS_TITLE)
            if b.lines:
                ax.text(b.cx, ty, "\n".join(b.lines), fontsize=FS_LABEL, family=MONO,
                        ha="center", va="top", linespacing=1.2, zorder=6,
                        color="#222222")

        # Keep text as text in SVG: smaller files, and searchable names.
        with matplotlib.rc_context({"svg.fonttype": "none"}):
            fig.savefig(out_path, format=ext[1:], dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
