"""Online rebalancing: a counts-only, migration-aware, incremental expert-placement policy.

This is what a serving stack calls between batches where it calls DeepSeek's EPLB today (vLLM's EPLB policy,
SGLang's EPLB manager): given the per-expert token counts of the last windows and the placement in service, return
the next placement. EPLB (:mod:`solvers.eplb`) recomputes from scratch and moves most expert copies at every
rebalance; this policy starts from the placement in service and moves a copy only when the predicted gain repays
the move.

Model. The counts carry no co-activation, so the cost model of :mod:`solvers.cost` reduces to one rate per
token-expert assignment on a GPU: ``beta = seconds_per_assignment + 2 x token_bytes / G x ((n - 1) / intra_bw +
(G - n) / inter_bw)`` (compute, plus the dispatch and combine copies the GPU receives with homes spread evenly;
n GPUs per node), and a layer takes ``beta x`` the load of its busiest GPU. With several windows kept as
profiles (weights ``w``, each scaled to the newest window's total) the predicted time of a placement is
``beta x horizon x sum_l sum_n w_n max_g load[n, l, g]``: the expected busiest-GPU load over the recent windows,
which rewards placements that stay balanced from window to window rather than fitting the newest one
(``horizon``: the traffic the placement will serve before the next rebalance, in windows). Every expert copy that
lands on a GPU that did not hold that expert before costs ``move_cost`` seconds (default: one expert's weights over
the intra-node link, as the joint planner's ``migration_cost``).

Method.

1. Profiles: the newest ``history`` windows, cut at the most recent change of workload: walking back from the
   newest window, an older one is kept while its total-variation distance to those kept is at most
   ``change_factor`` x what sampling alone would give (:func:`sampling_tv`; counts as recorded, so their size sets
   the noise).
   After a phase change the placement follows the new phase at the first rebalance that sees a whole window of it.
2. Fresh plan (:func:`fresh_plan`): replicas by water-filling (each extra slot to the expert with the largest load
   per replica, at most one copy per GPU), copies packed heaviest first onto the least-loaded GPU that has room and
   does not hold the expert (EPLB's balanced packing plus the one-copy-per-GPU rule; hierarchical: groups packed
   onto nodes first, as EPLB's hierarchical policy does), then the local search below with free moves.
3. Incremental search (:func:`improve`), vectorised over layers: in every round each layer proposes its best move,
   either a swap of a copy on its busiest GPU with a copy elsewhere or a re-target of one redundant copy to another
   expert (a hot expert gains a replica, a cold one loses one); a move's value is its exact gain in the predicted
   time minus ``move_cost`` per copy it adds to the moved set (a copy moved back where it was is refunded), and
   only moves of positive value are taken, best first, within ``max_moves``. Every accepted move lowers
   ``predicted time + move_cost x moved copies``, so the search ends.
4. Hysteresis: the placement in service, the incremental result and the fresh plan relabelled to keep most copies
   where they are (one assignment problem per layer over GPUs, :func:`relabel`) are compared on that same sum; the
   lowest wins, so nothing moves when no gain repays its moves.

Shapes: N windows, L MoE layers, E logical experts, S physical slots (``num_replicas``), G GPUs, slot ``s`` on GPU
``s // (S / G)``, GPU ``g`` on node ``g // (G / num_nodes)``. Pure functions over numpy arrays (no placement or
trace types), like :mod:`solvers.eplb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers.base import SolverInputError
from solvers.cost import CostModel

__all__ = ["Layout", "rebalance", "fresh_plan", "improve", "relabel", "select_windows", "seconds_per_assignment",
           "predicted_load", "moved_copies"]


@dataclass(frozen=True)
class Layout:
    """Slots, GPUs and nodes of one expert-parallel group, and whether expert groups stay on nodes.

    With ``keep_groups`` every copy of an expert lies on the node its group (E / num_groups consecutive experts) is
    packed onto, and each node holds num_groups / num_nodes whole groups (EPLB's hierarchical policy, for
    node-limited routing); an expert then has at most ``gpus_per_node`` copies, else at most G.
    """

    num_experts: int
    num_slots: int
    num_gpus: int
    num_nodes: int = 1
    num_groups: int = 1
    keep_groups: bool = False

    def __post_init__(self) -> None:
        E, S, G, N, grp = self.num_experts, self.num_slots, self.num_gpus, self.num_nodes, self.num_groups
        if G < 1 or N < 1 or G % N:
            raise SolverInputError(f"num_gpus ({G}) must be a positive multiple of num_nodes ({N})")
        if S < E or S % G:
            raise SolverInputError(f"num_replicas ({S}) must be at least the {E} experts and a multiple of num_gpus "
                                   f"({G})")
        if grp < 1 or E % grp:
            raise SolverInputError(f"num_groups ({grp}) must divide the {E} experts")
        if S // G > (E // N if self.keep_groups else E):
            raise SolverInputError(f"{S // G} slots per GPU cannot hold distinct experts ({E // N if self.keep_groups else E} "
                                   f"to choose from{' per node' if self.keep_groups else ''}); a GPU holds at most one "
                                   f"copy of an expert, so use fewer redundant slots")
        if self.keep_groups:
            if grp % N:
                raise SolverInputError(f"keeping expert groups on nodes needs num_groups ({grp}) to be a multiple "
                                       f"of num_nodes ({N})")
            if (S // N) < E // N:
                raise SolverInputError("each node needs at least as many slots as the experts of its groups")

    @property
    def spg(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def gpn(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def cap(self) -> int:
        """Most copies one expert may have (one per GPU, inside its node when groups stay on nodes)."""
        return self.gpn if self.keep_groups else self.num_gpus

    def gpu_of_slot(self) -> np.ndarray:
        return np.arange(self.num_slots) // self.spg

    def node_of_gpu(self) -> np.ndarray:
        return np.arange(self.num_gpus) // self.gpn


# ----------------------------------------------------------------------------------------------------------------
# Inputs: windows -> profiles, and the rate of one assignment
# ----------------------------------------------------------------------------------------------------------------


def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over layers of the total-variation distance between the expert distributions of ``a, b [L, E]``."""
    pa = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-300)
    pb = b / np.maximum(b.sum(axis=-1, keepdims=True), 1e-300)
    return float(0.5 * np.abs(pa - pb).sum(axis=-1).mean())


