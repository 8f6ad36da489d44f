"""User functions from a text expression, interpreted over numpy: no eval, no Python names.

The expression is parsed with `ast` and walked by a small interpreter that knows numbers, the
variable x, + - * / ** %, comparisons (for `where`), and a fixed list of numpy math functions
(optionally written `np.exp`). Anything else - attribute access, subscripts, lambdas,
unknown names - is refused with the offending piece named, before anything is evaluated.
"""
from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

import numpy as np

from gqa_lut.errors import UsageError
from gqa_lut.functions import erf, get_op
from gqa_lut.table import Table

FUNCTIONS: dict[str, Any] = {
    name: getattr(np, name) for name in (
        "exp", "expm1", "exp2", "log", "log1p", "log2", "log10", "sqrt", "cbrt", "square",
        "sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
        "arcsinh", "arccosh", "arctanh", "abs", "absolute", "sign", "floor", "ceil",
        "maximum", "minimum", "where", "clip", "reciprocal", "power", "hypot", "arctan2",
    )
}
FUNCTIONS["erf"] = erf
# How many arguments each function takes; every other function takes one.
ARITY = {"maximum": 2, "minimum": 2, "power": 2, "hypot": 2, "arctan2": 2, "where": 3, "clip": 3}
CONSTANTS = {"pi": np.float64(math.pi), "e": np.float64(math.e)}
BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod}
CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
          ast.Eq: operator.eq, ast.NotEq: operator.ne}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _func_name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy"):
        return node.attr
    raise UsageError(f"expression: {ast.unparse(node)!r} is not a numpy math function name")


def _check(node: ast.AST) -> None:
    """Refuse anything outside the small math language, naming it."""
    if isinstance(node, ast.Expression):
        return _check(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise UsageError(f"expression: {node.value!r} is not a number")
        return None
    if isinstance(node, ast.Name):
        if node.id != "x" and node.id not in CONSTANTS:
            raise UsageError(f"expression: unknown name {node.id!r}; use x, pi, e and numpy math "
                             f"functions ({', '.join(sorted(FUNCTIONS))})")
        return None
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        _check(node.left)
        return _check(node.right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return _check(node.operand)
    if isinstance(node, ast.Compare) and all(type(o) in CMPOPS for o in node.ops):
        _check(node.left)
        for c in node.comparators:
            _check(c)
        return None
    if isinstance(node, ast.Call) and not node.keywords:
        name = _func_name(node.func)
        if name not in FUNCTIONS:
            raise UsageError(f"expression: {name!r} is not an allowed function; allowed: "
                             f"{', '.join(sorted(FUNCTIONS))}")
        want = ARITY.get(name, 1)
        if len(node.args) != want:
            raise UsageError(f"expression: {name} takes {want} argument{'s' if want > 1 else ''}, "
                             f"{len(node.args)} given in {ast.unparse(node)!r}")
        for a in node.args:
            _check(a)
        return None
    raise UsageError(f"expression: {ast.unparse(node)!r} is not math this tool evaluates")


def _eval(node: ast.AST, x: np.ndarray) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, x)
    if isinstance(node, ast.Constant):
        return np.float64(node.value)  # numpy semantics: 1/0 is inf, not an exception
    if isinstance(node, ast.Name):
        return x if node.id == "x" else CONSTANTS[node.id]
    if isinstance(node, ast.BinOp):
        return BINOPS[type(node.op)](_eval(node.left, x), _eval(node.right, x))
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_eval(node.operand, x))
    if isinstance(node, ast.Compare):
        left, out = _eval(node.left, x), None
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, x)
            res = CMPOPS[type(op)](left, right)
            out = res if out is None else np.logical_and(out, res)
            left = right
        return out
    if isinstance(node, ast.Call):
        return FUNCTIONS[_func_name(node.func)](*[_eval(a, x) for a in node.args])
    raise AssertionError("unchecked node")  # _check rejects everything else


def _short(text: str) -> str:
    """The expression as an error message quotes it: long ones cut, so the message stays one line."""
    text = " ".join(text.split())
    return repr(text if len(text) <= 60 else text[:57] + "...")


class Expression:
    """A parsed, checked expression in x; callable on numpy arrays and picklable (for pools)."""

    def __init__(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise UsageError("expression is empty: give a formula in x, e.g. \"x*tanh(log1p(exp(x)))\"")
        if len(text) > 1000:
            raise UsageError(f"expression is {len(text)} characters long: at most 1000 are allowed")
        try:
            tree = ast.parse(text.strip(), mode="eval")
            _check(tree)
        except SyntaxError as exc:
            raise UsageError(f"expression {_short(text)} is not valid math: {exc.msg}") from None
        except (RecursionError, MemoryError):
            raise UsageError(f"expression {_short(text)} nests too deeply: simplify it") from None
        if not any(isinstance(n, ast.Name) and n.id == "x" for n in ast.walk(tree)):
            raise UsageError(f"expression {text!r} does not use x")
        self.text = text.strip()
        self._tree = tree

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(all="ignore"):
            try:
                out = _eval(self._tree, x)
                return np.broadcast_to(np.asarray(out, dtype=np.float64), x.shape).copy()
            except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
                raise UsageError(f"expression {_short(self.text)} cannot be evaluated: "
                                 f"{str(exc).splitlines()[0]}") from None
            except (RecursionError, MemoryError):
                raise UsageError(f"expression {_short(self.text)} nests too deeply: simplify it") from None

    def __getstate__(self) -> dict:
        return {"text": self.text}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["text"])

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def target_function(table: "Table", expr: str | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The exact function a table approximates: its registry op, or for a custom table the
    expression given or carried in the file (`search.expr`)."""
    if table.op.startswith("custom:"):
        text = expr or (table.search or {}).get("expr")
        if not text:
            raise UsageError(f"table op {table.op!r} is a custom function and the file carries no "
                             "expression: pass --expr")
        return Expression(text)
    if expr is not None:
        raise UsageError(f"--expr is for custom tables: this is a table of the registry op {table.op!r}, "
                         "evaluated against its own function")
    return get_op(table.op).fn
