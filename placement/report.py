"""Reports: plans and traces in, a folder with ``report.md``, ``report.html``, ``report.json`` and PNG plots out.

The report puts every plan side by side on the evaluation trace (held-out sequences when the caller split
them): the headline metrics of :mod:`placement.evaluate` with their ratio to the contiguous placement, how
each plan was solved (status, seconds, objective, bound, gap), and pictures: conditional routing heatmaps,
mutual information per layer boundary against a token-shuffled baseline, per-layer load imbalance and
cross-GPU transitions per plan, the balance/affinity trade-off, and the memory-budget curve when one is given.

``report.html`` is the same document as ``report.md`` with the plots embedded, so it can be mailed as one
file. Plots need matplotlib (the ``plot`` extra); without it the report is written without them and says so.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from placement.evaluate import HEADLINE, EvalData, evaluate, prepare
from placement.plan import Plan, _jsonable
from solvers.cost import CostModel
from traces import LoadProfile, RoutingTrace, atomic_write_bytes
from traces.format import make_output_dir
from traces.outputs import output_folder

# metrics where a larger value is better (everything else in the table: smaller is better)
HIGHER_IS_BETTER = {"balancedness", "affinity_locality", "affinity_locality_top1", "resident_hit_rate"}
# metrics other modules may add to ``overall``; shown when present
EXTRA_ROWS = [("affinity_locality_top1", "affinity locality, top-1 (higher better)"),
              ("resident_hit_rate", "resident hit rate (higher better)")]
BASELINE = "contiguous"
ALT = {"load_imbalance": "load imbalance per layer", "cross_gpu": "cross-GPU transitions per layer boundary",
       "tradeoff": "balance vs affinity", "affinity_heatmaps": "conditional routing heatmaps",
       "affinity_heatmaps_by_gpu": "conditional routing heatmaps grouped by GPU",
       "mutual_information": "mutual information per layer boundary", "memory_budget": "memory-budget curve",
       "online_replay": "online rebalancing replay over time"}


# a tiny document model rendered to Markdown and to HTML ------------------------------------------------------
@dataclass
class _Doc:
    blocks: list = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", list(header), [list(r) for r in rows]))

    def img(self, rel_path: str, alt: str, abs_path: Path, caption: str = "") -> None:
        self.blocks.append(("img", rel_path, alt, abs_path, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append("#" * b[1] + " " + b[2])
            elif kind == "p":
                out.append(b[1])
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif kind == "code":
                out.append("```\n" + b[1].rstrip("\n") + "\n```")
            elif kind == "table":
                header, rows = b[1], b[2]
                lines = ["| " + " | ".join(header) + " |",
                         "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |"]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[2]}]({b[1]})" + (f"\n\n*{b[4]}*" if b[4] else ""))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(b[1])}</code></pre>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(Path(b[3]).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                            f"<figcaption>{_inline(b[4])}</figcaption></figure>")
        return _HTML.format(title=html.escape(title), body="\n".join(body))


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
code {{ background: #f3f3f3; padding: 0 0.2em; }}
pre {{ background: #f3f3f3; padding: 0.6em; overflow-x: auto; }}
img {{ max-width: 100%; }}
figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
{body}
</body></html>
"""


