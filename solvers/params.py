"""Solver parameters read with types (:class:`Params`): the one place where ``Options.params`` is checked, so that
every solver refuses a misspelt name or a value out of range with the same kind of sentence."""

from __future__ import annotations

import difflib
from dataclasses import fields as dc_fields
from typing import Any, Mapping

import numpy as np

from solvers.base import SolverInputError, is_number
from solvers.cost import CostModel

__all__ = ["Params"]


class Params:
    """A solver's ``Options.params`` read with types: every getter checks the value and raises
    :class:`SolverInputError` with one sentence naming the parameter (a string where a number belongs, a number
    out of range); unknown names are refused, with the nearest known one (a misspelt name would otherwise be
    ignored without a word). The cost-model fields (``solvers.cost.CostModel``), ``cost`` and ``model`` are
    known to every solver, since the CLI passes them to all of them."""

    def __init__(self, params: Mapping[str, Any] | None, solver: str, known: set[str] | frozenset[str]):
        self.solver = solver
        self.values = dict(params or {})
        allowed = set(known) | {f.name for f in dc_fields(CostModel)} | {"cost", "model"}
        for key in self.values:
            if key not in allowed:
                near = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(sorted(known)) or 'none'}"
                raise SolverInputError(f"the {solver} solver has no parameter {key!r}; {hint}")

    def __contains__(self, key: str) -> bool:
        return key in self.values and self.values[key] is not None

    def _bad(self, key: str, want: str) -> SolverInputError:
        return SolverInputError(f"parameter {key} must be {want}, got {self.values[key]!r}")

    def number(self, key: str, default, *, lo: float | None = None, hi: float | None = None, integer: bool = False,
               lo_open: bool = False, hi_open: bool = False):
        """A finite number (an integer with ``integer``) in ``[lo, hi]`` (an end excluded with ``lo_open`` /
        ``hi_open``), or ``default`` when absent or None."""
        v = self.values.get(key)
        if v is None:
            return default
        if not is_number(v, lo, hi, integer=integer, lo_open=lo_open, hi_open=hi_open):
            raise self._bad(key, ("an integer" if integer else "a number") + self._range(lo, hi, lo_open, hi_open))
        return int(v) if integer else float(v)

    @staticmethod
    def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
        return ("" if lo is None else (f" > {lo:g}" if lo_open else f" >= {lo:g}")) + \
            ("" if hi is None else (f" and < {hi:g}" if hi_open else f" and <= {hi:g}"))

    def integer(self, key: str, default, *, lo: int | None = None, hi: int | None = None):
        return self.number(key, default, lo=lo, hi=hi, integer=True)

    def flag(self, key: str, default):
        """A boolean (JSON true / false), or ``default`` when absent or None."""
        v = self.values.get(key)
        if v is None:
            return default
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        raise self._bad(key, "true or false")

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        v = self.values.get(key)
        if v is None:
            return default
        if v not in options:
            raise self._bad(key, "one of " + ", ".join(repr(o) for o in options))
        return str(v)

    def numbers(self, key: str, default, *, lo: float | None = None, hi: float | None = None):
        """A non-empty list of finite numbers in ``[lo, hi]``, or ``default``."""
        v = self.values.get(key)
        if v is None:
            return default
        if not isinstance(v, (list, tuple)) or not v or not all(is_number(x, lo, hi) for x in v):
            raise self._bad(key, "a JSON list of numbers" + self._range(lo, hi))
        return [float(x) for x in v]
