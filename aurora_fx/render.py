"""Pictures of the surgery, as SVG or PNG (networkx layout + matplotlib; no graphviz needed).

* ``render_site(report, site, path)``: the rewritten graph of one site, left to right: input,
  base linear, the adapter (A, ANL branches, B, scale; or the fused op), the add, the output;
  nodes coloured by role.
* ``render_map(report, path)``: which layers are adapted: one row per layer index, one column
  per site name, each cell coloured by method and labelled with its rank (AROMA: grown rank).

Text stays text in SVG (``svg.fonttype = none``) and each cell's SVG id is the full site path,
so the files can be searched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import networkx as nx

from aurora_fx.atomic import atomic_path
from aurora_fx.report import AdapterReport

__all__ = ["render", "render_site", "render_map", "ROLE_COLORS", "METHOD_COLORS"]

ROLE_COLORS = {"input": "#9ecae1", "output": "#9ecae1", "base": "#d9d9d9", "adapter": "#fdae6b", "fused": "#e6550d",
               "sum": "#74c476", "other": "#f0f0f0"}
METHOD_COLORS = {"aurora": "#e6550d", "lora": "#3182bd", "aroma": "#31a354"}
_LAYER = re.compile(r"^(?P<prefix>.*?)(?P<index>\d+)\.(?P<rest>.+)$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise ValueError(f"render to a .svg or .png file, got {str(path)!r}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix[1:], dpi=130, bbox_inches="tight")
    return path


def _layered_positions(graph: nx.DiGraph) -> dict[str, tuple[float, float]]:
    """x: topological layer; y: the longest path in the middle, base branches below, others above."""
    for layer, nodes in enumerate(nx.topological_generations(graph)):
        for node in nodes:
            graph.nodes[node]["layer"] = layer
    main = set(nx.dag_longest_path(graph))
    rest = graph.subgraph([n for n in graph if n not in main]).to_undirected()
    rows, above, below = {n: 0 for n in main}, 1, -1
    for component in sorted(nx.connected_components(rest), key=lambda c: min(graph.nodes[n]["layer"] for n in c)):
        if any(graph.nodes[n]["role"] == "base" for n in component):
            row, below = below, below - 1
        else:
            row, above = above, above + 1
        rows.update({n: row for n in component})
    return {n: (float(graph.nodes[n]["layer"]), float(rows[n])) for n in graph}


_DTYPE_ONLY = {"getattr", "promote_types"}  # dtype lookups: dropped from pictures
_PASS_THROUGH = {"to", "getitem"}  # casts and tuple picks: contracted onto their data input


def _simplify(graph: nx.DiGraph) -> nx.DiGraph:
    """For the picture only: drop dtype plumbing, fold weights into their consumers' labels."""
    g = graph.copy()
    g.remove_nodes_from([n for n, d in g.nodes(data=True) if d["target"] in _DTYPE_ONLY])
    for node in [n for n, d in g.nodes(data=True) if d["target"] in _PASS_THROUGH]:
        src = g.nodes[node]["data_input"]
        for dst in g.successors(node):
            if src in g:
                g.add_edge(src, dst)
        g.remove_node(node)
    for node in [n for n, d in g.nodes(data=True) if d["op"] == "get_attr"]:
        name = g.nodes[node]["target"].split(".")[-1]
        for dst in list(g.successors(node)):
            g.nodes[dst].setdefault("weights", []).append(name)
        g.remove_node(node)
    for _, d in g.nodes(data=True):
        label = d["target"].replace(".default", "")
        d["label"] = f"{label}({', '.join(d['weights'])})" if d.get("weights") and label == "linear" else label
        if d["role"] == "fused":
            d["label"] = "aurora_delta_add\n(A, B, H, Ws)"
        if d["role"] == "sum" and label == "add":
            d["label"] = "add\n(base + adapter)"
    return g


def render_site(report: AdapterReport, site: str, path: str | os.PathLike) -> Path:
    """Draw the rewritten owner graph of ``site`` (roles coloured; see ``ROLE_COLORS``)."""
    plt = _pyplot()
    graph = _simplify(report.site_graph(site))
    pos = _layered_positions(graph)
    width = max(6.0, 1.7 * (1 + max(d["layer"] for _, d in graph.nodes(data=True))))
    height = 1.2 + 1.1 * (max(y for _, y in pos.values()) - min(y for _, y in pos.values()) + 1)
    fig, ax = plt.subplots(figsize=(width, height))
    for skip in (False, True):  # an edge that skips a layer on the same row (x into the fused op) arcs over
        edges = [(u, v) for u, v in graph.edges if (pos[u][1] == pos[v][1] and pos[v][0] - pos[u][0] > 1) == skip]
        nx.draw_networkx_edges(graph, pos, edgelist=edges, ax=ax, arrows=True, arrowsize=12, edge_color="#777777",
                               node_size=2600, node_shape="s", connectionstyle="arc3,rad=-0.35" if skip else "arc3")
    for node, d in graph.nodes(data=True):
        x, y = pos[node]
        ax.text(x, y, d["label"], ha="center", va="center", fontsize=7, gid=f"node:{node}",
                bbox={"boxstyle": "round,pad=0.45", "fc": ROLE_COLORS.get(d["role"], "#f0f0f0"), "ec": "#555555"})
    roles = {d["role"] for _, d in graph.nodes(data=True)}
    handles = [plt.Line2D([], [], marker="s", ls="", color=c, label=r) for r, c in ROLE_COLORS.items() if r in roles]
    ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False)
    ax.set_title(f"{site}: base + adapter", fontsize=9)
    ax.margins(0.08)
    ax.axis("off")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def _grid(report: AdapterReport) -> tuple[list[str], list[str], dict[tuple[str, str], object]]:
    cells, rows, cols = {}, [], []
    for info in report.adapters:
        match = _LAYER.match(info.path)
        row, col = (f"{match['prefix']}{match['index']}", match["rest"]) if match else ("other", info.path)
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[(row, col)] = info
    return rows, cols, cells


def render_map(report: AdapterReport, path: str | os.PathLike) -> Path:
    """Draw which layers are adapted: rows are layers, columns site names, colour = method, text = rank."""
    if not report.adapters:
        raise ValueError("the model has no adapters to draw; call aurora_fx.apply(model, pattern) first")
    plt = _pyplot()
    rows, cols, cells = _grid(report)
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(cols), 0.9 + 0.38 * len(rows)))
    for (row, col), info in cells.items():
        x, y = cols.index(col), len(rows) - 1 - rows.index(row)
        rect = plt.Rectangle((x, y), 0.95, 0.9, color=METHOD_COLORS.get(info.method, "#999999"),
                             alpha=0.35 + 0.65 * min(1.0, info.rank / 8))
        rect.set_gid(info.path)
        ax.add_patch(rect)
        ax.text(x + 0.47, y + 0.45, f"{info.method} r{info.rank}", ha="center", va="center", fontsize=7,
                gid=f"label:{info.path}")
    ax.set_xlim(0, len(cols))
    ax.set_ylim(0, len(rows))
    ax.set_xticks([i + 0.47 for i in range(len(cols))], cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks([len(rows) - 1 - i + 0.45 for i in range(len(rows))], rows, fontsize=7)
    ax.set_title(f"{report.model_class}: {len(report.adapters)} adapted sites, {report.adapter_params:,} adapter "
                 f"params", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


def render(report: AdapterReport, path: str | os.PathLike, site: str | None = None) -> Path:
    """``render_site`` when ``site`` is given, else ``render_map``."""
    return render_site(report, site, path) if site else render_map(report, path)