def _inline(text: str) -> str:
    """Markdown inline subset (``code``, **bold**, [text](link)) to HTML, everything else escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) >= 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)
        out.append(s)
    return "".join(out)


# numbers --------------------------------------------------------------------------------------------------------
def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    v = float(v)
    if not np.isfinite(v):
        return "inf"
    if abs(v) >= 1e5:
        return f"{v:.4g}"
    return f"{v:.{digits}f}"


def metric_rows(overall: dict[str, dict]) -> list[tuple[str, str]]:
    """``(key, label)`` of the metrics any of the plans has a value for, in table order."""
    keys = list(HEADLINE) + [r for r in EXTRA_ROWS if r[0] not in dict(HEADLINE)]
    return [(k, lab) for k, lab in keys if any(o.get(k) is not None for o in overall.values())]


def comparison_table(overall: dict[str, dict], solver: dict[str, dict], baseline: str | None = BASELINE
                     ) -> tuple[list[str], list[list[str]]]:
    """Side-by-side table: one row per metric (best value in bold), one column per plan, ratios to ``baseline``.

    Args:
        overall: ``{plan name: evaluate(...)["overall"]}``.
        solver: ``{plan name: plan.solver}`` (status, seconds, objective, bound, gap).
    Returns:
        ``(header, rows)`` of strings.
    """
    names = list(overall)
    base = overall.get(baseline) if baseline else None
    header = ["metric"] + names
    rows = []
    for key, label in metric_rows(overall):
        vals = [overall[n].get(key) for n in names]
        present = [v for v in vals if v is not None]
        higher = key in HIGHER_IS_BETTER or "higher better" in label or "higher is better" in label
        best = (max(present) if higher else min(present)) if present else None
        cells = []
        for v in vals:
            c = _fmt(v)
            if v is not None and base is not None and base.get(key) not in (None, 0) and len(names) > 1:
                c += f" ({v / base[key]:.2f}x)"
            if v is not None and best is not None and len(present) > 1 and np.isclose(v, best, rtol=1e-9, atol=0):
                c = f"**{c}**"
            cells.append(c)
        rows.append([label] + cells)
    for key, label in (("status", "solver status"), ("seconds", "solve time (s)"), ("objective", "objective"),
                       ("bound", "bound"), ("gap", "gap")):
        vals = [solver.get(n, {}).get(key) for n in names]
        if all(v is None for v in vals):
            continue
        cells = [(_fmt(v, 2) if key == "seconds" else _fmt(v)) if not isinstance(v, str) else v for v in vals]
        rows.append([label] + cells)
    return header, rows


def headline(overall: dict[str, dict], baseline: str = BASELINE, pick: str | None = None) -> str | None:
    """One sentence on the plan with the lowest estimated MoE time (or ``pick``) against the baseline."""
    if baseline not in overall or len(overall) < 2:
        return None
    cands = [n for n in overall if n != baseline and overall[n].get("est_moe_us_per_token") is not None]
    if pick in overall and pick != baseline:
        best = pick
    elif cands:
        best = min(cands, key=lambda n: overall[n]["est_moe_us_per_token"])
    else:
        cands = [n for n in overall if n != baseline]
        best = min(cands, key=lambda n: overall[n].get("load_imbalance", np.inf))
    b, o = overall[baseline], overall[best]
    parts = []
    if o.get("cross_gpu_fraction") is not None and b.get("cross_gpu_fraction"):
        parts.append(f"cross-GPU transitions {o['cross_gpu_fraction']:.3f} vs {b['cross_gpu_fraction']:.3f} "
                     f"({o['cross_gpu_fraction'] / b['cross_gpu_fraction']:.2f}x)")
    parts.append(f"load imbalance {o['load_imbalance']:.3f} vs {b['load_imbalance']:.3f}")
    if o.get("est_moe_us_per_token") is not None and b.get("est_moe_us_per_token"):
        parts.append(f"estimated MoE time {o['est_moe_us_per_token'] / b['est_moe_us_per_token']:.2f}x")
    return f"**{best}** against {baseline} on the evaluation sequences: " + "; ".join(parts) + "."


def _unique_names(plans: Sequence[Plan], labels: Sequence[str] | None) -> list[str]:
    names, seen = [], {}
    for i, p in enumerate(plans):
        n = labels[i] if labels else p.name
        if n in seen:
            seen[n] += 1
            n = f"{n} #{seen[n]}"
        else:
            seen[n] = 1
        names.append(n)
    return names


# the report -----------------------------------------------------------------------------------------------------
def build_report(plans: Sequence[Plan], data: RoutingTrace | LoadProfile | EvalData, out_dir: str | Path, *,
                 labels: Sequence[str] | None = None, affinity=None, affinity_extra: dict | None = None,
                 title: str = "moeplace report", setup: Sequence[str] = (), reproduce: str | None = None,
                 cost: CostModel | None = None, baseline: str = BASELINE, memory_curve: dict | None = None,
                 files: Sequence[str] = (), skipped: dict[str, str] | None = None, pick: str | None = None,
                 plots: bool | None = None, progress: Callable[[str], None] | None = None,
                 staging: Path | None = None, recommendation: dict | None = None, same: dict[str, str] | None = None,
                 seed: int = 0, executor=None, online: dict | None = None) -> dict:
    """Evaluate ``plans`` on ``data`` and write the report folder, as a whole (:func:`traces.outputs.output_folder`:
    an interrupted or failed report leaves the previous folder as it was).

    Args:
        plans: plans for one model layout (same MoE layers and experts as ``data``).
        data: the evaluation trace (held-out sequences) or counts.
        affinity: :class:`placement.affinity.AffinityStats` for the affinity plots (None: no affinity section).
        affinity_extra: more mutual-information series for the plot, ``{label: [L-1]}``.
        setup: bullet lines describing data, split and topology.
        reproduce: the command that regenerates this report.
        memory_curve: ``{"rows": [...], "x": key, "x_label": str, "series": [(key, label)], "group": key|None,
            "note": str}`` from a memory-budget sweep, or None.
        files: bullet lines naming files written next to the report (plans, exports).
        skipped: ``{solver: reason}`` for solvers that could not plan this request.
        pick: plan the headline sentence is about (default: the recommended plan).
        plots: draw plots (None: when matplotlib is installed, else a note says how to get them).
        recommendation: :func:`placement.recommend.recommend`'s answer for these plans (None: computed here, with
            bootstrap resamples drawn with ``seed``).
        same: ``{solver: solver whose identical plan is shown instead}``, named in the report.
        staging: the staging folder of an :func:`~traces.outputs.output_folder` the caller holds for ``out_dir``
            (the demo writes its plans there too); None: the report opens its own.
        executor: a :mod:`placement.executor` backend for the per-token evaluation (in blocks); None: here.
        online: a :func:`placement.replay.replay` result, shown as a section with its table and plot (None: none).
    Returns:
        ``{"markdown", "html", "json": Path, "plots": [Path], "results": {name: evaluate(...)}, "notes": [str],
        "recommendation": dict | None}``, paths in ``out_dir``.
    """
    out_dir = Path(out_dir)
    if staging is None:
        with output_folder(out_dir, "moeplace report") as stage:
            return build_report(plans, data, out_dir, labels=labels, affinity=affinity, affinity_extra=affinity_extra,
                                title=title, setup=setup, reproduce=reproduce, cost=cost, baseline=baseline,
                                memory_curve=memory_curve, files=files, skipped=skipped, pick=pick, plots=plots,
                                progress=progress, staging=stage, recommendation=recommendation, same=same,
                                seed=seed, executor=executor, online=online)
    rep = _write_report(plans, data, Path(staging), labels=labels, affinity=affinity, affinity_extra=affinity_extra,
                        title=title, setup=setup, reproduce=reproduce, cost=cost, baseline=baseline,
                        memory_curve=memory_curve, files=files, skipped=skipped, pick=pick, plots=plots,
                        progress=progress, recommendation=recommendation, same=same, seed=seed, executor=executor,
                        online=online)
    for key in ("markdown", "html", "json"):
        rep[key] = out_dir / rep[key].relative_to(staging)
    rep["plots"] = [out_dir / p.relative_to(staging) for p in rep["plots"]]
    return rep


def _write_report(plans, data, out_dir: Path, *, labels, affinity, affinity_extra, title, setup, reproduce, cost,
                  baseline, memory_curve, files, skipped, pick, plots, progress, recommendation, same, seed,
                  executor=None, online=None) -> dict:
    from placement import plots as P
    from placement.recommend import recommend
    from placement.replay import summary_rows as replay_summary

    say = progress or (lambda m: None)
    make_output_dir(out_dir)
    ev = prepare(data)
    names = _unique_names(plans, labels)
    say("evaluating plans ...")
    results = {n: evaluate(p, ev, cost, executor) for n, p in zip(names, plans)}
    overall = {n: r["overall"] for n, r in results.items()}
    solver = {n: p.solver for n, p in zip(names, plans)}
    notes: list[str] = []
    rec = recommendation
    if rec is None:
        say("comparing the plans on resamples ...")
        rec = recommend(dict(zip(names, plans)), ev, overall, cost, seed=seed)
    pick = pick or (rec["best"] if rec else None)

    figs: dict[str, tuple] = {}  # stem -> (figure, caption); the alt text is ALT[stem]
    if plots and not P.available():
        raise P.PlotsUnavailable(P.PLOT_EXTRA_HINT + "; or leave --plots out to write the report without plots")
    want_plots = plots is not False and P.available()
    if plots is not False and not want_plots:
        notes.append(f"No plots: {P.PLOT_EXTRA_HINT}.")
    if want_plots:
        say("drawing plots ...")
        per_layer = {n: r["per_layer"] for n, r in results.items()}
        figs["load_imbalance"] = (P.per_layer_plot(
            per_layer, "load_imbalance", "max / mean GPU load", "Load imbalance per MoE layer", reference=1.0),
            "Load imbalance per MoE layer and plan: the busiest GPU's token-expert assignments over the mean "
            "(1.0 = perfectly even). The slowest GPU sets each layer's pace.")
        if any(r.get("affinity_locality_next") is not None for rows in per_layer.values() for r in rows):
            cross = {n: [{**r, "cross": None if r.get("affinity_locality_next") is None
                          else 1.0 - r["affinity_locality_next"]} for r in rows] for n, rows in per_layer.items()}
            figs["cross_gpu"] = (P.per_layer_plot(
                cross, "cross", "share of pairs on different GPUs", "Cross-GPU transitions per layer boundary",
                boundary=True),
                "Cross-GPU transitions per layer boundary and plan: the share of a token's expert pairs "
                "(expert at one MoE layer, expert at the next) that have no GPU in common.")
            figs["tradeoff"] = (P.tradeoff_plot(overall),
                                "Balance against affinity, one point per plan (lower-left is better on both).")
        if affinity is not None and affinity.num_layers > 1:
            mi = affinity.mutual_information()
            b = P.pick_boundaries(mi)
            li = affinity.moe_layer_index
            figs["affinity_heatmaps"] = (P.conditional_heatmaps(
                affinity.transitions, b, li,
                title="P(expert at next MoE layer | expert), experts in spectral order"),
                "Conditional routing P(expert at the next MoE layer | expert) at the strongest, a middle and the "
                "weakest layer boundary, experts reordered by spectral co-clustering so that experts with the same "
                "successors sit together. A uniform matrix would mean no affinity to exploit.")
            # group by the plan that keeps the most transitions on one GPU (the structure it captured)
            local = [n for n in names if n != baseline and overall[n].get("affinity_locality") is not None]
            show = max(local, key=lambda n: overall[n]["affinity_locality"]) if local else None
            if show is not None:
                plan = plans[names.index(show)]
                figs["affinity_heatmaps_by_gpu"] = (P.conditional_heatmaps(
                    affinity.transitions, b, li, plan=plan,
                    title=f"The same matrices, experts grouped by GPU in plan '{show}'"),
                    f"The same matrices with experts grouped by the GPU plan '{show}' puts them on; mass inside the "
                    f"outlined diagonal blocks is transitions that stay on one GPU.")
            figs["mutual_information"] = (P.mutual_information_plot(
                mi, affinity.mutual_information("transitions_shuffled"), li, extra=affinity_extra),
                "Mutual information between a token's expert at one MoE layer and at the next (nats), against the "
                "same statistic after shuffling tokens at the next layer (same loads, no affinity).")
        if memory_curve and memory_curve.get("rows"):
            figs["memory_budget"] = (P.memory_curve_plot(
                memory_curve["rows"], memory_curve["x"], memory_curve["x_label"], memory_curve["series"],
                group_key=memory_curve.get("group")),
                memory_curve.get("note") or "What each memory budget costs, on the evaluation sequences.")
        if online:
            from placement.replay import plot_replay

            figs["online_replay"] = (plot_replay(online), "Each policy's next-interval load imbalance at every "
                                     "rebalance (top) and the expert copies it has moved so far (bottom).")
    plot_dir = out_dir / "plots"
    written = []
    if figs:
        make_output_dir(plot_dir)
        for stem, (fig, _) in figs.items():
            written.append(P.save(fig, plot_dir / f"{stem}.png"))

    say("writing report ...")
    doc = _Doc()
    doc.h(1, title)
    doc.p("Every plan below is evaluated on the same sequences; when they are held-out sequences, the plans never saw "
          "them. Metrics are defined in the project's docs/concepts.md.")
    if setup:
        doc.h(2, "Setup")
        doc.ul(setup)
    doc.h(2, "Results")
    if rec:
        head = f"recommended: {rec['best']}"
        doc.p(f"**Recommended: {rec['best']}**" + rec["sentence"][len(head):] if rec["sentence"].startswith(head)
              else rec["sentence"])
    hl = headline(overall, baseline, pick)
    if hl:
        doc.p(hl)
    header, rows = comparison_table(overall, solver, baseline)
    doc.table(header, rows)
    if baseline in overall and len(overall) > 1:
        doc.p(f"In parentheses: ratio to {baseline}. Bold: the best value of the row. Solve time is wall-clock on the "
              f"machine that planned; gap = (objective - bound) / objective in the solver's own objective.")
    if skipped:
        doc.p("Solvers that could not plan this request: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if same:
        doc.p("Shown once: " + "; ".join(f"{d} gave the same plan as {k}" for d, k in same.items()) + ".")
    for stem, (_, caption) in figs.items():
        if stem in ("memory_budget", "online_replay"):
            continue
        doc.img(f"plots/{stem}.png", ALT.get(stem, stem), plot_dir / f"{stem}.png", caption)
    if "memory_budget" in figs:
        doc.h(2, "Memory budget")
        doc.img("plots/memory_budget.png", ALT["memory_budget"], plot_dir / "memory_budget.png", figs["memory_budget"][1])
    if memory_curve and memory_curve.get("rows") and memory_curve.get("table"):
        h, r = memory_curve["table"]
        doc.table(h, r)
    if online:
        from placement.replay import COLUMNS

        st = online["setup"]
        doc.h(2, "Online rebalancing")
        doc.p(f"The serving stacks re-plan every few thousand steps from the counts of the last window. Replayed on "
              f"{st['source']}: {st['rebalances']} rebalances, each policy seeing the last {st['window']} "
              f"{st['unit']} and judged on the next {st['interval']} (each {st['unit'][:-1]} standing for "
              f"{st['scale']:g} served), {st['gpus']} GPUs with {st['redundant']} redundant slots. `eplb` is EPLB "
              f"re-fitted on every window as the stacks run it, `static` keeps the first map, `moeplace` is "
              f"moeplace's migration-aware policy (docs/online.md). Lower is better in every column.")
        cols = [c for c in COLUMNS if c[0] in ("load_imbalance", "moved_copies", "migration_seconds",
                                               "est_total_seconds", "policy_seconds_max")]
        fmt = {"load_imbalance": "{:.4f}", "moved_copies": "{:d}", "migration_seconds": "{:.4f}",
               "est_total_seconds": "{:.4f}", "policy_seconds_max": "{:.3f}"}
        doc.table(["policy", *[label for _, label in cols]],
                  [[name, *[fmt[k].format(o[k]) for k, _ in cols]] for name, o in replay_summary(online)])
        if online.get("command"):
            doc.p("Reproduce with:")
            doc.code(online["command"])
        if "online_replay" in figs:
            doc.img("plots/online_replay.png", ALT["online_replay"], plot_dir / "online_replay.png",
                    figs["online_replay"][1])
    if files:
        doc.h(2, "Files")
        doc.ul(files)
    if notes:
        doc.h(2, "Notes")
        doc.ul(notes)
    if reproduce:
        doc.h(2, "Reproduce")
        doc.code(reproduce)

    md_path, html_path, json_path = out_dir / "report.md", out_dir / "report.html", out_dir / "report.json"
    md = doc.markdown()
    atomic_write_bytes(md_path, lambda f: f.write(md.encode()))
    page = doc.html(title)
    atomic_write_bytes(html_path, lambda f: f.write(page.encode()))
    record = {"title": title, "setup": list(setup), "reproduce": reproduce, "baseline": baseline,
              "plans": {n: {"solver": solver[n], "overall": results[n]["overall"], "per_layer": results[n]["per_layer"]}
                        for n in names},
              "affinity": affinity.summary() if affinity is not None else None,
              "memory_curve": (memory_curve or {}).get("rows"), "skipped": skipped or {},
              "online": dict(replay_summary(online)) if online else None,
              "same_plan_as": same or {}, "recommendation": rec,
              "plots": [str(p.relative_to(out_dir)) for p in written], "notes": notes}
    text = json.dumps(_jsonable(record), indent=1)
    atomic_write_bytes(json_path, lambda f: f.write(text.encode()))
    for fig, _ in figs.values():
        fig.clear()
    return {"markdown": md_path, "html": html_path, "json": json_path, "plots": written, "results": results,
            "notes": notes, "recommendation": rec}


def comparable_solvers() -> list[str]:
    """Registered solvers that plan every expert resident (the demo's side-by-side comparison).

    Solvers made for memory-budget plans (``placement.budget.BUDGET_SOLVERS``, when installed) are left out:
    the memory-budget curve compares them on their own terms.
    """
    import importlib

    from solvers import names

    try:
        budget_only = set(importlib.import_module("placement.budget").BUDGET_SOLVERS)
    except (ImportError, AttributeError):
        budget_only = set()
    return [n for n in names() if n not in budget_only]


def describe_data(label: str, trace) -> str:
    """One bullet: tokens, sequences, layers, experts, top-k of a trace (or profiles of counts)."""
    if isinstance(trace, RoutingTrace):
        return (f"{label}: {trace.num_tokens:,} tokens in {trace.num_sequences} sequences, {trace.num_layers} MoE "
                f"layers x {trace.num_experts} experts, top-{trace.top_k}")
    return (f"{label}: counts only ({trace.num_profiles} profile(s), {trace.num_layers} MoE layers x "
            f"{trace.num_experts} experts)")


def describe_topology(plan: Plan) -> str:
    t = plan.topology
    return (f"topology: {t.num_gpus} GPUs ({t.num_nodes} node(s) of {t.gpus_per_node}), {t.slots_per_gpu} expert "
            f"slots per GPU, {plan.num_redundant} redundant slots in total; links {t.intra_node_bandwidth / 1e9:g} GB/s "
            f"inside a node, {t.inter_node_bandwidth / 1e9:g} GB/s between nodes (per GPU and direction)")


def describe_cost(cost: CostModel | None) -> str:
    c = cost or CostModel()
    return (f"cost model: hidden size {c.hidden_size}, {c.dtype_bytes}-byte activations, expert intermediate size "
            f"{c.expert_intermediate_size}, {c.gpu_flops / 1e12:.0f} TFLOP/s per GPU, {c.dataflow} dataflow")


def reference_baseline(plans: Sequence[Plan], num_experts: int, load: np.ndarray) -> Plan | None:
    """A contiguous plan for the same topology as ``plans`` (the report's ratio baseline), or None.

    None when a plan is already contiguous or the plans do not share one topology and layout.
    """
    from solvers import Problem, solve

    if not plans or any(p.name == BASELINE for p in plans):
        return None
    first = plans[0]
    if any(p.topology != first.topology or p.num_layers != first.num_layers or p.num_experts != first.num_experts
           or not np.array_equal(p.moe_layer_index, first.moe_layer_index) for p in plans):
        return None
    if first.topology.num_slots < num_experts:
        return None
    res = solve(BASELINE, Problem(load=load, topology=first.topology))
    return Plan.from_result(res, num_experts, first.topology, first.moe_layer_index, first.num_hidden_layers,
                            first.model, provenance={"note": "reference baseline added by moeplace report"})
