"""Plots for reports, ``moeplace affinity --plots`` and the notebook (matplotlib, imported lazily: the ``plot`` extra).

Every function takes arrays (or the project's result dicts) and returns a :class:`matplotlib.figure.Figure`
built without pyplot, so nothing here touches a GUI backend; :func:`save` writes it as PNG. In a notebook a
returned figure displays itself.

Shapes: ``conditional[E, E]`` (rows: expert at layer l, columns: expert at l+1), ``mi[L-1]``, ``per_layer``
lists as :func:`placement.evaluate.evaluate` returns them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PLOT_EXTRA_HINT = 'plots need matplotlib: pip install "moeplace[plot]"'


# one colour per solver in every plot (matplotlib's tab10/tab20 colours); other names (imported plans, policies)
# get a spare colour chosen by the name, so a name keeps its colour from one figure to the next
SOLVER_COLORS = {"contiguous": "#7f7f7f", "round-robin": "#8c564b", "eplb": "#1f77b4", "eplb-global": "#aec7e8",
                 "eplb-hierarchical": "#17becf", "exflow": "#ff7f0e", "moetuner": "#9467bd", "joint": "#2ca02c",
                 "budget": "#d62728"}
_SPARE = ("#e377c2", "#bcbd22", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
          "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def plan_colors(names: Sequence[str]) -> dict[str, str]:
    """``{name: colour}``: a solver's colour for a plan named after it (``joint``, ``joint #2``, ``joint (a.json)``),
    else a spare colour picked by a hash of the name; no two names of one figure share a colour (a later one
    moves on to the next free spare)."""
    import zlib

    used: set[str] = set()
    colors: dict[str, str] = {}
    for name in names:
        base = str(name).split(" ")[0]
        want = SOLVER_COLORS.get(base)
        if want is None or want in used:
            start = zlib.crc32(str(name).encode()) % len(_SPARE)
            free = [c for c in _SPARE[start:] + _SPARE[:start] if c not in used]
            want = free[0] if free else _SPARE[start]
        colors[name] = want
        used.add(want)
    return colors


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(PLOT_EXTRA_HINT) from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG atomically (temp file + rename); returns the path."""
    from traces import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png"))
    return path


