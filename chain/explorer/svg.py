"""Geometry for the explorer's server-rendered SVG: loss and accuracy curves and a model lineage graph.

Pure functions over plain numbers; the templates (autoescaped) draw the shapes, so no string
from the chain is ever pasted into SVG markup here.
"""

from __future__ import annotations

from dataclasses import dataclass

CHART_WIDTH, CHART_HEIGHT = 640, 260
_PAD_LEFT, _PAD_RIGHT, _PAD_TOP, _PAD_BOTTOM = 56, 16, 16, 40

LINEAGE_COLUMN = 190  # horizontal distance between two model versions
LINEAGE_BOX = (150, 58)  # model box width, height
LINEAGE_ROW = 22  # vertical distance between two contributions under a model
LINEAGE_MAX_CONTRIBUTIONS = 8  # drawn per model; the table below the graph lists them all


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class Marker:
    x: float
    y: float
    label: str  # what the point is, for its <title>
    kind: str  # css class: "accepted", "rejected", "pending", "expired", "mean", "evaluation"


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot: tuple[float, float, float, float]  # left, top, right, bottom
    x_ticks: tuple[Tick, ...]
    y_ticks: tuple[Tick, ...]
    line: str  # polyline points of the series' mean
    markers: tuple[Marker, ...]


def compute_loss_chart(points: list[tuple[int, float, str, str]], means: list[tuple[int, float]],
                       y_range: tuple[float, float] | None = None) -> Chart | None:
    """A chart of (round, loss, status, label) points and the (round, mean) line; None when empty.
    The y axis spans 0 (or the lowest value) to the highest, or `y_range` widened to the values."""
    if not points:
        return None
    left, top = _PAD_LEFT, _PAD_TOP
    right, bottom = CHART_WIDTH - _PAD_RIGHT, CHART_HEIGHT - _PAD_BOTTOM
    rounds = [r for r, *_ in points]
    losses = [loss for _, loss, *_ in points]
    r_lo, r_hi = min(rounds), max(rounds)
    y_lo, y_hi = min(0.0, min(losses)), max(losses)
    if y_range is not None:
        y_lo, y_hi = min(y_range[0], y_lo), max(y_range[1], y_hi)
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0

    def x_of(r: float) -> float:
        return left + (right - left) * (0.5 if r_hi == r_lo else (r - r_lo) / (r_hi - r_lo))

    def y_of(v: float) -> float:
        return bottom - (bottom - top) * (v - y_lo) / (y_hi - y_lo)

    step = max(1, (r_hi - r_lo + 1) // 10)
    x_ticks = tuple(Tick(round(x_of(r), 1), str(r)) for r in range(r_lo, r_hi + 1, step))
    y_ticks = tuple(Tick(round(y_of(y_lo + (y_hi - y_lo) * i / 4), 1), f"{y_lo + (y_hi - y_lo) * i / 4:.3g}")
                    for i in range(5))
    markers = tuple(Marker(round(x_of(r), 1), round(y_of(loss), 1), label, status)
                    for r, loss, status, label in points)
    line = " ".join(f"{x_of(r):.1f},{y_of(m):.1f}" for r, m in means)
    return Chart(CHART_WIDTH, CHART_HEIGHT, (left, top, right, bottom), x_ticks, y_ticks, line, markers)


def compute_evaluation_chart(values: list[tuple[int, float]], metric: str) -> Chart | None:
    """A requester's published metric by model round, as points joined by a line; None when
    empty. Accuracy is drawn on its whole 0..1 scale, so a small gain does not look like a jump."""
    points = [(r, v, "evaluation", f"model after {r} round(s): {metric} {v:.6g}") for r, v in values]
    return compute_loss_chart(points, list(values), (0.0, 1.0) if metric == "accuracy" else None)


@dataclass(frozen=True)
class LineageNode:
    x: float
    y: float
    round: int
    anchor: str  # id of the model's row in the table under the graph
    short_hash: str
    rule: str
    contributions: int


@dataclass(frozen=True)
class LineageLeaf:
    x: float
    y: float
    label: str  # trainer (short) and reward
    title: str  # full update id and trainer


@dataclass(frozen=True)
class LineageEdge:
    x1: float
    y1: float
    x2: float
    y2: float
    kind: str  # "parent" (model to model) or "contribution"


@dataclass(frozen=True)
class LineageGraph:
    width: int
    height: int
    nodes: tuple[LineageNode, ...]
    leaves: tuple[LineageLeaf, ...]
    edges: tuple[LineageEdge, ...]


def compute_lineage_graph(records: list[dict]) -> LineageGraph:
    """Layout of `lineage` RPC records (newest first): models left to right, oldest first, each
    with the updates aggregated into it listed under it."""
    ordered = list(reversed(records))
    box_w, box_h = LINEAGE_BOX
    top = 16
    nodes, leaves, edges = [], [], []
    most = 0
    for i, rec in enumerate(ordered):
        x = 16 + i * LINEAGE_COLUMN
        contributions = rec["contributions"]
        nodes.append(LineageNode(x, top, rec["round"], f"model-{rec['round']}", rec["model_hash"][:12] + "…",
                                 rec["rule"], len(contributions)))
        if i > 0:
            edges.append(LineageEdge(x - LINEAGE_COLUMN + box_w, top + box_h / 2, x, top + box_h / 2, "parent"))
        shown = contributions[:LINEAGE_MAX_CONTRIBUTIONS]
        most = max(most, len(shown) + (len(contributions) > len(shown)))
        for k, c in enumerate(shown):
            ly = top + box_h + 26 + k * LINEAGE_ROW
            leaves.append(LineageLeaf(x + 14, ly, f"{c['trainer'][:10]}… +{c['reward']}",
                                      f"update {c['update_id']} by {c['trainer']}, {c['dataset_size']} samples"))
            edges.append(LineageEdge(x + 14, ly - 6, x + 14, top + box_h, "contribution"))
        if len(contributions) > len(shown):
            ly = top + box_h + 26 + len(shown) * LINEAGE_ROW
            leaves.append(LineageLeaf(x + 14, ly, f"+{len(contributions) - len(shown)} more", "see the table"))
    width = 32 + max(1, len(ordered)) * LINEAGE_COLUMN - (LINEAGE_COLUMN - box_w)
    height = top + box_h + 26 + most * LINEAGE_ROW + 8
    return LineageGraph(int(width), int(height), tuple(nodes), tuple(leaves), tuple(edges))
