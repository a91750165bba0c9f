"""The joint planner: affinity, co-activation, balance, topology and replicas together, with a bound.

Objective (minimised): the estimated MoE seconds of the fitted workload under the counts model of
:mod:`solvers.cost` (:func:`solvers.cost.estimate_layer_seconds`; under the coherent dataflow replicas serve
position-aware shares of their expert's tokens, :func:`solvers.cost.effective_share`; with a token trace each
GPU's distinct tokens are counted on the fitted tokens, :func:`solvers.cost.token_distinct`): per layer the slowest
GPU's compute plus all-to-all time, summed over layers; with several workload profiles the mean
(``objective="expected"``) or the maximum (``"worst"``) over profiles; plus ``migration_cost`` seconds for every
expert copy that must be moved onto a GPU that does not hold it in the current plan; plus, with
``affinity_weight`` w > 0, ``w x C0 x`` the fitted cross-GPU fraction of adjacent-layer k x k expert pairs (ExFlow's
locality metric; ``C0`` the balanced compute time), which trades estimated time for inter-layer locality
(:func:`solvers.joint.data.with_affinity_weight`).

Method (a decomposition that is exact where it can be, then local search on the true objective):

1. Tiny instances are enumerated exactly (status "optimal", bound = objective).
2. Replica counts per layer: water-filling of the redundant slots onto the largest pieces (optimal for the
   smallest largest piece, as DeepSeek's EPLB does greedily); the local search below re-targets replicas, so
   which experts are replicated and where is decided with the placement, on the same objective.
3. Construction by block coordinate descent over layers: with the neighbouring layers fixed, the gain of
   putting expert e on GPU g is linear (pairs with the neighbours that become GPU- or node-local, co-activated
   pairs that share the GPU, migration), so each layer is an assignment problem solved exactly
   (``scipy.optimize.linear_sum_assignment`` over slots), followed by a swap repair to a load cap. Sweeps run
   forwards and backwards (ExFlow's chaining of layers, arXiv 2401.08383, with MoETuner's balance,
   arXiv 2502.06643); several caps are tried and the cost model picks the best trade-off.
4. Local search on the exact counts objective with incremental evaluation: swaps of two experts between GPUs
   and replica re-targeting, aimed at each layer's slowest GPU, lexicographic on (objective, sum of squared GPU
   times) so that plateaus still improve balance and traffic. Every start (the column construction and, with a
   token trace, an affinity chain under the standard dataflow too) is descended while a descent as long as the
   first still fits; the best is kept.
5. Iterated local search (Lourenco, Martin & Stuetzle, "Iterated Local Search", 2003) with the time left: kick a
   layer, descend on it and its neighbours, keep or undo (:func:`solvers.joint.iterated.iterated_search`).
6. Bound: :func:`solvers.joint.bound.layer_bounds` (valid for every placement; ``bound_lp`` seconds tighten its
   pair allowances with triangle cuts), plus :func:`solvers.joint.bound.affinity_bound` for the affinity term; gap = (objective -
   bound) / objective.

Parameters (``Options.params``): ``dataflow`` ("standard" | "coherent"), ``cost`` (a
:class:`solvers.cost.CostModel`), ``model`` (a cost preset such as "deepseek-v3"), any CostModel field
(``hidden_size``, ``expert_intermediate_size``, ``dtype_bytes``, ``gpu_flops``), ``objective`` ("expected" |
"worst"; profiles are first scaled to the same token count unless ``normalize_profiles=false``),
``migration_cost`` (seconds per moved expert copy; default when a current plan is given: one expert's
weights over the intra-node link), ``keep_groups_on_nodes`` (bool: every expert group stays on one node, for
node-limited routing), ``caps`` (load caps tried by the construction), ``chain_cap`` (load cap of the affinity
chain start under the standard dataflow, default 1.2), ``chain_start`` (bool; default: only without redundant
slots), ``sweeps``, ``balance_weight`` (the column construction's weight on balance, default 8), ``smoothing`` (shrink transitions and
co-activation towards independence, 0..1), ``local_search`` (bool), ``iterated`` (bool: iterated local search
with the time left, default true), ``bound_lp`` (seconds for the triangle-cut pair bound, default 0),
``exact_limit`` (enumerate when there are at most this many placements), ``token_positions`` (bool: under the
coherent dataflow replay each fitted token's position, :func:`solvers.cost.replay_positions`, instead of spreading
an anchor's tokens by its served shares; default: with a token trace and redundant slots), ``position_tokens`` (at
most this many route tokens are replayed; default ``64e6 / (L x k)``), ``token_distinct`` (bool: count each
GPU's distinct tokens on the fitted token routes, :func:`solvers.cost.token_distinct`, instead of the pairwise
estimate; default: with a token trace, except under the coherent dataflow with redundant slots),
``distinct_tokens`` (at most this many route tokens are kept for that count; default ``64e6 / (L x G)``),
``affinity_weight`` (>= 0, default 0: one point of the fitted k x k cross-GPU fraction is worth this many percent of
the balanced compute time; needs transitions).

Modules (each readable in one sitting): :mod:`~solvers.joint.data` (the request in one set of units),
:mod:`~solvers.joint.state` (the incremental exact objective), :mod:`~solvers.joint.construct` (starts and the
per-layer assignment steps), :mod:`~solvers.joint.search` (local search), :mod:`~solvers.joint.iterated`
(iterated local search), :mod:`~solvers.joint.exact` (enumeration of tiny instances),
:mod:`~solvers.joint.bound` (the lower bound) and :mod:`~solvers.joint.solve` (the solver that runs them).
"""

from solvers.joint.bound import affinity_bound, layer_bounds, total_bound
from solvers.joint.construct import construct, construct_columns
from solvers.joint.data import PARAMS, JointData, prepare
from solvers.joint.exact import objective_of
from solvers.joint.iterated import iterated_search
from solvers.joint.search import local_search
from solvers.joint.solve import solve
from solvers.joint.state import State

__all__ = ["JointData", "PARAMS", "State", "affinity_bound", "construct", "construct_columns", "iterated_search",
           "layer_bounds", "local_search", "objective_of", "prepare", "solve", "total_bound", "SOLVERS"]

SOLVERS = {"joint": solve}