def sampling_tv(a: np.ndarray, b: np.ndarray) -> float:
    """Expected total-variation distance between the expert distributions of two windows ``a, b [L, E]`` drawn
    from one distribution (their pooled one), if each window's assignments were independent draws:
    ``0.5 sum_e sqrt(2 / pi) sqrt(p_e (1 - p_e) (1 / M_a + 1 / M_b))``, mean over layers (M: a window's total)."""
    Ma = np.maximum(a.sum(axis=-1, keepdims=True), 1e-300)
    Mb = np.maximum(b.sum(axis=-1, keepdims=True), 1e-300)
    p = (a + b) / (Ma + Mb)
    return float((0.5 * np.sqrt(2.0 / np.pi) * np.sqrt(p * (1.0 - p) * (1.0 / Ma + 1.0 / Mb))).sum(axis=-1).mean())


def select_windows(windows: np.ndarray, history: int = 4, change_factor: float = 3.0) -> tuple[np.ndarray, dict]:
    """The profiles the policy plans on: ``[H, L, E]``, newest last, each scaled to the newest window's totals.

    Args:
        windows: ``[N, L, E]`` per-expert counts of consecutive windows, newest last (counts as recorded: their
            size sets the sampling noise).
        history: at most this many newest windows are kept.
        change_factor: walking back from the newest window, an older window is dropped, with every window before
            it, when its distance to the windows kept so far exceeds this many times the distance sampling alone
            would give (:func:`sampling_tv`): the workload changed there.
    Returns:
        profiles and ``{"windows": H, "change": bool}`` (change: a window was dropped for its distance).
    """
    W = np.asarray(windows, dtype=np.float64)
    N = W.shape[0]
    keep = [N - 1]
    change = False
    for i in range(N - 2, max(N - 1 - history, -1), -1):
        kept = W[keep].sum(axis=0)
        if _tv(W[i], kept) > change_factor * sampling_tv(W[i], kept):
            change = True
            break
        keep.append(i)
    P = W[sorted(keep)]
    tot = P.sum(axis=-1, keepdims=True)
    newest = P[-1].sum(axis=-1, keepdims=True)
    P = np.where(tot > 0, P * (newest / np.where(tot > 0, tot, 1.0)), P)
    return P, {"windows": len(keep), "change": change}


def seconds_per_assignment(cost: CostModel, num_gpus: int, gpus_per_node: int, intra_node_bandwidth: float = 450e9,
                           inter_node_bandwidth: float = 50e9) -> float:
    """``beta``: seconds one more token-expert assignment adds to its GPU under the counts model without
    co-activation (compute, plus one dispatch and one combine copy from homes spread evenly over the GPUs)."""
    G, n = num_gpus, gpus_per_node
    comm = 2.0 * cost.token_bytes / G * ((n - 1) / intra_node_bandwidth + (G - n) / inter_node_bandwidth)
    return cost.seconds_per_assignment + comm


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------


def _smallest(a: np.ndarray, k: int) -> np.ndarray:
    """int ``[R, k]`` indices of the k smallest entries of each row of ``a [R, n]``, ascending, ties by index (rows
    here are short: a full stable sort is faster than a partition and its bookkeeping)."""
    return np.argsort(a, axis=1, kind="stable")[:, :k]


def _replicas(X: np.ndarray, E: int) -> np.ndarray:
    L = X.shape[0]
    return np.bincount((np.arange(L)[:, None] * E + X).ravel(), minlength=L * E).reshape(L, E)


def _holds(X: np.ndarray, E: int, layout: Layout) -> np.ndarray:
    """bool ``[L, E, G]``: expert e has a copy on GPU g."""
    L = X.shape[0]
    h = np.zeros((L, E, layout.num_gpus), dtype=bool)
    h[np.arange(L)[:, None], X, layout.gpu_of_slot()[None, :]] = True
    return h


