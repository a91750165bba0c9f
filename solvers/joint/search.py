"""Local search on the exact counts objective (:func:`local_search`): swaps of two pieces between GPUs and replica
re-targets, screened towards each layer's slowest GPU and the experts' attraction, evaluated exactly by
:meth:`solvers.joint.state.State.evaluate_move`."""

from __future__ import annotations

import time

import numpy as np

from solvers.joint.state import State


def local_search(state: State, deadline: float, rng: np.random.Generator, max_passes: int = 50,
                 candidates: int = 12, say=None, layers: list[int] | None = None) -> int:
    """Improve ``state`` in place (every layer, or only ``layers``); returns the number of accepted moves. When a
    pass finds nothing, the screened neighbourhood widens (twice the candidates, up to 8x) before the search
    stops."""
    d = state.d
    m = state.m
    pool = np.arange(d.L) if layers is None else np.asarray(layers, dtype=np.int64)
    accepted = 0
    widest = 8 * candidates
    for p in range(max_passes):
        gained = 0
        order = rng.permutation(pool)
        for l in order:
            if time.perf_counter() > deadline:
                state.resync()
                return accepted
            for _ in range(m * 2):
                mv = _best_move(state, l, rng, candidates)
                if mv is None:
                    break
                state.apply(mv)
                accepted += 1
                gained += 1
        state.resync()
        after = state.objective()
        if say:
            say(f"local search pass {p + 1}: objective {after:.6g} ({gained} moves, {candidates} candidates)")
        if gained == 0:
            if candidates >= widest:
                break
            candidates *= 2
    return accepted


def descend_starts(data, candidates: list[tuple[str, np.ndarray]], deadline: float, rng: np.random.Generator,
                   search: bool = True, say=None):
    """Descend from several starts and keep the best: ``(state, name picked, info, moves accepted)``.

    Each start ``(name, X [L, S])`` is scored from scratch; the column construction goes first (it trades a little
    balance for co-activation that the local search turns into time), then the others by objective, the bare
    balanced start only when nothing else was built (or a current plan is given). Another start is descended only
    while a descent as long as the first still fits before ``deadline``. ``info``: ``built`` (objective of each
    start), ``descended`` (objective after each descent) and ``seconds`` (perf_counter when the starts were
    scored)."""
    scored, built = [], {}
    for name, X in candidates:
        built[name] = State(data, X)  # scored from scratch, then reused by the descent from this start
        v = built[name].objective()
        scored.append((v, name, X))
        if say:
            say(f"construction {name}: objective {v:.6g}")
    order = sorted(scored, key=lambda c: (c[1] != "columns" or data.current is not None, c[0]))
    if len(order) > 1:
        order = [c for c in order if c[1] != "balanced" or data.current is not None] or order
    info = {"built": {name: v for v, name, _ in scored}, "seconds": time.perf_counter(), "descended": {}}
    state, picked, accepted = None, None, 0
    built = {name: built[name] for _, name, _ in (order if search else order[:1])}  # drop states never descended
    first_secs = None
    for _, name, _ in (order if search else order[:1]):
        # another start only when a descent as long as the first still fits
        if state is not None and deadline - time.perf_counter() < 1.2 * first_secs:
            break
        t_ls = time.perf_counter()
        st = built.pop(name)
        moves = local_search(st, deadline, rng, say=say) if search else 0
        if first_secs is None:
            first_secs = time.perf_counter() - t_ls
        info["descended"][name] = st.objective()
        if state is None or info["descended"][name] < state.objective():
            state, picked = st, name
        accepted += moves
    built.clear()
    return state, picked, info, accepted


