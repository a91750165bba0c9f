"""The joint planner's incremental state: a placement plus the cached products that make a move's exact effect on
the counts objective cheap to compute (:class:`State`)."""

from __future__ import annotations

import numpy as np

from solvers.cost import (coherent_comm_seconds, comm_seconds, covered, dispatch_matrix, effective_share,
                          needs_node_distinct, node_share, position_mass, replay_positions, roofline_compute,
                          standard_comm_seconds, standard_distinct, token_cover)
from solvers.joint.data import JointData
from solvers.objective import dispatch_rows, dispatch_table


def _block(M: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``M[idx][:, idx]`` of a square matrix."""
    return M.take(idx, 0).take(idx, 1)


class State:
    """A placement plus the cached products that make a move's exact effect cheap to compute.

    Arrays (l = layer): X ``[L, S]`` slots, r ``[L, E]`` replicas, P ``[L, E, G]`` even-split shares (1/r per
    replica), W ``[L, E, G]`` served shares (what load, duplicates and traffic use: P under the standard
    dataflow; under the coherent one the position-aware shares of :func:`solvers.cost.effective_share`, where a
    token uses the replica the dispatch rule picks for its position), Lg ``[L, N, G]`` GPU load per profile,
    CP ``[L, E, G]`` = C W, KP = Kw W, dup / logp0 ``[L, G]`` duplicate-copy terms; coherent dataflow:
    tab ``[L, E, G]`` dispatch table (:func:`solvers.objective.dispatch_rows`), Vin ``[L, G, E]`` =
    W_{l-1}^T T_{l-1} (positions of layer l's tokens: where the previous anchors are served), Vout
    ``[L, E, G]`` = T_l P_{l+1} (search guidance only), M ``[L, G, G]`` = position-to-serving mass into l
    (:func:`solvers.cost.dispatch_matrix`), QP / QtP ``[L, E, G]`` = Q W / Q^T W, A ``[L, G, G]`` = W^T Q W
    (anchor GPU, serving GPU) within l; tg ``[L, N, G]`` per-GPU seconds, moved ``[L]`` migrated copies. With
    token routes (``data.ids``) the distinct tokens per GPU are counted on them instead of the pairwise estimate:
    z int8 / q ``[L, G, T]`` (how token t's experts cover GPU g, :func:`solvers.cost.token_cover`) and Dt
    ``[L, G]`` distinct tokens in load units; a move updates z and q of the moved experts' tokens on the GPUs
    whose shares changed (one count and one factor per token and moved expert).

    A move at layer l changes P, tab and W at the moved experts' rows and every quantity of layer l; at layer
    l+1 it changes the positions (Vin), hence M and the W rows of replicated experts (and what depends on them),
    exactly. Those W rows move the positions of layer l+2 and so on: a move evaluates layers l and l+1 and marks
    l+2 stale; :meth:`resync` rebuilds stale layers in order (the local search does so after every pass, the
    iterated search after every kick), so the objective it compares is exact. With replayed token positions
    (``data.pos_ids``, tokpos ``[L, T']``) layer l+1 is evaluated from the served shares as above and marked stale:
    :meth:`resync` replays the positions from there and rebuilds every later layer. With token routes the distinct
    tokens of layer l+1 follow its served-share change in proportion (D/load per GPU) and the layer is marked
    stale too (recounted on the tokens by :meth:`resync`).
    """

    def __init__(self, data: JointData, X: np.ndarray):
        self.d = d = data
        topo = d.topology
        self.G, self.m, self.S = topo.num_gpus, topo.slots_per_gpu, topo.num_slots
        self.gpu = topo.gpu_of_slot()
        self.node = topo.node_of_gpu()
        self.alpha = d.cost.seconds_per_assignment
        self.B = d.cost.token_bytes
        L, E, G = d.L, d.E, self.G
        self.X = X.astype(np.int64).copy()
        self.P = np.zeros((L, E, G))
        self.r = np.zeros((L, E), dtype=np.int64)
        for l in range(L):
            np.add.at(self.P[l], (self.X[l], self.gpu), 1.0)
        self.r = self.P.sum(axis=2).astype(np.int64)
        self.P /= np.maximum(self.r, 1)[:, :, None]
        self.use_T = d.coherent and d.T is not None
        self.Vin = np.zeros((L, G, E)) if self.use_T else None
        self.Vout = np.zeros((L, E, G)) if self.use_T else None
        self.M = np.zeros((L, G, G)) if self.use_T else None
        self.tab = None
        self.W = self.P
        self.tokpos = None  # int [L, T'] replayed token positions (data.pos_ids), or None
        if self.use_T:
            self.tab = dispatch_table(self.X, E, topo)
            if d.pos_ids is not None:
                self.tokpos = replay_positions(self.tab, d.pos_ids)
            self.W = np.empty_like(self.P)
            self.W[0] = effective_share(self.P[0], self.tab[0], None)
            for l in range(1, L):  # positions of layer l: where the previous layer's anchors are served
                self.Vin[l] = self._positions(l)
                self.M[l] = dispatch_matrix(self.Vin[l], self.tab[l])
                self.W[l] = effective_share(self.P[l], self.tab[l], self.Vin[l])
            for l in range(L - 1):
                self.Vout[l] = d.T[l] @ self.P[l + 1]
        self.Lg = np.empty((L, d.N, G))
        self.R = self.steps = None  # the roofline's expected weight reads [L, N, G] and forward steps [L, N]
        if d.cost.tokens_per_gpu is not None:
            self.R = np.empty((L, d.N, G))
            self.steps = np.maximum(d.tokens[:, None] * d.scale.T, 1e-300) / (d.cost.tokens_per_gpu * G)
        self.tokd = d.ids is not None
        self.z = self.q = self.Dt = None
        self.stale = np.zeros(L, dtype=bool)
        self.by_node = needs_node_distinct(d.cost) and not d.coherent  # deepep-normal prices tokens per node
        self.zN = self.qN = self.DtN = None
        if self.tokd:
            self.z = np.empty((L, G, d.ids.shape[1]), dtype=np.int8)  # GPU-major: a GPU's tokens are contiguous
            self.q = np.empty((L, G, d.ids.shape[1]))
            self.Dt = np.empty((L, G))
            if self.by_node:
                Nn = d.topology.num_nodes
                self.zN = np.empty((L, Nn, d.ids.shape[1]), dtype=np.int8)
                self.qN = np.empty((L, Nn, d.ids.shape[1]))
                self.DtN = np.empty((L, Nn))
            self._slot = np.zeros(d.ids.shape[1], dtype=np.int64)  # scratch: a token's place in a list
            self._mark = np.zeros(d.ids.shape[1], dtype=np.int64)  # scratch: which list a token was seen in
            self._stamp = 0
            for l in range(L):
                self._recount(l)
        self.CP = self.KP = self.QP = self.QtP = self.A = None
        self.dup = np.zeros((L, G))
        self.logp0 = np.zeros((L, G))
        if d.C is not None and not self.tokd:
            self.CP, self.KP = np.empty((L, E, G)), np.empty((L, E, G))
        if self.use_T:
            self.QP, self.QtP, self.A = np.empty((L, E, G)), np.empty((L, E, G)), np.empty((L, G, G))
        for l in range(L):
            self._products(l)
        self.cur_mask = None
        self.moved = np.zeros(L)
        if d.current is not None:
            self.cur_mask = np.zeros((L, E, G), dtype=bool)
            for l in range(L):
                ok = d.current[l] >= 0
                self.cur_mask[l, d.current[l][ok], self.gpu[ok]] = True
            self.moved = ((self.P > 0) & ~self.cur_mask).sum(axis=(1, 2)).astype(float)
        self.tg = np.stack([self.layer_gpu_seconds(l) for l in range(L)])  # [L, N, G]
        self.tl = self.tg.max(axis=2)  # [L, N]
        self.H = self.local = None  # affinity_weight: GPU masks [L, E, G] and local k x k pair mass [L-1]
        if d.aff is not None:
            self.H = (self.P > 0).astype(np.float64)
            self.local = np.array([(d.aff[l] * ((self.H[l] @ self.H[l + 1].T) > 0)).sum() for l in range(L - 1)])

    def _reads(self, l: int, idx: np.ndarray, W_rows: np.ndarray) -> np.ndarray:
        """``[N, G]`` expected weight reads over the trace of experts ``idx`` with served shares ``W_rows [k, G]``
        (:func:`solvers.cost.expected_weight_reads`, per profile)."""
        steps = self.steps[l]  # [N]
        m = self.d.loads[:, l, idx] / steps[:, None]  # [N, k] copies per step
        return steps[:, None] * (-np.expm1(-m[:, :, None] * W_rows[None])).sum(axis=1)

    def _recount(self, l: int) -> None:
        z, q = token_cover(self.W[l], self.d.ids[l])
        self.z[l], self.q[l] = z.T, q.T
        self.Dt[l] = self.d.tok_factor[l] * covered(self.z[l], self.q[l]).sum(axis=1)
        if self.by_node:
            z, q = token_cover(node_share(self.W[l], self.d.topology), self.d.ids[l])
            self.zN[l], self.qN[l] = z.T, q.T
            self.DtN[l] = self.d.tok_factor[l] * covered(self.zN[l], self.qN[l]).sum(axis=1)

    def _positions(self, l: int) -> np.ndarray:
        """``[G, E]`` where layer l's token-expert assignments sit (l >= 1): replayed on the tokens, or the previous
        anchors spread by their served shares."""
        d = self.d
        if self.tokpos is not None:
            return position_mass(self.tokpos[l], d.pos_ids[l], d.E, self.G, d.pos_factor[l])
        return self.W[l - 1].T @ d.T[l - 1]

    def _products(self, l: int) -> None:
        """Layer l's quantities that follow from its served shares W[l]: GPU loads, duplicate-copy terms, anchor
        products, weight reads (from scratch; moves update them incrementally)."""
        d = self.d
        W = self.W[l]
        self.Lg[l] = d.loads[:, l, :] @ W
        if self.R is not None:
            self.R[l] = self._reads(l, np.arange(d.E), W)
        if self.CP is not None:
            self.CP[l] = d.C[l] @ W
            self.dup[l] = 0.5 * (W * self.CP[l]).sum(axis=0)
            self.KP[l] = d.Kw[l] @ W
            self.logp0[l] = d.U[l] @ W + 0.5 * (W * self.KP[l]).sum(axis=0)
        if self.use_T:
            self.QP[l] = d.Q[l] @ W
            self.QtP[l] = d.Q[l].T @ W
            self.A[l] = W.T @ self.QP[l]

    def _rebuild(self, l: int) -> bool:
        """Recompute layer l from its placement and the previous layer's served shares (positions, served shares,
        loads, duplicate terms, anchor mass, distinct tokens, GPU seconds); True if its served shares changed."""
        d = self.d
        changed = False
        if self.use_T:
            if l >= 1:
                self.Vin[l] = self._positions(l)
                self.M[l] = dispatch_matrix(self.Vin[l], self.tab[l])
            W_l = effective_share(self.P[l], self.tab[l], self.Vin[l] if l >= 1 else None)
            changed = not np.allclose(W_l, self.W[l], rtol=0.0, atol=1e-12)
            self.W[l] = W_l
        self._products(l)
        if self.tokd:
            self._recount(l)
        self.tg[l] = self.layer_gpu_seconds(l)
        self.tl[l] = self.tg[l].max(axis=1)
        return changed

    def resync(self) -> None:
        """Make stale layers exact again, in layer order: a layer whose served shares change moves the positions of
        the next one, which is rebuilt too (:meth:`_rebuild`)."""
        if self.tokpos is not None and self.stale.any():
            # replayed positions: every layer from the first stale one on, positions first
            l0 = int(np.argmax(self.stale))
            replay_positions(self.tab, self.d.pos_ids, start=max(l0 - 1, 0), pos=self.tokpos)
            self.stale[l0:] = True
        for l in range(self.d.L):
            if self.stale[l]:
                if self._rebuild(l) and l + 1 < self.d.L:
                    self.stale[l + 1] = True
                self.stale[l] = False

    def _token_delta(self, l: int, idx: np.ndarray, W_row: np.ndarray, dW: np.ndarray):
        """Change ``[G]`` of layer l's distinct tokens when experts ``idx`` take the served-share rows of ``W_row``
        (``dW [k, G]`` the change), and what :meth:`apply` stores: (tokens, GPUs, new z, new q)."""
        return self._cover_delta(l, idx, self.W[l], W_row, dW, self.z[l], self.q[l])

    def _node_delta(self, l: int, idx: np.ndarray, W_row: np.ndarray, dW: np.ndarray):
        """The same as :meth:`_token_delta` per node (the tokens reaching each node, deepep-normal)."""
        n = self.d.topology.gpus_per_node
        return self._cover_delta(l, idx, node_share(self.W[l], self.d.topology), node_share(W_row, self.d.topology),
                                 dW.reshape(dW.shape[0], -1, n).sum(axis=2), self.zN[l], self.qN[l])

    def _cover_delta(self, l: int, idx: np.ndarray, W_old: np.ndarray, W_row: np.ndarray, dW: np.ndarray,
                     z_l: np.ndarray, q_l: np.ndarray):
        """Change ``[C]`` of the tokens covering each of C columns (GPUs or nodes) when experts ``idx`` go from the
        share rows ``W_old [E, C]`` to ``W_row [E, C]`` (``dW [k, C]``), with the layer's cover ``z_l, q_l [C, T]``
        (:func:`solvers.cost.token_cover`); and what :meth:`apply` stores: (tokens, columns, new z, new q)."""
        d = self.d
        out = np.zeros(dW.shape[1])
        cols = np.nonzero(np.abs(dW).max(axis=0) > 0)[0]
        if not cols.size:
            return out, None
        order, start = d.tok_order[l], d.tok_start[l]
        lists = [order[start[e]:start[e + 1]] for e in idx]
        new_rows = W_row[idx][:, cols]
        old_rows = W_old[np.ix_(idx, cols)]
        # per moved expert: the change of its count (share 1) and of its factor 1 - share (share < 1)
        dz = (new_rows >= 1.0).astype(np.int64) - (old_rows >= 1.0)
        dlog = np.log(np.where(new_rows < 1.0, 1.0 - new_rows, 1.0)) - np.log(np.where(old_rows < 1.0, 1.0 - old_rows,
                                                                                       1.0))
        if len(lists) == 2 and not dlog.any():
            # two whole experts (a swap): the tokens of one only, of the other only, and of both, each group with
            # one count change; marks instead of a sort
            a, b = lists
            mark = self._mark
            self._stamp += 2
            mark[a] = self._stamp
            b_in_a = mark[b] == self._stamp
            mark[b] = self._stamp + 1
            a_only = a[mark[a] != self._stamp + 1]
            groups = [(a_only, dz[0]), (b[~b_in_a], dz[1]), (b[b_in_a], dz[0] + dz[1])]
            toks = np.concatenate([g for g, _ in groups])
            if not toks.size:
                return out, None
            change = np.concatenate([np.broadcast_to(v, (g.size, v.size)) for g, v in groups]).T  # [c, tokens]
            z_old = np.stack([z_l[g].take(toks) for g in cols])  # [c, tokens]
            q_old = np.stack([q_l[g].take(toks) for g in cols])
            z_new, q_new = (z_old + change).astype(np.int8), q_old
        else:
            pairs = np.concatenate(lists)
            if not pairs.size:
                return out, None
            mark = self._slot
            # the distinct tokens among the lists and each list entry's place among them (no sort: a scratch array)
            at = np.arange(pairs.size)
            mark[pairs] = at
            toks = pairs[mark[pairs] == at]
            mark[toks] = np.arange(toks.size)
            z_old = np.stack([z_l[g].take(toks) for g in cols])  # [c, tokens]
            q_old = np.stack([q_l[g].take(toks) for g in cols])
            reps = [len(t) for t in lists]
            c, n = cols.size, toks.size
            flat = (np.arange(c)[:, None] * n + mark[pairs][None, :]).ravel()  # (GPU, token place) of every entry

            def per_token(per_expert):  # [k, c] -> [c, tokens] summed over each token's moved experts
                w = np.repeat(per_expert, reps, axis=0).T.ravel()
                return np.bincount(flat, weights=w, minlength=c * n).reshape(c, n)

            z_new = (z_old + np.rint(per_token(dz))).astype(np.int8) if dz.any() else z_old
            q_new = q_old * np.exp(per_token(dlog)) if dlog.any() else q_old
        out[cols] = d.tok_factor[l] * (covered(z_new, q_new) - covered(z_old, q_old)).sum(axis=1)
        return out, (toks, cols, z_new, q_new)

    # -- pieces and per-GPU seconds ----------------------------------------------------------------------------
    def piece_max(self, l: int, X_row: np.ndarray, W_row: np.ndarray) -> np.ndarray:
        """``[N, G]`` largest piece on each GPU (the expert's load times its served share there)."""
        pieces = self.d.loads[:, l, X_row] * W_row[X_row, self.gpu][None, :]
        return pieces.reshape(self.d.N, self.G, self.m).max(axis=2)

    def layer_gpu_seconds(self, l: int, Lg=None, dup=None, X_row=None, W_row=None, M_in=None,
                          logp0=None, A=None, Dt=None, DtN=None, R=None) -> np.ndarray:
        """``[N, G]`` seconds of each GPU at layer l (optionally with replaced quantities)."""
        d = self.d
        Lg = self.Lg[l] if Lg is None else Lg
        dup = self.dup[l] if dup is None else dup
        logp0 = self.logp0[l] if logp0 is None else logp0
        X_row = self.X[l] if X_row is None else X_row
        W_row = self.W[l] if W_row is None else W_row
        sc = d.scale[:, l][:, None]
        if self.tokd:
            D = sc * (self.Dt[l] if Dt is None else Dt)[None, :]
        elif d.C is not None:
            D = np.maximum(Lg - dup[None, :] * sc, self.piece_max(l, X_row, W_row))
            D = np.maximum(D, sc * (d.tokens[l] * -np.expm1(np.minimum(logp0, 0.0)))[None, :])
        else:
            D = Lg
        t = self.alpha * Lg if self.R is None else roofline_compute(Lg, self.R[l] if R is None else R, d.cost)
        topo = d.topology
        if not d.coherent:
            if d.cost.comm == "nccl":
                return t + standard_comm_seconds(D, topo, d.cost, phases=2)
            Dn = None
            if self.by_node:
                if self.tokd:
                    Dn = sc * (self.DtN[l] if DtN is None else DtN)[None, :]
                else:  # the pairwise estimate on the node shares, from scratch (E x E x nodes)
                    C = None if d.C is None else d.C[l]
                    Dn = sc * standard_distinct(node_share(W_row, topo), d.load[l], C, float(d.tokens[l]))[1][None, :]
            return t + comm_seconds(Lg, D, Dn, topo, d.cost)
        M = None if l == 0 else (self.M[l] if M_in is None else M_in)
        A = self.A[l] if A is None else A
        return t + coherent_comm_seconds(D, Lg, M, A, topo, d.cost, d.scale[:, l])

    # -- objective ---------------------------------------------------------------------------------------------
    def profile_totals(self, tl: np.ndarray | None = None) -> np.ndarray:
        return (self.tl if tl is None else tl).sum(axis=0)

    def objective(self) -> float:
        return self._combine(self.profile_totals(), float(self.moved.sum()), self.local)

    def _combine(self, tot: np.ndarray, moved_total: float, local: np.ndarray | None) -> float:
        out = float(tot.max() if self.d.worst else tot.mean()) + self.d.migration_cost * moved_total
        return out + self.affinity_seconds(local)

    def affinity_seconds(self, local: np.ndarray | None = None) -> float:
        """The ``affinity_weight`` term of the objective (0 without it) for the local pair mass ``local [L-1]``
        (default: the state's): the pairs with no common GPU, priced."""
        local = self.local if local is None else local
        if local is None:
            return 0.0
        return self.d.aff_cost * (self.d.aff_total - float(local.sum()))

    def _local_update(self, l: int, idx: np.ndarray, P_new: np.ndarray) -> np.ndarray | None:
        """``[L-1]`` local k x k pair mass after experts ``idx`` of layer l take the shares ``P_new`` (None without
        the affinity term): only the pairs with a moved expert change."""
        if self.local is None:
            return None
        d = self.d
        Hn = (P_new > 0).astype(np.float64)  # [k, G]
        Ho = self.H[l].take(idx, 0)
        local = self.local.copy()
        if l >= 1:
            K = d.aff[l - 1].take(idx, 1)  # [E, k]
            local[l - 1] += (K * (((self.H[l - 1] @ Hn.T) > 0).astype(np.float64)
                                  - ((self.H[l - 1] @ Ho.T) > 0))).sum()
        if l + 1 < d.L:
            K = d.aff[l].take(idx, 0)  # [k, E]
            local[l] += (K * (((Hn @ self.H[l + 1].T) > 0).astype(np.float64) - ((Ho @ self.H[l + 1].T) > 0))).sum()
        return local

    # -- moves -------------------------------------------------------------------------------------------------
    def _move_arrays(self, l: int, changes: list[tuple[int, int]]):
        """New X row, r row and the sparse share change for slot changes [(slot, new expert)]."""
        X_row = self.X[l].copy()
        old = [int(X_row[s]) for s, _ in changes]
        for s, e in changes:
            X_row[s] = e
        idx = sorted(set(old) | {e for _, e in changes})
        idx_a = np.asarray(idx, dtype=np.int64)
        pos = {e: i for i, e in enumerate(idx)}
        Pold = self.P[l, idx_a]
        cnt_new = np.rint(Pold * self.r[l, idx_a][:, None])
        for (s, e), o in zip(changes, old):
            g = self.gpu[s]
            cnt_new[pos[o], g] -= 1.0
            cnt_new[pos[e], g] += 1.0
        r_new = cnt_new.sum(axis=1)
        if np.any(r_new == 0) or np.any(cnt_new > 1):
            return None
        P_new = cnt_new / r_new[:, None]
        dP = P_new - Pold
        r_row = self.r[l].copy()
        r_row[idx_a] = r_new.astype(np.int64)
        return X_row, r_row, idx_a, dP, P_new

    def _layer_update(self, l: int, idx: np.ndarray, dW: np.ndarray):
        """New (Lg ``[N, G]``, dup ``[G]``, logp0 ``[G]``, A ``[G, G]`` or None, R ``[N, G]`` or None) of layer l
        when the served shares of experts ``idx`` change by ``dW [k, G]``."""
        d = self.d
        Lg = self.Lg[l] + d.loads[:, l, idx] @ dW
        dup = self.dup[l]
        logp0 = self.logp0[l]
        if self.CP is not None:  # sub-blocks by take(): np.ix_ costs more than the products at this size
            dup = dup + (dW * (self.CP[l].take(idx, 0) + 0.5 * (_block(d.C[l], idx) @ dW))).sum(axis=0)
            grow = self.KP[l].take(idx, 0) + 0.5 * (_block(d.Kw[l], idx) @ dW)
            logp0 = logp0 + d.U[l].take(idx) @ dW + (dW * grow).sum(axis=0)
        A = None
        if self.use_T:
            A = self.A[l] + dW.T @ (self.QP[l].take(idx, 0) + _block(d.Q[l], idx) @ dW) \
                + self.QtP[l].take(idx, 0).T @ dW
        R = None
        if self.R is not None:  # the roofline's weight reads: only the moved experts' terms change
            W_old = self.W[l].take(idx, 0)
            R = self.R[l] + self._reads(l, idx, W_old + dW) - self._reads(l, idx, W_old)
        return Lg, dup, logp0, A, R

    def evaluate_move(self, l: int, changes: list[tuple[int, int]]):
        """Exact new objective (and secondary) after a move; None if the move is illegal."""
        arr = self._move_arrays(l, changes)
        if arr is None:
            return None
        X_row, r_row, idx, dP, P_new = arr
        d = self.d
        if d.allowed_node is not None:
            an = d.allowed_node[l, idx]
            if np.any((P_new > 0) & (self.node[None, :] != an[:, None])):
                return None
        tab_new = W_new = None
        dW = dP
        W_row = None
        # replicas involved: the dispatch rule and the positions decide the served shares; else W = P (one GPU)
        replicated = bool((r_row[idx] > 1).any() or (self.r[l, idx] > 1).any())
        if self.use_T:
            if replicated:
                tab_new = dispatch_rows(P_new > 0, d.topology)
                W_new = effective_share(P_new, tab_new, self.Vin[l][:, idx] if l >= 1 else None)
            else:
                tab_new = np.repeat(np.argmax(P_new, axis=1)[:, None], self.G, axis=1)
                W_new = P_new
            dW = W_new - self.W[l, idx]
            W_row = self.W[l].copy()
            W_row[idx] = W_new
        else:
            W_row = self.P[l].copy()
            W_row[idx] = P_new
        Lg, dup, logp0, A_l, R_l = self._layer_update(l, idx, dW)
        Dt_l = tok_l = DtN_l = nod_l = None
        if self.tokd:
            dD, tok_l = self._token_delta(l, idx, W_row, dW)
            Dt_l = self.Dt[l] + dD
            if self.by_node:
                dDn, nod_l = self._node_delta(l, idx, W_row, dW)
                DtN_l = self.DtN[l] + dDn
        M_l = nxt = None
        if self.use_T:
            if l >= 1:
                V = self.Vin[l][:, idx]
                if replicated:
                    M_l = self.M[l] + dispatch_matrix(V, tab_new) - dispatch_matrix(V, self.tab[l, idx])
                else:
                    M_l = self.M[l] + V @ dP
            if l + 1 < d.L:
                # the anchors of layer l moved: positions, dispatch and replicated experts' shares of l+1 change.
                # dispatch_matrix(dV, tab) = dV @ P for experts with one replica; the others by their table
                M_next = self.M[l + 1] + dW.T @ self.Vout[l][idx]
                R = np.nonzero(self.r[l + 1] >= 2)[0]
                W2 = dW2 = None
                upd = (self.Lg[l + 1], self.dup[l + 1], self.logp0[l + 1], self.A[l + 1],
                       None if self.R is None else self.R[l + 1])
                W2_row = Dt2 = None
                if R.size:
                    dVR = dW.T @ d.T[l].take(idx, 0).take(R, 1)  # [G, |R|]
                    M_next = M_next + dispatch_matrix(dVR, self.tab[l + 1, R]) - dVR @ self.P[l + 1, R]
                    W2 = effective_share(self.P[l + 1, R], self.tab[l + 1, R], self.Vin[l + 1][:, R] + dVR)
                    dW2 = W2 - self.W[l + 1, R]
                    upd = self._layer_update(l + 1, R, dW2)
                    W2_row = self.W[l + 1].copy()
                    W2_row[R] = W2
                    if self.tokd:  # in proportion to the load change; recounted by resync()
                        Lgm = self.Lg[l + 1].mean(axis=0)
                        ratio = np.divide(self.Dt[l + 1], Lgm, out=np.ones_like(Lgm), where=Lgm > 0)
                        Dt2 = self.Dt[l + 1] + (d.load[l + 1, R] @ dW2) * ratio
                nxt = (M_next, R, W2, dW2, upd, W2_row, Dt2)
        tg_l = self.layer_gpu_seconds(l, Lg, dup, X_row, W_row, M_l, logp0, A_l, Dt_l, DtN_l, R_l)
        new_tg = {l: tg_l}
        if nxt is not None:
            Lg2, dup2, logp02, A2, R2 = nxt[4]
            new_tg[l + 1] = self.layer_gpu_seconds(l + 1, Lg2, dup2, None, nxt[5], nxt[0], logp02, A2, nxt[6],
                                                   R=R2)
        tl = self.tl.copy()
        for ll, t in new_tg.items():
            tl[ll] = t.max(axis=1)
        moved_total = float(self.moved.sum())
        moved_l = None
        if self.cur_mask is not None:
            cm = self.cur_mask[l, idx]
            moved_l = self.moved[l] - ((self.P[l, idx] > 0) & ~cm).sum() + ((P_new > 0) & ~cm).sum()
            moved_total += moved_l - self.moved[l]
        local = self._local_update(l, idx, P_new)
        obj = self._combine(self.profile_totals(tl), moved_total, local)
        sec_old = sum(float((self.tg[ll] ** 2).sum()) for ll in new_tg)
        sec_new = sum(float((t ** 2).sum()) for t in new_tg.values())
        payload = (l, X_row, r_row, idx, dP, P_new, tab_new, W_new, dW, Lg, dup, logp0, M_l, A_l, nxt, new_tg,
                   moved_l, Dt_l, tok_l, local, DtN_l, nod_l, R_l)
        return obj, sec_new - sec_old, payload

    def _store_layer(self, l: int, idx: np.ndarray, dW: np.ndarray, Lg, dup, logp0, A, R=None) -> None:
        d = self.d
        self.Lg[l] = Lg
        if R is not None:
            self.R[l] = R
        self.dup[l] = dup
        self.logp0[l] = logp0
        if self.CP is not None:
            self.CP[l] += d.C[l][:, idx] @ dW
            self.KP[l] += d.Kw[l][:, idx] @ dW
        if self.use_T:
            self.QP[l] += d.Q[l][:, idx] @ dW
            self.QtP[l] += d.Q[l][idx].T @ dW
            self.A[l] = A

    def apply(self, payload) -> None:
        (l, X_row, r_row, idx, dP, P_new, tab_new, W_new, dW, Lg, dup, logp0, M_l, A_l, nxt, new_tg,
         moved_l, Dt_l, tok_l, local, DtN_l, nod_l, R_l) = payload
        d = self.d
        self.X[l] = X_row
        self.r[l] = r_row
        Pl = self.P[l, idx] + dP
        self.P[l, idx] = np.where(np.abs(Pl) < 1e-12, 0.0, Pl)
        if self.use_T:
            self.tab[l, idx] = tab_new
            self.W[l, idx] = W_new
        self._store_layer(l, idx, dW, Lg, dup, logp0, A_l, R_l)
        if self.tokd:
            self.Dt[l] = Dt_l
            if tok_l is not None:
                toks, cols, z_new, q_new = tok_l
                for j, g in enumerate(cols):
                    self.z[l, g, toks] = z_new[j]
                    self.q[l, g, toks] = q_new[j]
            if self.by_node:
                self.DtN[l] = DtN_l
                if nod_l is not None:
                    toks, cols, z_new, q_new = nod_l
                    for j, g in enumerate(cols):
                        self.zN[l, g, toks] = z_new[j]
                        self.qN[l, g, toks] = q_new[j]
        if self.use_T:
            if nxt is not None:
                M_next, R, W2, dW2, upd, _, Dt2 = nxt
                self.Vin[l + 1] += dW.T @ d.T[l][idx, :]
                self.M[l + 1] = M_next
                if R.size:
                    self.W[l + 1, R] = W2
                    self._store_layer(l + 1, R, dW2, *upd)
                    if self.tokd:
                        self.Dt[l + 1] = Dt2
                        self.stale[l + 1] = True
                    if l + 2 < d.L and np.abs(dW2).max() > 1e-12:
                        self.stale[l + 2] = True  # its positions moved with layer l+1's served shares
                if self.tokpos is not None:
                    self.stale[l + 1] = True  # replayed positions: rebuilt from l+1 on by resync()
            if l >= 1:
                self.Vout[l - 1] += d.T[l - 1][:, idx] @ dP
                self.M[l] = M_l
        for ll, t in new_tg.items():
            self.tg[ll] = t
            self.tl[ll] = t.max(axis=1)
        if moved_l is not None:
            self.moved[l] = moved_l
        if local is not None:
            self.local = local
            self.H[l, idx] = (self.P[l, idx] > 0)