def predicted_load(X: np.ndarray, profiles: np.ndarray, layout: Layout) -> np.ndarray:
    """``[N, L, G]`` load of each GPU under each profile (replicas split their expert's load evenly)."""
    P = np.asarray(profiles, dtype=np.float64)
    if P.ndim == 2:
        P = P[None]
    L, E = P.shape[1:]
    r = _replicas(X, E)
    lay = np.arange(L)[:, None]
    piece = P[:, lay, X] / r[lay, X][None]
    return piece.reshape(P.shape[0], L, layout.num_gpus, layout.spg).sum(axis=-1)


def moved_copies(new: np.ndarray, old: np.ndarray, num_experts: int, layout: Layout) -> np.ndarray:
    """``[L]`` expert copies that must be moved: (expert, GPU) pairs of ``new`` absent from ``old`` (a GPU that
    already holds the expert copies it locally, as vLLM's and SGLang's weight transfer do)."""
    return (_holds(new, num_experts, layout) & ~_holds(old, num_experts, layout)).sum(axis=(1, 2))


# ----------------------------------------------------------------------------------------------------------------
# Fresh plan
# ----------------------------------------------------------------------------------------------------------------


def _water_fill(load: np.ndarray, slots: int, cap: int) -> np.ndarray:
    """int ``[R, n]`` copies per expert for rows ``load [R, n]``: every expert once, each further slot to the expert
    with the largest load per copy (ties: lowest id) that has fewer than ``cap`` copies."""
    R, n = load.shape
    r = np.ones((R, n), dtype=np.int64)
    rows = np.arange(R)
    for _ in range(slots - n):
        score = np.where(r < cap, load / r, -np.inf)
        r[rows, np.argmax(score, axis=1)] += 1
    return r


def _pack(load: np.ndarray, r: np.ndarray, num_gpus: int, spg: int) -> np.ndarray:
    """int ``[R, num_gpus x spg]`` local expert of each slot: copies heaviest first, each onto the least-loaded GPU
    with a free slot that does not hold that expert (then a repair swap where only GPUs holding it have room)."""
    R, n = load.shape
    S = num_gpus * spg
    phys = np.stack([np.repeat(np.arange(n), r[i]) for i in range(R)])  # [R, S]
    piece = np.take_along_axis(load / r, phys, axis=1)
    order = np.argsort(-piece, axis=1, kind="stable")
    rows = np.arange(R)
    gl = np.zeros((R, num_gpus))
    cnt = np.zeros((R, num_gpus), dtype=np.int64)
    holds = np.zeros((R, n, num_gpus), dtype=bool)
    X = np.full((R, S), -1, dtype=np.int64)
    for j in range(S):
        e = phys[rows, order[:, j]]
        p = piece[rows, order[:, j]]
        room = cnt < spg
        ok = room & ~holds[rows, e]
        g = np.argmin(np.where(ok, gl, np.inf), axis=1)
        stuck = ~ok[rows, g]
        if stuck.any():  # only GPUs that already hold e have room: put it anywhere with room, repaired below
            g = np.where(stuck, np.argmax(room, axis=1), g)
        X[rows, g * spg + cnt[rows, g]] = e
        holds[rows, e, g] = True
        gl[rows, g] += p
        cnt[rows, g] += 1
    for i in np.flatnonzero([_has_duplicate(X[i], num_gpus, spg) for i in range(R)]):
        X[i] = _repair_row(X[i], num_gpus, spg)
    return X


def _has_duplicate(row: np.ndarray, num_gpus: int, spg: int) -> bool:
    s = np.sort(row.reshape(num_gpus, spg), axis=1)
    return bool((s[:, 1:] == s[:, :-1]).any())


def _repair_row(row: np.ndarray, num_gpus: int, spg: int) -> np.ndarray:
    """Swap away second copies of an expert on one GPU: with the expert on g twice and held by fewer than all GPUs,
    some GPU g2 lacks it, and g2 holds an expert f that g lacks (g holds fewer distinct experts than g2); swap."""
    row = row.copy()
    for _ in range(row.size):
        grid = row.reshape(num_gpus, spg)
        bad = None
        for g in range(num_gpus):
            vals, counts = np.unique(grid[g], return_counts=True)
            if (counts > 1).any():
                bad = (g, int(vals[counts > 1][0]))
                break
        if bad is None:
            return row
        g, e = bad
        a = g * spg + int(np.flatnonzero(grid[g] == e)[1])
        done = False
        for g2 in range(num_gpus):
            if g2 == g or (grid[g2] == e).any():
                continue
            for j in range(spg):
                f = grid[g2, j]
                if not (grid[g] == f).any():
                    row[a], row[g2 * spg + j] = f, e
                    done = True
                    break
            if done:
                break
        if not done:
            raise AssertionError("no repair swap found (an expert has more copies than GPUs)")
    return row