def _random_swap(state: State, X: np.ndarray, x: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """A swap of a random piece with the piece closest in load ``x [S]`` on another random GPU, in layer row
    ``X [S]``."""
    gpu = state.gpu
    s1 = int(rng.integers(state.S))
    g2 = int(rng.integers(state.G - 1))
    g2 = g2 + (g2 >= gpu[s1])
    cand = np.nonzero(gpu == g2)[0]
    s2 = int(cand[np.argmin(np.abs(x[cand] - x[s1]))])
    return [(s1, int(X[s2])), (s2, int(X[s1]))]


def _weights(state: State) -> np.ndarray:
    """``[N]`` how much each profile counts in the objective (mean, or the worst profile)."""
    N = state.d.N
    if not state.d.worst:
        return np.full(N, 1.0 / N)
    w = np.zeros(N)
    w[int(np.argmax(state.profile_totals()))] = 1.0
    return w


def _attraction(state: State, l: int) -> np.ndarray | None:
    """``[E, G]`` how strongly expert e is tied to the experts on GPU g: adjacent-layer pair mass that would be
    local (coherent) or co-activation information with the GPU's experts (standard), in comparable units."""
    d = state.d
    A = None
    if state.use_T:
        A = np.zeros((d.E, state.G))
        if l >= 1:
            A += state.Vin[l].T
        if l + 1 < d.L:
            A += state.Vout[l]
        A += state.QP[l] + state.QtP[l]
    elif state.KP is not None:
        A = state.KP[l] * d.tokens[l]
    if state.H is not None:  # affinity_weight: k x k pairs with the neighbours' GPUs, in token copies
        K = np.zeros((d.E, state.G))
        if l >= 1:
            K += d.aff[l - 1].T @ state.H[l - 1]
        if l + 1 < d.L:
            K += d.aff[l] @ state.H[l + 1]
        K *= d.aff_cost * d.topology.intra_node_bandwidth / d.cost.token_bytes
        A = K if A is None else A + K
    return A


def _best_move(state: State, l: int, rng: np.random.Generator, candidates: int):
    """The best improving move at layer l among screened swaps and replica re-targets (or None)."""
    d = state.d
    G, m, S = state.G, state.m, state.S
    gpu = state.gpu
    w = _weights(state)
    tg = np.tensordot(w, state.tg[l], axes=1)  # [G]
    gstar = int(np.argmax(tg))
    X = state.X[l]
    r = state.r[l]
    x = np.tensordot(w, d.loads[:, l, :], axes=1)[X] / r[X]  # piece loads [S]
    Lg = np.tensordot(w, state.Lg[l], axes=1)
    kappa = tg[gstar] / max(Lg[gstar], 1e-300)  # seconds per unit load on the slowest GPU
    A = np.nonzero(gpu == gstar)[0]
    Bi = np.nonzero(gpu != gstar)[0]
    dl = x[A][:, None] - x[Bi][None, :]
    h = gpu[Bi]
    new_partner = tg[h][None, :] + kappa * dl
    drop = np.minimum(kappa * dl, tg[gstar] - new_partner)
    held = state.P[l] > 0
    legal = (dl > 0) & ~held[X[A]][:, h] & ~held[X[Bi], gstar][None, :]
    score = np.where(legal, drop, -np.inf)
    moves: list[list[tuple[int, int]]] = []
    flat = score.ravel()
    k = min(candidates, int(np.isfinite(flat).sum()))
    if k > 0:
        top = np.argpartition(-flat, k - 1)[:k]
        for t in top:
            i, j = divmod(int(t), len(Bi))
            s1, s2 = int(A[i]), int(Bi[j])
            moves.append([(s1, int(X[s2])), (s2, int(X[s1]))])
    # affinity / co-activation moves anywhere (plateaus): an expert drawn by how much it would gain on its most
    # attractive GPU, swapped there with the piece of that GPU that is least attached and closest in load
    attract = _attraction(state, l)  # [E, G] or None
    if attract is not None:
        here = attract[X, gpu]  # [S] attraction of each piece to its own GPU
        best_g = np.argmax(np.where(held[X], -np.inf, attract[X]), axis=1)  # [S]
        gain = attract[X, best_g] - here
        pos = np.nonzero(gain > 0)[0]
        if pos.size:
            p = gain[pos] / gain[pos].sum()
            picks = rng.choice(pos, size=min(pos.size, max(2, candidates // 3)), replace=False, p=p)
            for s1 in picks:
                g2 = int(best_g[s1])
                cand = np.nonzero((gpu == g2) & ~held[X][:, gpu[s1]])[0]
                if cand.size == 0:
                    continue
                loss = attract[X[cand], g2] - attract[X[cand], gpu[s1]]
                mism = np.abs(x[cand] - x[s1]) / max(float(x.mean()), 1e-300)
                score = loss / max(float(gain[s1]), 1e-300) + mism
                s2 = int(cand[np.argmin(score)])
                moves.append([(int(s1), int(X[s2])), (s2, int(X[s1]))])
    for _ in range(2):
        moves.append(_random_swap(state, X, x, rng))
    # replica re-targets: give a spare replica (r >= 2) to the heaviest piece on the slowest GPU
    if S > d.E:
        hot = int(X[A[np.argmax(x[A])]])
        if r[hot] < G:
            spare = np.nonzero((r[X] >= 2) & (X != hot) & ~held[hot][gpu])[0]
            if spare.size:
                loss = d.load[l][X[spare]] / (r[X[spare]] - 1) - d.load[l][X[spare]] / r[X[spare]]
                for s in spare[np.argsort(loss)[:max(2, candidates // 3)]]:
                    moves.append([(int(s), hot)])
        # and take a replica away from the slowest GPU, giving it to the heaviest piece elsewhere
        mine = A[r[X[A]] >= 2]
        if mine.size:
            s = int(mine[np.argmin(x[mine])])
            others = np.argsort(-d.load[l] / (r + 1))[:4]
            for e in others:
                if e != X[s] and not held[e, gstar] and r[e] < G:
                    moves.append([(s, int(e))])
    base = state.objective()
    tol = 1e-12 * max(abs(base), 1e-300)
    sec_tol = 1e-9 * max(float((state.tg[l] ** 2).sum()), 1e-300)
    best, best_key = None, (-tol, -sec_tol)
    for mv in moves:
        if mv[0][1] == X[mv[0][0]]:
            continue
        res = state.evaluate_move(l, mv)
        if res is None:
            continue
        obj, dsec, payload = res
        dobj = obj - base
        if dobj > tol:
            continue
        key = (min(dobj, 0.0) if dobj < -tol else 0.0, dsec)
        if key[0] < best_key[0] - tol or (abs(key[0] - best_key[0]) <= tol and key[1] < best_key[1]):
            best, best_key = payload, key
    return best