# ordering ------------------------------------------------------------------------------------------------------
def _second_vectors(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Second left/right singular vectors of ``D_r^-1/2 A D_c^-1/2``, scaled back by ``D^-1/2``."""
    r = A.sum(axis=1)
    c = A.sum(axis=0)
    dr = 1.0 / np.sqrt(np.where(r > 0, r, 1.0))
    dc = 1.0 / np.sqrt(np.where(c > 0, c, 1.0))
    u, _, vt = np.linalg.svd(dr[:, None] * A * dc[None, :])
    if u.shape[1] < 2 or vt.shape[0] < 2:
        return np.zeros(A.shape[0]), np.zeros(A.shape[1])
    ru, cv = dr * u[:, 1], dc * vt[1]
    if (ru * r).sum() < 0:  # fix the sign so the picture does not flip with numerical noise
        ru, cv = -ru, -cv
    return ru, cv


def spectral_order(counts: np.ndarray, min_block: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders that bring a pair-count matrix's blocks onto the diagonal.

    Recursive bipartite spectral co-clustering (Dhillon, "Co-clustering documents and words using bipartite
    spectral graph partitioning", KDD 2001): scale ``A`` to ``D_r^-1/2 A D_c^-1/2``, embed rows and columns together by
    its second left and right singular vectors, split both at the widest gap of that embedding, and recurse
    into the two diagonal blocks; inside a block
    of at most ``min_block`` rows or columns, sort by the singular vectors. Experts that send their tokens to the
    same successors end up next to each other, each planted group as one contiguous run.

    Args:
        counts: float ``[E, F]`` pair counts (rows: experts at layer l, columns: experts at l+1).
    Returns:
        ``(row_order [E], col_order [F])`` permutations.
    """
    A = np.asarray(counts, dtype=np.float64)

    def rec(rows: np.ndarray, cols: np.ndarray) -> tuple[list, list]:
        ru, cv = _second_vectors(A[np.ix_(rows, cols)])
        ro, co = rows[np.argsort(ru, kind="stable")], cols[np.argsort(cv, kind="stable")]
        if min(rows.size, cols.size) <= min_block:
            return list(ro), list(co)
        # split rows and columns together at the widest gap of the joint embedding (never inside a tight group)
        z = np.concatenate([ru, cv])
        is_row = np.concatenate([np.ones(ru.size, bool), np.zeros(cv.size, bool)])
        order = np.argsort(z, kind="stable")
        rows_before = np.cumsum(is_row[order])[:-1]
        cols_before = np.cumsum(~is_row[order])[:-1]
        ok = (rows_before > 0) & (cols_before > 0) & (rows_before < ru.size) & (cols_before < cv.size)
        if not ok.any():
            return list(ro), list(co)
        gaps = np.where(ok, np.diff(z[order]), -np.inf)
        cut = z[order][int(np.argmax(gaps))]
        rlo, clo = ru <= cut, cv <= cut
        r1, c1 = rec(rows[rlo][np.argsort(ru[rlo], kind="stable")], cols[clo][np.argsort(cv[clo], kind="stable")])
        r2, c2 = rec(rows[~rlo][np.argsort(ru[~rlo], kind="stable")], cols[~clo][np.argsort(cv[~clo], kind="stable")])
        return r1 + r2, c1 + c2

    ro, co = rec(np.arange(A.shape[0]), np.arange(A.shape[1]))
    return np.asarray(ro, dtype=np.int64), np.asarray(co, dtype=np.int64)


def gpu_order(phy2log_row: np.ndarray, num_experts: int, slots_per_gpu: int) -> tuple[np.ndarray, np.ndarray]:
    """Experts grouped by the GPU of their first replica in one layer of a plan.

    Args:
        phy2log_row: int ``[S]`` logical expert of each slot (-1 = empty) for one MoE layer.
    Returns:
        ``(order [E], gpu [E])``: expert order (GPU-major, slot order inside a GPU) and each expert's GPU
        (-1 for experts with no slot, placed last).
    """
    gpu = np.full(num_experts, -1, dtype=np.int64)
    first_slot = np.full(num_experts, np.iinfo(np.int64).max, dtype=np.int64)
    for s in range(phy2log_row.size - 1, -1, -1):
        e = int(phy2log_row[s])
        if e >= 0:
            gpu[e] = s // slots_per_gpu
            first_slot[e] = s
    order = np.argsort(np.where(gpu >= 0, first_slot, np.iinfo(np.int64).max), kind="stable")
    return order, gpu


# affinity -------------------------------------------------------------------------------------------------------
def conditional_heatmaps(transitions: np.ndarray, boundaries: Sequence[int], layer_index: Sequence[int] | None = None,
                         plan=None, title: str | None = None, vmax_quantile: float = 0.995, order: str = "spectral",
                         panel_titles: Sequence[str] | None = None):
    """Heatmaps of ``P(expert at l+1 | expert at l)`` for a few boundaries.

    Args:
        transitions: float ``[L-1, E, E]`` pair counts (:attr:`placement.affinity.AffinityStats.transitions`).
        boundaries: boundary indices l (0-based, l -> l+1) to draw.
        layer_index: ``[L]`` decoder-layer index of each MoE layer, for the titles.
        plan: optional :class:`placement.plan.Plan`; experts are then grouped by the GPU the plan puts them on
            at each layer, with GPU blocks outlined: mass inside the outlined diagonal blocks is transitions
            that stay on one GPU. Without a plan experts are ordered by ``order``: "spectral"
            (:func:`spectral_order`, shows structure) or "index" (expert ids, comparable across panels).
        panel_titles: one title per panel (default: the layer pair).
    """
    if order not in ("spectral", "index"):
        raise ValueError(f"order must be 'spectral' or 'index', got {order!r}")
    boundaries = list(boundaries)
    n = len(boundaries)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = _figure(4.1 * cols + 0.6, 3.9 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    E = transitions.shape[1]
    li = list(layer_index) if layer_index is not None else list(range(transitions.shape[0] + 1))
    mats = []
    for b in boundaries:
        t = transitions[b]
        rs = t.sum(axis=1, keepdims=True)
        cond = np.divide(t, rs, out=np.zeros_like(t), where=rs > 0)
        blocks = None
        if plan is not None:
            spg = plan.topology.slots_per_gpu
            ro, rg = gpu_order(plan.phy2log[b], E, spg)
            co, cg = gpu_order(plan.phy2log[b + 1], E, spg)
            blocks = (rg[ro], cg[co])
        elif order == "spectral":
            ro, co = spectral_order(t)
        else:
            ro = co = np.arange(E)
        mats.append((cond[np.ix_(ro, co)], blocks))
    pos = np.concatenate([m[m > 0] for m, _ in mats]) if mats else np.zeros(0)
    vmax = float(np.quantile(pos, vmax_quantile)) if pos.size else 1.0  # one colour scale for all panels
    image = None
    how = "by GPU" if plan is not None else ("spectral order" if order == "spectral" else "expert id")
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        b = boundaries[i]
        m, blocks = mats[i]
        image = ax.imshow(m, cmap="magma_r", vmin=0.0, vmax=max(vmax, 1e-9), interpolation="nearest", aspect="equal")
        if blocks is not None:
            _outline_blocks(ax, *blocks)
        if panel_titles is not None:
            ax.set_title(panel_titles[i], fontsize=10)
            ax.set_xlabel(f"expert at the later layer ({how})", fontsize=8)
            ax.set_ylabel(f"expert at the earlier layer ({how})", fontsize=8)
        else:
            ax.set_title(f"layer {li[b]} -> layer {li[b + 1]}", fontsize=10)
            ax.set_xlabel(f"expert at layer {li[b + 1]} ({how})", fontsize=8)
            ax.set_ylabel(f"expert at layer {li[b]} ({how})", fontsize=8)
        if order == "index" and plan is None and E <= 16:
            ax.set_xticks(range(E))
            ax.set_yticks(range(E))
            ax.tick_params(labelsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="P(next expert | expert)")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _outline_blocks(ax, row_gpu: np.ndarray, col_gpu: np.ndarray) -> None:
    """Outline the (GPU g at l) x (GPU g at l+1) blocks of a GPU-ordered matrix."""
    from matplotlib.patches import Rectangle

    for g in np.unique(row_gpu[row_gpu >= 0]):
        r = np.flatnonzero(row_gpu == g)
        c = np.flatnonzero(col_gpu == g)
        if r.size and c.size:
            ax.add_patch(Rectangle((c[0] - 0.5, r[0] - 0.5), c[-1] - c[0] + 1, r[-1] - r[0] + 1, fill=False,
                                   edgecolor="tab:cyan", linewidth=1.0))


def mutual_information_plot(mi: np.ndarray, mi_shuffled: np.ndarray, layer_index: Sequence[int] | None = None,
                            title: str = "Inter-layer affinity: mutual information per layer boundary",
                            extra: Mapping[str, np.ndarray] | None = None):
    """Mutual information ``[L-1]`` (nats) per boundary against the token-shuffled baseline ``[L-1]``.

    ``extra`` adds more series (e.g. other workloads) as ``{label: [L-1]}``.
    """
    mi = np.asarray(mi)
    x = np.arange(mi.size)
    li = list(layer_index) if layer_index is not None else list(range(mi.size + 1))
    fig = _figure(8.0, 3.6)
    ax = fig.add_subplot()
    ax.plot(x, mi, marker="o", ms=3, label="trace")
    for label, series in (extra or {}).items():
        ax.plot(x, np.asarray(series), marker=".", ms=3, label=label)
    ax.plot(x, np.asarray(mi_shuffled), ls="--", color="grey", label="token-shuffled baseline")
    ax.set_xticks(x[:: max(1, mi.size // 13)])
    ax.set_xticklabels([f"{li[i]}->{li[i + 1]}" for i in x[:: max(1, mi.size // 13)]], fontsize=7, rotation=45)
    ax.set_xlabel("MoE layer boundary (decoder-layer indices)")
    ax.set_ylabel("mutual information (nats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def load_heatmap(load: np.ndarray, layer_index: Sequence[int] | None = None, title: str = "Expert load per MoE layer"):
    """``[L, E]`` load as share of each layer's mean (1 = average expert), experts sorted by load per layer."""
    load = np.asarray(load, dtype=np.float64)
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-300)
    srt = np.sort(rel, axis=1)[:, ::-1]
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    im = ax.imshow(srt, aspect="auto", cmap="viridis", interpolation="nearest")
    li = list(layer_index) if layer_index is not None else list(range(load.shape[0]))
    step = max(1, len(li) // 13)
    ax.set_yticks(range(0, len(li), step))
    ax.set_yticklabels([str(li[i]) for i in range(0, len(li), step)], fontsize=7)
    ax.set_xlabel("experts, hottest first")
    ax.set_ylabel("MoE layer")
    fig.colorbar(im, ax=ax, label="load / mean load")
    ax.set_title(title, fontsize=10)
    return fig


# plans ----------------------------------------------------------------------------------------------------------
def per_layer_plot(per_layer: Mapping[str, Sequence[dict]], key: str, ylabel: str, title: str,
                   boundary: bool = False, reference: float | None = None, higher_is_better: bool = False):
    """One line per plan of a per-layer metric.

    Args:
        per_layer: ``{plan name: evaluate(...)["per_layer"]}``.
        key: the per-layer field (``load_imbalance``, ``affinity_locality_next``, ...).
        boundary: the metric belongs to boundary l -> l+1 (x labels "l->l'"; the last layer has none).
        reference: a horizontal line (e.g. 1.0 = perfect balance).
    """
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot()
    labels = None
    colors = plan_colors(list(per_layer))
    for name, rows in per_layer.items():
        vals = [r.get(key) for r in rows]
        idx = [i for i, v in enumerate(vals) if v is not None]
        if not idx:
            continue
        ax.plot(idx, [vals[i] for i in idx], marker="o", ms=2.5, lw=1.2, label=name, color=colors[name])
        if labels is None:
            li = [r["moe_layer"] for r in rows]
            labels = [f"{li[i]}->{li[i + 1]}" if boundary else str(li[i]) for i in idx]
            ticks = idx
    if labels is not None:
        step = max(1, len(ticks) // 13)
        ax.set_xticks(ticks[::step])
        ax.set_xticklabels(labels[::step], fontsize=7, rotation=45 if boundary else 0)
    if reference is not None:
        ax.axhline(reference, color="grey", ls=":", lw=1)
    ax.set_xlabel("MoE layer boundary (decoder-layer indices)" if boundary else "MoE layer (decoder-layer index)")
    ax.set_ylabel(ylabel + (" (higher is better)" if higher_is_better else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(title, fontsize=10)
    return fig


def tradeoff_plot(overall: Mapping[str, dict], x_key: str = "load_imbalance", y_key: str = "cross_gpu_fraction",
                  xlabel: str = "load imbalance (mean over layers of max/mean GPU load)",
                  ylabel: str = "cross-GPU transitions (share of adjacent-layer pairs)",
                  title: str = "Balance vs affinity, held-out sequences (lower-left is better)"):
    """One point per plan (``{name: evaluate(...)["overall"]}``), in the plan's colour, named in a legend beside the
    axes (so no label overlaps another); plans at the same point are drawn as rings of growing size."""
    fig = _figure(7.2, 4.2)
    ax = fig.add_subplot()
    colors = plan_colors(list(overall))
    seen: dict[tuple[float, float], int] = {}  # plans already drawn at (about) this point
    for name, o in overall.items():
        x, y = o.get(x_key), o.get(y_key)
        if x is None or y is None:
            continue
        at = (round(x, 3), round(y, 3))
        n = seen.get(at, 0)
        seen[at] = n + 1
        if n == 0:
            ax.scatter([x], [y], s=36, color=colors[name], label=name, zorder=3)
        else:
            ax.scatter([x], [y], s=36 * (1 + 1.6 * n) ** 2, facecolors="none", edgecolors=colors[name], linewidths=1.5,
                       label=f"{name} (same point)", zorder=2)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.set_title(title, fontsize=10)
    return fig


def memory_curve_plot(rows: Sequence[dict], x_key: str, x_label: str, series: Sequence[tuple[str, str]],
                      title: str = "Memory budget: what each budget costs (held-out sequences)",
                      group_key: str | None = None):
    """The tunable-budget curve: one panel per ``(key, label)`` in ``series`` against ``x_key``.

    Args:
        rows: one dict per (budget[, method]) point.
        group_key: field that names a method; one line per method (e.g. ours vs top-frequency vs LRU-only).
    """
    panels = [(k, lab) for k, lab in series if any(r.get(k) is not None for r in rows)]
    fig = _figure(4.2 * max(1, len(panels)), 3.6)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get(group_key) if group_key else "plan", []).append(r)
    colors = plan_colors([str(g) for g in groups])
    for ax, (key, label) in zip(axes, panels):
        for name, pts in groups.items():
            pts = sorted((p for p in pts if p.get(key) is not None and p.get(x_key) is not None),
                         key=lambda p: p[x_key])
            if pts:
                ax.plot([p[x_key] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=str(name),
                        color=colors[str(name)])
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def pick_boundaries(mi: np.ndarray, n: int = 3) -> list[int]:
    """``n`` boundaries worth drawing: the strongest affinity, the weakest, and one in between (sorted)."""
    mi = np.asarray(mi)
    if mi.size <= n:
        return list(range(mi.size))
    order = np.argsort(mi)
    picks = [int(order[-1]), int(order[0])]
    mid = int(order[mi.size // 2])
    for c in [mid, *order[::-1].tolist()]:
        if len(picks) >= n:
            break
        if c not in picks:
            picks.append(int(c))
    return sorted(picks[:n])


def affinity_figures(stats, plan=None, boundaries: Sequence[int] | None = None) -> dict:
    """The affinity figures of one :class:`placement.affinity.AffinityStats`: ``{file stem: Figure}``."""
    mi = stats.mutual_information()
    mi_sh = stats.mutual_information("transitions_shuffled")
    b = list(boundaries) if boundaries is not None else pick_boundaries(mi)
    figs = {
        "affinity_heatmaps": conditional_heatmaps(
            stats.transitions, b, stats.moe_layer_index,
            title="Conditional routing P(expert at next MoE layer | expert), experts in spectral order"),
        "mutual_information": mutual_information_plot(mi, mi_sh, stats.moe_layer_index),
        "expert_load": load_heatmap(stats.load, stats.moe_layer_index),
    }
    if plan is not None:
        figs["affinity_heatmaps_by_gpu"] = conditional_heatmaps(
            stats.transitions, b, stats.moe_layer_index, plan=plan,
            title=f"The same matrices, experts grouped by GPU in plan '{plan.name}' (outlined: stays on one GPU)")
    return figs


def write_affinity_plots(stats, out_dir: str | Path, plan=None, boundaries: Sequence[int] | None = None) -> list[Path]:
    """Write :func:`affinity_figures` as PNGs into ``out_dir``; returns the paths."""
    from traces.format import make_output_dir

    out_dir = Path(out_dir)
    make_output_dir(out_dir)
    return [save(fig, out_dir / f"{stem}.png") for stem, fig in affinity_figures(stats, plan, boundaries).items()]