def fresh_plan(load: np.ndarray, layout: Layout) -> np.ndarray:
    """``[L, S]`` a placement from scratch for ``load [L, E]``: water-filled replicas packed heaviest first with at
    most one copy of an expert per GPU; with ``keep_groups``, groups are first packed onto nodes with EPLB's
    balanced packing (:func:`solvers.eplb.balanced_packing`) and each node is planned on its own."""
    load = np.asarray(load, dtype=np.float64)
    L, E = load.shape
    if not layout.keep_groups:
        r = _water_fill(load, layout.num_slots, layout.cap)
        return _pack(load, r, layout.num_gpus, layout.spg)
    from solvers.eplb import balanced_packing

    N, grp = layout.num_nodes, layout.num_groups
    gs = E // grp
    gpack, grank = balanced_packing(load.reshape(L, grp, gs).sum(axis=-1), N)  # [L, grp]
    # experts of node m, groups in packing order: [L, N, E / N] global ids
    node_experts = np.empty((L, N, E // N), dtype=np.int64)
    per_node = grp // N
    for l in range(L):
        for g in range(grp):
            m, k = gpack[l, g], grank[l, g]
            node_experts[l, m, k * gs:(k + 1) * gs] = np.arange(g * gs, (g + 1) * gs)
    assert per_node * gs == E // N
    rows = np.take_along_axis(load, node_experts.reshape(L, E), axis=1).reshape(L * N, E // N)
    r = _water_fill(rows, layout.num_slots // N, layout.cap)
    local = _pack(rows, r, layout.gpn, layout.spg)  # [L * N, S / N]
    return np.take_along_axis(node_experts.reshape(L * N, E // N), local, axis=1).reshape(L, layout.num_slots)


def relabel(X: np.ndarray, old: np.ndarray, num_experts: int, layout: Layout) -> np.ndarray:
    """``X`` with its GPUs renumbered per layer (and, with ``keep_groups``, its nodes first) so that as many of its
    (expert, GPU) copies as possible are already where ``old`` has them; the balance is unchanged. One linear
    assignment per layer (:func:`scipy.optimize.linear_sum_assignment`)."""
    from scipy.optimize import linear_sum_assignment

    L, S = X.shape
    G, spg, gpn = layout.num_gpus, layout.spg, layout.gpn
    hn = _holds(X, num_experts, layout).astype(np.float64)
    ho = _holds(old, num_experts, layout).astype(np.float64)
    out = np.empty_like(X)
    grid = X.reshape(L, G, spg)
    for l in range(L):
        overlap = hn[l].T @ ho[l]  # [G new, G old]
        perm = np.empty(G, dtype=np.int64)
        if layout.keep_groups and layout.num_nodes > 1:
            N = layout.num_nodes
            node_ov = overlap.reshape(N, gpn, N, gpn).sum(axis=(1, 3))
            rn, cn = linear_sum_assignment(-node_ov)
            for a, b in zip(rn, cn):
                sub = overlap[a * gpn:(a + 1) * gpn, b * gpn:(b + 1) * gpn]
                ri, ci = linear_sum_assignment(-sub)
                perm[a * gpn + ri] = b * gpn + ci
        else:
            ri, ci = linear_sum_assignment(-overlap)
            perm[ri] = ci
        out[l].reshape(G, spg)[perm] = grid[l]
    # inside a GPU, keep each expert in the slot the old placement had it in when the GPU holds the same experts
    # (cosmetic: stacks copy locally), so an unchanged GPU keeps an identical row
    mine, before = out.reshape(L, G, spg), old.reshape(L, G, spg)
    same = (np.sort(mine, axis=-1) == np.sort(before, axis=-1)).all(axis=-1)  # [L, G]
    mine[same] = before[same]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Incremental search
# ----------------------------------------------------------------------------------------------------------------


class _Search:
    """Search state over all layers: the placement, its replica counts, holdings and per-profile GPU loads."""

    def __init__(self, X: np.ndarray, P: np.ndarray, w: np.ndarray, layout: Layout, old: np.ndarray | None,
                 group_node: np.ndarray | None):
        self.X = X.copy()
        self.P, self.w, self.layout = P, w, layout
        self.N, self.L, self.E = P.shape
        self.gos = layout.gpu_of_slot()
        self.node = layout.node_of_gpu()
        self.old_has = None if old is None else _holds(old, self.E, layout)
        self.group_node = group_node  # [L, num_groups] node of each group (keep_groups), else None
        self.Pm = np.einsum("n,nle->le", w, P)
        self.refresh(np.arange(self.L))

    def refresh(self, ls: np.ndarray) -> None:
        lay = self.layout
        if not hasattr(self, "r"):
            self.r = np.zeros((self.L, self.E), dtype=np.int64)
            self.has = np.zeros((self.L, self.E, lay.num_gpus), dtype=bool)
            self.gl = np.zeros((self.N, self.L, lay.num_gpus))
            self.piece = np.zeros((self.N, self.L, lay.num_slots))
        X = self.X[ls]
        self.r[ls] = _replicas(X, self.E)
        self.has[ls] = _holds(X, self.E, lay)
        rows = ls[:, None]
        self.piece[:, ls] = self.P[:, rows, X] / self.r[rows, X][None]
        self.gl[:, ls] = self.piece[:, ls].reshape(self.N, len(ls), lay.num_gpus, lay.spg).sum(axis=-1)

    def objective(self) -> np.ndarray:
        """``[L]`` expected busiest-GPU load over the profiles."""
        return np.einsum("n,nl->l", self.w, self.gl.max(axis=-1))

    def moved(self) -> np.ndarray:
        if self.old_has is None:
            return np.zeros(self.L, dtype=np.int64)
        return (self.has & ~self.old_has).sum(axis=(1, 2))

    def best_moves(self, ls: np.ndarray, lam: float, budget: float, keep: int = 3):
        """The best move of each layer in ``ls [L']``: ``(value, moved-copies delta, kind (0 swap, 1 re-target), a,
        b)``, each ``[L']``; for a swap b is the other slot, for a re-target the new expert; value <= 0 where none
        helps.

        Candidates are screened on the weighted mean profile (one profile: cheap), then the ``keep`` best of each
        kind per layer are scored exactly on every profile; the value returned is the exact one.
        """
        lay = self.layout
        L, G, spg, S, E = len(ls), lay.num_gpus, lay.spg, lay.num_slots, self.E
        li = np.arange(L)
        X, has = self.X[ls], self.has[ls]
        gm = np.einsum("n,nlg->lg", self.w, self.gl[:, ls])  # [L, G] mean-profile GPU loads
        pm = np.einsum("n,nls->ls", self.w, self.piece[:, ls])  # [L, S]
        node = self.node
        h = np.argmax(gm, axis=1)  # [L] busiest GPU
        old_has = None if self.old_has is None else self.old_has[ls]

        def notold(l, e, g):
            if old_has is None:
                return np.zeros(np.broadcast(l, e, g).shape)
            return (~old_has[l, e, g]).astype(np.float64)

        # the largest mean-profile load outside two GPUs, from the three largest
        k3 = min(3, G)
        top = _smallest(-gm, k3)
        topv = np.take_along_axis(gm, top, axis=1)
        if k3 < 3:
            top = np.pad(top, ((0, 0), (0, 3 - k3)), constant_values=-1)
            topv = np.pad(topv, ((0, 0), (0, 3 - k3)), constant_values=-np.inf)

        def max_outside(g1, g2):  # g1, g2 broadcast against [L, ...]
            sh = (L,) + (1,) * (np.ndim(g2) - 1)
            t = [top[:, j].reshape(sh) for j in range(3)]
            v = [topv[:, j].reshape(sh) for j in range(3)]
            ok0, ok1 = (t[0] != g1) & (t[0] != g2), (t[1] != g1) & (t[1] != g2)
            return np.where(ok0, v[0], np.where(ok1, v[1], v[2]))

        kinds = []  # per kind: (delta-builder inputs, screened value [L, C], dm [L, C], a [L, C], b [L, C])
        cur = gm.max(axis=1)
        # swaps: a copy on the busiest GPU with a copy on one of the coolest eligible GPUs
        if G > 1:
            elig = node[None, :] == node[h][:, None] if lay.keep_groups else np.ones((L, G), dtype=bool)
            elig[li, h] = False
            C = int(min(16, elig.sum(axis=1).min()))
            if C > 0:
                cool = _smallest(np.where(elig, gm, np.inf), C)  # [L, C]
                B = (cool[:, :, None] * spg + np.arange(spg)).reshape(L, -1)  # [L, C * spg]
                A = h[:, None] * spg + np.arange(spg)[None, :]  # [L, spg]
                ea, eb = X[li[:, None], A], X[li[:, None], B]
                pa, pb = pm[li[:, None], A], pm[li[:, None], B]
                gb = self.gos[B]  # [L, Bn]
                new_h = gm[li, h][:, None, None] - pa[:, :, None] + pb[:, None, :]
                new_g = gm[li[:, None], gb][:, None, :] - pb[:, None, :] + pa[:, :, None]
                new = np.maximum(np.maximum(max_outside(h[:, None, None], gb[:, None, :]), new_h), new_g)
                gain = cur[:, None, None] - new
                ok = (ea[:, :, None] != eb[:, None, :]) & ~has[li[:, None, None], ea[:, :, None], gb[:, None, :]]
                ok &= ~has[li[:, None], eb, h[:, None]][:, None, :]
                l3, l2 = li[:, None, None], li[:, None]
                dm = (notold(l3, ea[:, :, None], gb[:, None, :]) + notold(l2, eb, h[:, None])[:, None, :]
                      - notold(l2, ea, h[:, None])[:, :, None] - notold(l2, eb, gb)[:, None, :])
                ok &= dm <= budget
                val = np.where(ok, gain - lam * dm, -np.inf).reshape(L, -1)
                Bn = B.shape[1]
                aa = np.broadcast_to(A[:, :, None], (L, spg, Bn)).reshape(L, -1)
                bb = np.broadcast_to(B[:, None, :], (L, spg, Bn)).reshape(L, -1)
                kinds.append((0, val, dm.reshape(L, -1), aa, bb))
        # re-targets: a redundant copy becomes a copy of another expert
        r = self.r[ls]
        if S > E and lay.cap > 1:
            Pm = self.Pm[ls]
            rs = r[li[:, None], X]  # [L, S]
            drop = np.where(rs >= 2, Pm[li[:, None], X] / np.maximum(rs - 1, 1), np.inf)
            cand = _smallest(drop, min(4, S))
            A = np.concatenate([cand, h[:, None] * spg + np.arange(spg)[None, :]], axis=1)  # [L, Ma]
            hot = _smallest(-np.where(r < lay.cap, Pm / r, -np.inf), min(6, E))
            cold = _smallest(np.where(r < lay.cap, Pm / (r + 1), np.inf), min(2, E))
            F = np.concatenate([hot, cold], axis=1)  # [L, Kf]
            e, ga = X[li[:, None], A], self.gos[A]
            re, rf = r[li[:, None], e].astype(float), r[li[:, None], F].astype(float)
            new = self._retarget_loads(gm[None], Pm[None], has, li, e, ga, re, F, rf)[0]  # [L, Ma, Kf, G]
            gain = cur[:, None, None] - new.max(axis=-1)
            ok = (re >= 2)[:, :, None] & (e[:, :, None] != F[:, None, :]) & (rf < lay.cap)[:, None, :]
            ok &= ~has[li[:, None, None], F[:, None, :], ga[:, :, None]]
            if lay.keep_groups:
                fnode = self.group_node[ls[:, None], F // (E // lay.num_groups)]
                ok &= fnode[:, None, :] == node[ga][:, :, None]
            dm = notold(li[:, None, None], F[:, None, :], ga[:, :, None]) - notold(li[:, None], e, ga)[:, :, None]
            ok &= dm <= budget
            val = np.where(ok, gain - lam * dm, -np.inf).reshape(L, -1)
            Ma, Kf = A.shape[1], F.shape[1]
            aa = np.broadcast_to(A[:, :, None], (L, Ma, Kf)).reshape(L, -1)
            bb = np.broadcast_to(F[:, None, :], (L, Ma, Kf)).reshape(L, -1)
            kinds.append((1, val, dm.reshape(L, -1), aa, bb))

        best = (np.full(L, -np.inf), np.zeros(L), np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64),
                np.zeros(L, dtype=np.int64))
        if not kinds:
            return best
        # exact values of the best screened candidates on every profile
        glp = self.gl[:, ls]  # [N, L, G]
        cur_n = glp.max(axis=-1)  # [N, L]
        for kind, val, dm, aa, bb in kinds:
            k = min(keep, val.shape[1])
            idx = _smallest(-val, k)  # [L, k]
            sv = np.take_along_axis(val, idx, axis=1)
            a, b, d = (np.take_along_axis(x, idx, axis=1) for x in (aa, bb, dm))
            if kind == 0:
                ga, gb = self.gos[a], self.gos[b]
                pa = self.piece[:, ls[:, None], a]
                pb = self.piece[:, ls[:, None], b]
                new = np.repeat(glp[:, :, None, :], k, axis=2)  # [N, L, k, G]
                kk = np.arange(k)[None, :]
                new[:, li[:, None], kk, ga] += pb - pa  # ga != gb: one update per (layer, candidate) and GPU
                new[:, li[:, None], kk, gb] += pa - pb
            else:
                e, ga = X[li[:, None], a], self.gos[a]
                re, rf = r[li[:, None], e].astype(float), r[li[:, None], b].astype(float)
                new = self._retarget_loads(glp, self.P[:, ls], has, li, e, ga, re, b, rf, paired=True)
            exact = np.einsum("n,nlk->lk", self.w, cur_n[:, :, None] - new.max(axis=-1)) - lam * d
            exact = np.where(np.isfinite(sv), exact, -np.inf)
            j = np.argmax(exact, axis=1)
            v = exact[li, j]
            take = v > best[0]
            best = (np.where(take, v, best[0]), np.where(take, d[li, j], best[1]), np.where(take, kind, best[2]),
                    np.where(take, a[li, j], best[3]), np.where(take, b[li, j], best[4]))
        return best

    def _retarget_loads(self, gl, P, has, li, e, ga, re, F, rf, paired: bool = False):
        """GPU loads ``[N, L, Ma, Kf, G]`` after re-targeting the copy of expert ``e [L, Ma]`` on GPU ``ga`` to
        expert ``F [L, Kf]`` (``paired``: ``F [L, Ma]`` pairs with ``e``, giving ``[N, L, Ma, G]``), for loads
        ``gl [N, L, G]`` and counts ``P [N, L, E]``; ``re``, ``rf``: their copies now."""
        G = gl.shape[-1]
        oh = np.arange(G) == ga[..., None]  # [L, Ma, G]
        He = has[li[:, None], e] & ~oh  # the other holders of e
        Hf = has[li[:, None], F]  # [L, Kf, G]
        Pe = P[:, li[:, None], e]  # [N, L, Ma]
        Pf = P[:, li[:, None], F]
        inc = Pe / np.maximum(re - 1, 1) - Pe / re  # what each other holder of e gains
        base = gl[:, :, None, :] + inc[..., None] * He - (Pe / re)[..., None] * oh  # [N, L, Ma, G]
        dec = Pf / (rf + 1) - Pf / rf
        add = Pf / (rf + 1)
        if paired:
            return base + dec[..., None] * Hf + add[..., None] * oh
        return (base[:, :, :, None, :] + dec[:, :, None, :, None] * Hf[:, None, :, :]
                + add[:, :, None, :, None] * oh[:, :, None, :])


def _group_nodes(X: np.ndarray, num_experts: int, layout: Layout) -> np.ndarray | None:
    """``[L, num_groups]`` node of each expert group if ``X`` keeps every group on one node (whole groups, the same
    number per node), else None."""
    L = X.shape[0]
    gsz = num_experts // layout.num_groups
    nodes = layout.node_of_gpu()[layout.gpu_of_slot()][None, :].repeat(L, axis=0)  # [L, S]
    grp = X // gsz
    out = np.full((L, layout.num_groups), -1, dtype=np.int64)
    lay = np.broadcast_to(np.arange(L)[:, None], X.shape)
    out[lay, grp] = nodes
    lo = np.full_like(out, layout.num_nodes)
    np.minimum.at(lo, (lay, grp), nodes)
    if (out != lo).any() or (out < 0).any():
        return None
    per = np.stack([np.bincount(row, minlength=layout.num_nodes) for row in out])
    if (per != layout.num_groups // layout.num_nodes).any():
        return None
    return out


def improve(X: np.ndarray, profiles: np.ndarray, weights: np.ndarray, layout: Layout, old: np.ndarray | None = None,
            lam: float = 0.0, max_moves: int | None = None, max_rounds: int = 400) -> tuple[np.ndarray, dict]:
    """Local search from ``X [L, S]`` on ``profiles [N, L, E]`` (weights ``[N]``), vectorised over layers.

    Args:
        old: ``[L, S]`` the placement in service; a copy not in it costs ``lam`` (in units of the profiles'
            assignments), one moved back is refunded; None: moves are free.
        max_moves: the moved copies (against ``old``) never exceed this.
    Returns:
        the improved placement and ``{"rounds", "moves"}`` (moves: accepted search moves).
    """
    P = np.asarray(profiles, dtype=np.float64)
    group_node = _group_nodes(X, P.shape[2], layout) if layout.keep_groups else None
    if layout.keep_groups and group_node is None:
        raise SolverInputError("the start placement does not keep expert groups on nodes")
    st = _Search(X, P, np.asarray(weights, dtype=np.float64), layout, old, group_node)
    tol = 1e-9 * max(float(st.Pm.sum(axis=1).max()) / layout.num_gpus, 1e-300)
    moved = int(st.moved().sum())
    limit = np.inf if max_moves is None or old is None else float(max_moves)
    rounds = accepted = 0
    lidx = np.arange(st.L)
    active = lidx  # layers whose placement changed in the last round (the others have no improving move left)
    for rounds in range(1, max_rounds + 1):
        val, dm, kind, a, b = st.best_moves(active, lam, limit - moved)
        changed, skipped = [], []
        for i in np.argsort(-val, kind="stable"):
            if not val[i] > tol:
                break
            if moved + dm[i] > limit:
                skipped.append(active[i])  # may fit after a later move gives copies back
                continue
            l = active[i]
            if kind[i] == 0:
                st.X[l, a[i]], st.X[l, b[i]] = st.X[l, b[i]], st.X[l, a[i]]
            else:
                st.X[l, a[i]] = b[i]
            moved += int(dm[i])
            changed.append(l)
        if not changed:
            break
        accepted += len(changed)
        st.refresh(np.sort(np.asarray(changed)))
        active = np.sort(np.asarray(changed + skipped))
    return st.X, {"rounds": rounds, "moves": accepted}


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------


def _dedupe(old: np.ndarray, load: np.ndarray, layout: Layout) -> tuple[np.ndarray, int]:
    """``old`` with every second copy of an expert on one GPU re-targeted to the expert with the largest load per
    copy that the GPU lacks (EPLB can leave such copies); returns the placement and the copies changed."""
    X = old.copy()
    L, S = X.shape
    E = load.shape[1]
    spg, cap = layout.spg, layout.cap
    changed = 0
    srt = np.sort(X.reshape(L, layout.num_gpus, spg), axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]).any(axis=-1)  # [L, G]
    for l, g in zip(*np.nonzero(dup)):
        grid = X[l].reshape(layout.num_gpus, spg)
        for j in range(1, spg):
            e = grid[g, j]
            if (grid[g, :j] == e).any():
                r = np.bincount(X[l], minlength=E)
                per = np.where((r < cap) & ~np.isin(np.arange(E), grid[g]), load[l] / np.maximum(r, 1), -np.inf)
                if layout.keep_groups:
                    gsz = E // layout.num_groups
                    same = layout.node_of_gpu()[layout.gpu_of_slot()] == g // layout.gpn
                    per = np.where(np.isin(np.arange(E) // gsz, np.unique(X[l][same] // gsz)), per, -np.inf)
                grid[g, j] = int(np.argmax(per))
                changed += 1
    return X, changed


def rebalance(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
              old_phy2log: np.ndarray | None = None, *, history: int = 4, max_moves: int | None = None,
              move_cost: float | None = None, horizon: float = 1.0, keep_groups_on_nodes: bool = False,
              cost: CostModel | None = None, intra_node_bandwidth: float = 450e9, inter_node_bandwidth: float = 50e9,
              change_factor: float = 3.0, max_rounds: int = 400, resamples: int = 4) -> tuple[np.ndarray, dict]:
    """The next placement (see the module docstring).

    Args:
        weight: ``[N, L, E]`` per-expert token-expert counts of consecutive windows, newest last (``[L, E]``: one).
        num_replicas: S slots; num_groups: expert groups; num_nodes, num_gpus: the EP group's nodes and GPUs.
        old_phy2log: ``[L, S]`` the placement in service, or None (then the fresh plan is returned).
        history: windows kept as profiles (at most); max_moves: most expert copies moved (None: no limit);
        move_cost: seconds per moved copy (default ``cost.expert_bytes / intra_node_bandwidth``; 0: moves are free);
        horizon: traffic the placement serves before the next rebalance, in windows (vLLM: ``step_interval /
        window_size``); keep_groups_on_nodes: EPLB's hierarchical rule; cost: sizes for ``beta`` and the default
        move cost (default :class:`solvers.cost.CostModel`); change_factor: see :func:`select_windows`.
    Returns:
        ``phy2log [L, S]`` and statistics: ``windows``, ``change``, ``moved`` (copies), ``choice`` ("kept",
        "incremental" or "fresh"), ``predicted_load`` (old and new expected busiest-GPU load summed over layers,
        in the newest window's assignments), ``lam`` (the move cost in those units).
    """
    from solvers._blas import blas_threads

    with blas_threads(1):  # many small products: one thread is fastest (solvers/_blas.py) and the budget is one core
        return _rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log, history, max_moves,
                          move_cost, horizon, keep_groups_on_nodes, cost, intra_node_bandwidth, inter_node_bandwidth,
                          change_factor, max_rounds, resamples)


def _rebalance(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log, history, max_moves, move_cost,
               horizon, keep_groups_on_nodes, cost, intra_node_bandwidth, inter_node_bandwidth, change_factor,
               max_rounds, resamples):
    W = np.asarray(weight, dtype=np.float64)
    if W.ndim == 2:
        W = W[None]
    _, L, E = W.shape
    layout = Layout(E, int(num_replicas), int(num_gpus), int(num_nodes), int(num_groups), bool(keep_groups_on_nodes))
    P, info = select_windows(W, history, change_factor)
    if resamples:  # the next window differs by sampling noise: plan against Poisson draws around the pooled counts
        rng = np.random.default_rng(0)  # fixed: every rank of a stack computes the same map
        P = np.concatenate([P, rng.poisson(P.mean(axis=0), size=(int(resamples),) + P.shape[1:]).astype(np.float64)])
    w = np.full(P.shape[0], 1.0 / P.shape[0])
    cost = cost or CostModel()
    beta = seconds_per_assignment(cost, layout.num_gpus, layout.gpn, intra_node_bandwidth, inter_node_bandwidth)
    mc = cost.expert_bytes / intra_node_bandwidth if move_cost is None else float(move_cost)
    lam = mc / (beta * max(float(horizon), 1e-300))
    Pm = P.mean(axis=0)

    def score(X):
        return float(np.einsum("n,nl->", w, predicted_load(X, P, layout).max(axis=-1)))

    start = fresh_plan(Pm, layout)
    if old_phy2log is None:
        fresh, _ = improve(start, P, w, layout, max_rounds=max_rounds)
        return fresh, {**info, "moved": 0, "choice": "fresh", "predicted_load": [None, score(fresh)], "lam": lam}
    old = np.asarray(old_phy2log, dtype=np.int64)
    base, repaired = _dedupe(old, Pm, layout)
    budget = None if max_moves is None else max(int(max_moves), repaired)
    candidates = []
    if not layout.keep_groups or _group_nodes(base, E, layout) is not None:
        inc, _ = improve(base, P, w, layout, old=old, lam=lam, max_moves=budget, max_rounds=max_rounds)
        candidates.append(("incremental", inc))
    # the fresh plan, relabelled onto the map in service, is a candidate when it fits the move limit; its local
    # search is skipped when even its start moves more than twice that limit (the search keeps most copies)
    if budget is None or not candidates or \
            moved_copies(relabel(start, old, E, layout), old, E, layout).sum() <= 2 * budget:
        fresh, _ = improve(start, P, w, layout, max_rounds=max_rounds)
        rel = relabel(fresh, old, E, layout)
        if budget is None or moved_copies(rel, old, E, layout).sum() <= budget or not candidates:
            candidates.append(("fresh", rel))
    best = None
    for name, X in candidates:
        m = int(moved_copies(X, old, E, layout).sum())
        phi = score(X) + lam * m
        if best is None or phi < best[0] - 1e-12 * abs(phi):
            best = (phi, name, X, m)
    _, name, X, m = best
    if m == 0:
        name = "kept"
    return X, {**info, "moved": m, "choice": name, "predicted_load": [score(old), score(X)], "lam": lam}
