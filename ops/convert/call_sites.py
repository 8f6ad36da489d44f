"""Every non-linear *call* of a model through a table, whoever makes it.

Module swaps reach only modules; real models also call `F.gelu`, `torch.rsqrt` (every RMSNorm
of Hugging Face), `F.softmax` and `F.scaled_dot_product_attention` from their own forwards.
`CallRouter` catches those calls with a TorchFunctionMode that hooks on the root module enter
and leave around each forward (the user writes a plain `model(x)`), and hooks on the
submodules that may make such calls keep a stack of which module is running. A call is keyed, as in Brevitas's
functional quantization, by that module, the kind of call and its code location (file, line,
bytecode offset: a Python loop over steps meets one site, not one per step), numbered in the
order the locations are first met; the first time a key is met it gets its own LUT
module, stored in the calling module under `lut_calls.<kind>_<index>`, so the state_dict
carries its table and calibrated scale and a later load recreates it. With
`replace_ops(calls="recorded")` the mode, after calibration, runs only inside the modules
that made a call (`CallRouter.record`): the rest of the model pays no per-operation Python.

Calls that stay float are recorded with the reason (`sites()`): ops with no table
(expm1, mish, ...), non-float inputs, parameters (Mamba's -exp(A_log): a constant). exp
itself is range-reduced (exp(r) * 2^-n), so it is right for inputs of either sign. A site's own
arithmetic runs with the mode off, so nothing inside it is intercepted.
"""
from __future__ import annotations

import math
import re
import sys
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from gqa_lut.table import Table
from ops import nn as lut_nn, registry
from ops.nn import LUTActivation, LUTSoftmax, RangeReducedLUT, device_of, exp_module
from ops.nn.activation import running_exact
from ops.kernels import dispatch
from ops.nn.softmax import LN2, N_MAX, Z_MIN, exp_reduced, keep_reduced_exp_scale, reduced_exp_scale

# The maps the router runs on, from the catalogue (ops/registry.py CALLS): each kind of call ->
# the tables its site uses, the registry op it stands for (`replace_ops(ops=...)`), and each
# torch spelling of a call (as a TorchFunctionMode receives it) -> its kind ("_" ends in-place).
SITE_TABLES: dict[str, tuple[str, ...]] = {c.name: registry.torch_op(c.op).tables for c in registry.CALLS}
KIND_OP: dict[str, str] = {c.name: c.op for c in registry.CALLS}
ACTIVATIONS = tuple(c.name for c in registry.CALLS if c.site == "activation")
KIND_OF: dict[Callable, str] = registry.call_spellings()
T = torch.Tensor
# non-linear calls with no table: reported as float, with this reason
NO_TABLE: dict[Callable, str] = {
    F.mish: "mish has no table (fit one with gqa-lut fit --expr)",
    F.elu: "elu has no table", F.selu: "selu has no table", F.celu: "celu has no table",
    F.softsign: "softsign has no table",
}
# exp2 and log2 are listed only when the model's own code calls them on an activation: the
# drop-ins' range reductions and fake quantizers call them on exponents and scales (shifts and
# leading-zero counts in integer hardware), and a swapped drop-in runs under the interception
POW2: dict[Callable, str] = {}
for _name, _why in (("exp2", "exp2 of an activation has no table (torch.exp(x * math.log(2)) goes through the exp "
                             "table)"), ("log2", "log2 of an activation has no table (torch.log(x) / math.log(2) "
                                                 "goes through the log table)")):
    for _owner in (torch, T, torch.special):
        if hasattr(_owner, _name):
            POW2[getattr(_owner, _name)] = _why
PACKAGE_CODE = tuple(str(Path(__file__).resolve().parents[2] / d) for d in ("ops", "gqa_lut"))


def pow2_of_activation(args: tuple, kwargs: dict, skip: tuple[str, ...] = ()) -> bool:
    """Whether an exp2/log2 call is one the report lists: on a float activation (not a
    parameter), made by the model's own code (outside torch and this package, not a drop-in's
    arithmetic); `skip`: more files to look past (another mode's). Eager only: frames cannot be
    traced."""
    x = _arg(args, kwargs, 0, "input")
    if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or not x.is_floating_point() \
            or isinstance(x, nn.Parameter):
        return False
    where = caller_location(skip)[0]
    return bool(where) and not where.startswith(PACKAGE_CODE) and not where.startswith(GRAPH_CODE)
for _name, _why in (("expm1", "expm1 has no table (exp(x) - 1 would lose its small-x digits)"),
                    ("log10", "log10 has no table"), ("erfinv", "erfinv has no table"),
                    ("norm", "a vector norm: sqrt of a sum, no table")):
    for _owner in (torch, T):
        if hasattr(_owner, _name):
            NO_TABLE[getattr(_owner, _name)] = _why
NO_TABLE.update({torch.special.expm1: "expm1 has no table (exp(x) - 1 would lose its small-x digits)",
                 F.instance_norm: "instance_norm has no table (its rsqrt is inside one kernel)",
                 F.normalize: "normalize: a vector norm (sqrt of a sum), no table",
                 torch.linalg.vector_norm: "a vector norm: sqrt of a sum, no table",
                 torch.linalg.norm: "a vector norm: sqrt of a sum, no table"})


class Frame:
    """One running module, whose calls get their site index from where they are made."""

    __slots__ = ("module", "counts")

    def __init__(self, module: nn.Module):
        self.module = module
        self.counts: dict[str, int] = {}  # calls of each kind since the module started

    def next_index(self, kind: str) -> int:
        """The index of the site of this kind at the calling code location in this module: the
        first location met gets 0, the next 1, ... and a location met again (a Python loop over
        tokens, a helper called per step) gets its index again, so a recurrent model has as many
        sites at 1024 tokens as at 32. The map lives on the module (pickled with it); a freshly
        converted copy meets the locations in the same order, so saved keys still match.
        torch.compile cannot trace frame inspection: there the n-th call of a kind takes the site
        the n-th call took in the last eager forward (calibration ran one)."""
        d = self.module.__dict__
        location = None if torch.compiler.is_compiling() else caller_location()
        if location is not None and location[0].startswith(GRAPH_CODE):
            raise ReplayedGraph
        n = self.counts.get(kind, 0)
        self.counts[kind] = n + 1
        if location is None:  # compiling: read the map only (torch 2.11's dynamo cannot trace setdefault on __dict__)
            order = getattr(self.module, "_gqa_lut_call_order", {}).get(kind, [])
            return order[n] if n < len(order) else (order[-1] if order else n)
        order = d.setdefault("_gqa_lut_call_order", {}).setdefault(kind, [])
        where = (kind, location)
        seen = d.setdefault("_gqa_lut_sites", {})
        index = seen.get(where)
        if index is None:  # the next index of this kind: how many of its locations came before
            index = seen[where] = sum(k == kind for k, _ in seen)
        if n < len(order):
            order[n] = index
        else:
            order.append(index)
        return index


_SKIP = (str(Path(torch.__file__).parent), str(Path(__file__).parent))
GRAPH_CODE = "<eval_with_key>"  # the file name of the code torch.fx generates for a traced graph


class ReplayedGraph(Exception):
    """A call made by a graph torch.compile traced (its eager and aot_eager backends run the
    graph's torch calls under the mode again): the router decided it while tracing, so it
    runs as it is, and no site is met or named from the graph's code."""


def caller_location(skip: tuple[str, ...] = ()) -> tuple[str, int, int]:
    """File, line and bytecode offset of the call in the first frame outside torch and this
    package (and the files in `skip`): the model's own call expression (through F's Python
    wrappers and the mode's dispatch). The offset tells apart two calls on one line
    (F.softplus(h) + F.softplus(2 * h)) and is the same on every pass of a loop."""
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_SKIP + skip):
        f = f.f_back
    return ("", 0, 0) if f is None else (f.f_code.co_filename, f.f_lineno, f.f_lasti)


# torch layers whose forward makes no call that could be a site: no stack hooks on them
NO_CALLS = {nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
            nn.Dropout3d, nn.Identity, nn.Flatten, nn.Unflatten, nn.Conv1d, nn.Conv2d, nn.Conv3d,
            nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.BatchNorm1d, nn.BatchNorm2d,
            nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ModuleList, nn.ModuleDict}


@dataclass
class SiteRecord:
    """One call site: through a table (tables, scale) or float (reason)."""

    name: str  # module.lut_calls.kind_i, or module:kind_i for float ones
    kind: str
    tables: tuple[str, ...] = ()
    reason: str = ""


class ExpSite(nn.Module):
    """exp through the exp table after range reduction (exp(r) * 2^-n, `exp_reduced`): right
    for every input, positive or far below the table's floor, so nothing is decided from the
    inputs seen and a later input of another sign is as exact as the first."""

    def __init__(self, table: Table):
        super().__init__()
        self.lut = exp_module(table, LN2)
        self.register_load_state_dict_post_hook(_exp_site_loaded)

    def forward(self, x: T) -> T:
        return exp_reduced(self.lut, x)

    def __setstate__(self, state: dict) -> None:
        """A whole model pickled before range reduction: the exp scale of (-ln 2, 0], a load hook."""
        super().__setstate__(state)
        keep_reduced_exp_scale(self, _exp_site_loaded)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "use_table", None)  # the table-or-float flag of checkpoints before range reduction
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _exp_site_loaded(site: ExpSite, keys: Any) -> None:
    reduced_exp_scale(site.lut)


class LogSumExpSite(nn.Module):
    """log(sum(exp(x))) over a dim as an integer design has it: the row max, exp of the
    differences through the exp table after range reduction (as the softmax's numerators), the
    sum, and ln of the sum through the log table after range reduction (its exponent is a
    leading-zero count); log_softmax is x minus it. A row of -inf gives -inf, as torch's."""

    def __init__(self, exp_table: Table, log_table: Table):
        super().__init__()
        self.lut = exp_module(exp_table, LN2)
        self.log = RangeReducedLUT("log", log_table)

    def forward(self, x: T, dim: int | tuple[int, ...], keepdim: bool = False) -> T:
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        m = x.detach().amax(dims, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an all -inf row: its sum is 0, its log -inf
        out = self.log(exp_reduced(self.lut, x - m).sum(dims, keepdim=True)) + m
        return out if keepdim else out.squeeze(dims)


# the LUT module serving each registry `site`, from the tables given
# (and replace_ops' module_kwargs, which only activation sites take)
MAKERS: dict[str, Callable[[str, dict[str, Table], dict[str, Any]], nn.Module]] = {
    "activation": lambda kind, tables, kw: LUTActivation(tables[SITE_TABLES[kind][0]], **kw),
    "softmax": lambda kind, tables, kw: LUTSoftmax(-1, tables["exp"], tables["reciprocal"]),
    "rsqrt": lambda kind, tables, kw: RangeReducedLUT("rsqrt", tables["rsqrt"]),
    "exp": lambda kind, tables, kw: ExpSite(tables["exp"]),
    "reciprocal": lambda kind, tables, kw: RangeReducedLUT("reciprocal", tables["reciprocal"]),
    "log": lambda kind, tables, kw: RangeReducedLUT("log", tables["log"]),
    "logsumexp": lambda kind, tables, kw: LogSumExpSite(tables["exp"], tables["log"]),
}


def make_site(kind: str, tables: dict[str, Table], **module_kwargs: Any) -> nn.Module:
    """A fresh LUT module for one call site of `kind`, with the tables given; module_kwargs
    (scale_mode, grad) go to an activation site, as replace_ops gives them to the modules."""
    if kind not in registry.CALL_KINDS:
        raise ValueError(f"no call site for kind {kind!r}")
    return MAKERS[registry.CALL_KINDS[kind].site](kind, tables, module_kwargs)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _softmax_dim(x: T, dim: Optional[int]) -> int:
    if dim is not None:
        return dim
    return 0 if x.dim() in (0, 1, 3) else 1  # F.softmax's legacy implicit dim


def sdpa(site: LUTSoftmax, q: T, k: T, v: T, attn_mask: Optional[T] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> T:
    """F.scaled_dot_product_attention written out, with its softmax through the tables: the
    mask (bool: keep where True; float: added), the causal mask (top-left aligned, as torch),
    grouped-query heads, the scale."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if dropout_p == 0.0 and (enable_gqa or k.size(-3) == q.size(-3)):
        out = dispatch.attention(q, k, v, attn_mask, site, scale, is_causal, Z_MIN, N_MAX)  # fused on CUDA: no L x S tensor
        if out is not None:
            return out
    return sdpa_written_out(site, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def sdpa_written_out(site: LUTSoftmax, q: T, k: T, v: T, attn_mask: Optional[T] = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> T:
    """`sdpa` in torch ops, the L x S scores and probabilities materialised: what the fused
    kernel is tested against, and what runs on the CPU, under tracing and with dropout."""
    L, S = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
    if math.frexp(scale)[0] == 0.5:  # a power of two (head dim 64: 1/8): exact on q, one L x S pass less
        s = (q * scale) @ k.transpose(-2, -1)
    else:
        s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:  # s is this function's own tensor: masked in place
        s.masked_fill_(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask
    p = site.along(s, -1)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return p @ v


def run_site(kind: str, site: nn.Module, func: Callable, args: tuple, kwargs: dict) -> Any:
    """The call `func(*args, **kwargs)` of `kind`, through `site`."""
    x = _arg(args, kwargs, 0, "input")
    if kind == "softplus":
        beta = float(_arg(args, kwargs, 1, "beta", 1.0))
        threshold = float(_arg(args, kwargs, 2, "threshold", 20.0))
        y = site(x * beta) / beta if beta != 1.0 else site(x)
        return torch.where(x * beta > threshold, x, y)
    if kind == "logsigmoid":  # -softplus(-x)
        return -site(-x)
    if kind == "erfc":
        return 1 - site(x)
    if kind == "log1p":
        return site(1 + x)
    if kind == "logsumexp":
        return site(x, _arg(args, kwargs, 1, "dim"), bool(_arg(args, kwargs, 2, "keepdim", False)))
    if kind == "log_softmax":
        dtype = _arg(args, kwargs, 3 if func is F.log_softmax else 2, "dtype")
        if dtype is not None:
            x = x.to(dtype)
        dim = _softmax_dim(x, _arg(args, kwargs, 1, "dim"))
        return x - site(x, dim, True)
    if kind == "glu":
        a, b = x.chunk(2, dim=_arg(args, kwargs, 1, "dim", -1))
        return a * site(b)
    if kind in ACTIVATIONS or kind in ("exp", "rsqrt", "log"):
        return site(x)
    if kind == "sqrt":  # x * rsqrt(x): 0 at 0, NaN below as torch.sqrt
        return torch.where(x < 0, torch.full_like(x, math.nan), x * site(x))
    if kind == "reciprocal":
        return _signed_reciprocal(site, x)
    if kind == "div":  # x / b = x * (1 / b)
        return x * _signed_reciprocal(site, _arg(args, kwargs, 1, "other"))
    if kind == "softmax":
        dtype = _arg(args, kwargs, 3 if func is F.softmax else 2, "dtype")
        if dtype is not None:
            x = x.to(dtype)
        return site.along(x, _softmax_dim(x, _arg(args, kwargs, 1, "dim")))
    if kind == "sdpa":
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        full = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
        return sdpa(site, full["query"], full["key"], full["value"], full["attn_mask"], full["dropout_p"] or 0.0,
                    bool(full["is_causal"]), full["scale"], bool(full["enable_gqa"]))
    if kind == "layer_norm":
        return lut_nn.layer_norm(x, _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 2, "weight"),
                                  _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5), site)
    if kind == "rms_norm":
        return lut_nn.rms_norm(x, _arg(args, kwargs, 1, "normalized_shape"), _arg(args, kwargs, 2, "weight"),
                                _arg(args, kwargs, 3, "eps"), site)
    if kind == "group_norm":
        return lut_nn.group_norm(x, _arg(args, kwargs, 1, "num_groups"), _arg(args, kwargs, 2, "weight"),
                                  _arg(args, kwargs, 3, "bias"), _arg(args, kwargs, 4, "eps", 1e-5), site)
    raise ValueError(f"no call site for kind {kind!r}")


def table_call(kind: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call of a routed kind is one a table stands for, by its other arguments: of the
    powers only x ** +-0.5 (x ** 2 is a polynomial), of the divisions only those by a float tensor
    of more than one element (a normaliser; not by a number or a scalar scale, nor floor/trunc
    division). Also what bench.model_zoo counts."""
    if kind == "pow":
        exponent = _arg(args, kwargs, 1, "exponent")
        return not isinstance(exponent, torch.Tensor) and exponent in (0.5, -0.5)
    if kind == "div":
        b = _arg(args, kwargs, 1, "other")
        return (isinstance(b, torch.Tensor) and b.is_floating_point() and b.numel() > 1
                and kwargs.get("rounding_mode") is None)
    return True


def constant_input(kind: str, x: T) -> bool:
    """sqrt(head_dim), log(10000) and the like: sqrt, rsqrt, 1/x or log of one element with no
    gradient is a constant of the model, not an activation (no site, not listed)."""
    return kind in ("sqrt", "rsqrt", "reciprocal", "log", "log1p") and x.numel() == 1 and not x.requires_grad


def _signed_reciprocal(site: nn.Module, b: T) -> T:
    """1 / b through the table's range reduction of |b|, with the sign put back; 1 / +-0 is +-inf
    as torch's (no float division here: a mode outside the model would count it)."""
    return torch.where(b == 0, torch.copysign(torch.full_like(b, math.inf), b), torch.sign(b) * site(b.abs()))


SITE_KEY = re.compile(r"^(?:(?P<owner>.*)\.)?lut_calls\.(?P<kind>[a-z_]+?)_(?P<index>\d+)\.")


class CallRouter:
    """The state of call-site interception for one model: the running-module stack, the
    sites met so far, and the float calls with their reasons. Picklable (torch.save(model))."""

    def __init__(self, root: nn.Module, tables: dict[str, Table], kinds: set[str], opaque: tuple[type, ...],
                 module_kwargs: Optional[dict[str, Any]] = None,
                 filter_fn: Optional[Callable[[nn.Module, str], bool]] = None):
        self.tables, self.kinds, self.opaque = tables, kinds, opaque
        self.module_kwargs = dict(module_kwargs or {})  # scale_mode, grad: for activation sites
        # the modules replace_ops' filter_fn excluded, by name (a set, not the function: a
        # lambda would make the model unpicklable); their own calls stay float
        self.excluded = ({n for n, m in root.named_modules() if not filter_fn(m, n)} if filter_fn is not None
                         else set())
        self.names: dict[int, str] = {}
        self.stack: list[Frame] = []
        self.floats: dict[str, SiteRecord] = {}
        self.depth = 0
        self.forwards = 0  # root forwards seen (the report says when no call has been met yet)
        self.paused = False
        self.scope = "model"  # "recorded": the mode runs only inside modules that made a call (record())
        # while calibrate observes: calls per site name (the report's call counts); None otherwise,
        # so a forward (eager or compiled) after calibration pays nothing for it
        self.counts: Optional[dict[str, int]] = None
        self.mode: Optional[_LUTCallMode] = None
        self.attach(root)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(stack=[], mode=None, depth=0, names={})
        state.pop("_composite", None)  # built again on first use
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({"module_kwargs": {}, "excluded": set(), "counts": None, **state})  # older pickles lack these

    # --- hooks ---------------------------------------------------------------------------------
    def attach(self, root: nn.Module) -> None:
        self.root_ref = root
        self.hook(root)
        root.register_forward_pre_hook(self._enter)
        root.register_forward_hook(self._exit, always_call=True)
        root.register_load_state_dict_pre_hook(self._make_sites_for_load)

    def _name(self, m: nn.Module) -> str:
        key = id(m)
        if key not in self.names:  # rebuilt lazily (after unpickling, after swaps)
            self.names = {id(mod): n for n, mod in self.root_ref.named_modules()}
        return self.names.get(key, type(m).__name__)

    def _push(self, m: nn.Module, args: tuple) -> None:
        if self.depth:
            self.stack.append(Frame(m))

    def _pop(self, m: nn.Module, args: tuple, out: Any) -> None:
        if self.depth and self.stack and self.stack[-1].module is m:
            self.stack.pop()

    def _outside(self, m: nn.Module) -> bool:
        return self.scope == "recorded" and not getattr(m, "_gqa_lut_owner", False)

    def _enter(self, m: nn.Module, args: tuple) -> None:
        if self._outside(m):
            return
        if self.depth == 0:
            self.forwards += 1
            self.stack = [Frame(m)]
            self.mode = _LUTCallMode(self)
            self.mode.__enter__()
        self.depth += 1

    def _exit(self, m: nn.Module, args: tuple, out: Any) -> None:
        if self._outside(m):
            return
        self.depth -= 1
        if self.depth == 0 and self.mode is not None:
            mode, self.mode = self.mode, None
            mode.__exit__(None, None, None)
            self.stack = []

    def record(self) -> list[str]:
        """From now on run the mode only inside the modules whose forward made a call so far
        (calibration met them all): a model's other operations no longer pass through Python.
        A call made elsewhere later (a code path calibration never took) is not seen. Returns
        the owners' names."""
        owners = {n for n, m in self.root_ref.named_modules()
                  if isinstance(getattr(m, "lut_calls", None), nn.ModuleDict)}
        owners |= {rec.name.rsplit(":", 1)[0] for rec in self.floats.values()}
        for name in sorted(owners):
            m = self.root_ref.get_submodule(name)
            if not getattr(m, "_gqa_lut_owner", False) and m is not self.root_ref:
                m._gqa_lut_owner = True
                m.register_forward_pre_hook(self._enter)
                m.register_forward_hook(self._exit, always_call=True)
        self.root_ref._gqa_lut_owner = "" in owners
        self.scope = "recorded"
        return sorted(owners)

    # --- sites ---------------------------------------------------------------------------------
    def site(self, owner: nn.Module, kind: str, index: int, device: torch.device) -> nn.Module:
        calls = getattr(owner, "lut_calls", None)
        if calls is None:
            calls = nn.ModuleDict()
            owner.add_module("lut_calls", calls)
        key = f"{kind}_{index}"
        if key not in calls:
            calls[key] = make_site(kind, self.tables, **self.module_kwargs).to(device)
            self.names = {}
        return calls[key]

    def _make_sites_for_load(self, module, state_dict, prefix, *rest) -> None:
        """Before a load: recreate the call sites a saved model had met (their keys say where)."""
        for key in list(state_dict):
            m = SITE_KEY.match(key[len(prefix):])
            if m is None or m.group("kind") not in SITE_TABLES:
                continue
            self.site(module.get_submodule(m.group("owner") or ""), m.group("kind"), int(m.group("index")),
                      device_of(module))

    def hook(self, m: nn.Module) -> None:
        """Stack hooks on every module that may make a call (also one put in later: a swap the
        probe undid). Not on LUT modules (their arithmetic makes no call that is a site) nor on
        torch's leaf layers that make none (Linear, Conv, Embedding, Dropout...): hooks cost a
        few microseconds per module call, and those are most of a model's module calls."""
        for sub in m.modules():
            if getattr(sub, "_gqa_lut_hooked", False) or isinstance(sub, self.opaque) or type(sub) in NO_CALLS:
                continue
            sub._gqa_lut_hooked = True
            sub.register_forward_pre_hook(self._push)
            sub.register_forward_hook(self._pop, always_call=True)
        self.names = {}

    def note_float(self, frame: Frame, kind: str, reason: str) -> None:
        index = frame.next_index(kind)  # taken even when compiling: the later sites' indices depend on it
        if torch.compiler.is_compiling():  # recorded eagerly (calibration); naming by id() breaks dynamo's guards
            return
        name = f"{self._name(frame.module)}:{kind}_{index}"
        if name not in self.floats:  # no per-call state: torch.compile guards module integers (a counter recompiled every forward)
            self.floats[name] = SiteRecord(name, kind, reason=reason)
        if self.counts is not None:
            self.counts[name] = self.counts.get(name, 0) + 1

    def _count(self, owner: nn.Module, kind: str, index: int) -> None:
        owner_name = self._name(owner) if owner is not self.root_ref else ""
        name = f"{owner_name}.lut_calls.{kind}_{index}" if owner_name else f"lut_calls.{kind}_{index}"
        self.counts[name] = self.counts.get(name, 0) + 1

    def handle(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        frame = self.stack[-1] if self.stack else None
        if frame is None or self.paused or running_exact():
            return func(*args, **kwargs)
        try:
            return self._route(frame, func, args, kwargs)
        except ReplayedGraph:
            return func(*args, **kwargs)

    def _route(self, frame: Frame, func: Callable, args: tuple, kwargs: dict) -> Any:
        kind = KIND_OF.get(func)
        if func in POW2:
            if pow2_of_activation(args, kwargs):
                self.note_float(frame, func.__name__, POW2[func])
            return func(*args, **kwargs)
        if kind is None:
            self.note_float(frame, func.__name__, NO_TABLE[func])
            return func(*args, **kwargs)
        inplace = kind.endswith("_") or bool(kwargs.get("inplace", False)) or (
            func in (F.silu, F.hardswish, F.hardsigmoid) and len(args) > 1 and bool(args[1]))
        kind = kind.rstrip("_")
        if kind == "softmin":
            kind, func, x = "softmax", F.softmax, _arg(args, kwargs, 0, "input")
            args, kwargs = (-x,) + tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "input"}
        if kind == "gelu" and _arg(args, kwargs, 1, "approximate", "none") == "tanh":
            kind = "gelu_tanh"
        if not table_call(kind, args, kwargs):
            return func(*args, **kwargs)
        if kind == "div":
            inplace = inplace or func is T.__itruediv__
        if kind == "pow":
            kind, func = ("sqrt", torch.sqrt) if _arg(args, kwargs, 1, "exponent") == 0.5 else ("rsqrt", torch.rsqrt)
            args, kwargs = args[:1], {}
        if KIND_OP[kind] not in self.kinds:
            return func(*args, **kwargs)
        if self.excluded and self._name(frame.module) in self.excluded:
            self.note_float(frame, kind, "excluded by replace_ops' filter_fn: kept float")
            return func(*args, **kwargs)
        x = _arg(args, kwargs, 0, "query" if kind == "sdpa" else "input")
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or kwargs.get("out") is not None:
            why = "out= form" if kwargs.get("out") is not None else "non-float input"
            self.note_float(frame, kind, f"{why}: kept float")
            return func(*args, **kwargs)
        if constant_input(kind, x):
            return func(*args, **kwargs)
        if isinstance(x, nn.Parameter):  # Mamba's A = -exp(A_log): folded into a constant, not run per input
            self.note_float(frame, kind, "input is a parameter (a constant of the model, not an activation): kept float")
            return func(*args, **kwargs)
        index = frame.next_index(kind)
        site = self.site(frame.module, kind, index, x.device)
        if self.counts is not None:
            self._count(frame.module, kind, index)
        y = run_site(kind, site, func, args, kwargs)
        if inplace:
            return x.copy_(y)
        return y

    def sites(self) -> list[SiteRecord]:
        """Every call site met: through a table (the LUT modules under lut_calls) or float."""
        out = []
        for name, m in self.root_ref.named_modules():
            calls = getattr(m, "lut_calls", None)
            if not isinstance(calls, nn.ModuleDict) or name.endswith("lut_calls"):
                continue
            for key, site in calls.items():
                kind = key.rsplit("_", 1)[0]
                full = f"{name}.lut_calls.{key}" if name else f"lut_calls.{key}"
                out.append(SiteRecord(full, kind, SITE_TABLES[kind]))
        return out + list(self.floats.values())


ROUTE: dict[Callable, int] = {**{f: 1 for f in KIND_OF}, **{f: 1 for f in NO_TABLE}, **{f: 1 for f in POW2},
                              F.multi_head_attention_forward: 2}


class _LUTCallMode(TorchFunctionMode):
    def __init__(self, router: CallRouter):
        super().__init__()
        self.router = router

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        route = ROUTE.get(func)  # one dict lookup for the hundreds of calls that pass through
        if route is None:
            return func(*args, **(kwargs or {}))
        if route == 1:
            return self.router.handle(func, args, kwargs or {})
        return _inside(self, func, args, kwargs or {})


def _unchecked(func: types.FunctionType, name: str, **rebind: Callable) -> types.FunctionType:
    """A copy of a torch.nn.functional composite whose own entry check never hands the call to
    a mode (its globals say `has_torch_function` is False), with some of the functions it calls
    by global name rebound. A copy, not a patch of F: nothing global changes. Its globals are a
    module of their own, registered as `name`: torch.compile finds a frame's globals by module
    name, and under F's name it guarded the rebound functions as F's (an internal error)."""
    scope = types.ModuleType(name)
    scope.__dict__.update(func.__globals__)
    scope.__dict__.update(has_torch_function=lambda *a: False, __name__=name, **rebind)
    sys.modules[name] = scope
    copy = types.FunctionType(func.__code__, scope.__dict__, func.__name__, func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    return copy


def _inside(mode: TorchFunctionMode, func: Callable, args: tuple, kwargs: dict) -> Any:
    """Run F.multi_head_attention_forward with the non-linear calls inside it through the
    router: a mode sees the composite as one call and runs it with the mode off, so its
    softmax or attention would stay float. Its copy here calls the router for exactly those two
    (the only non-linear calls it makes) and runs everything else plainly, with no mode in the
    way of its ~40 other torch calls (running the copy under the mode cost each of them a trip
    through Python). Built once per router, kept on it and holding it weakly (not in a global
    weak dict: torch.compile guarded on that dict's key list, which shrank whenever an earlier
    model's router was collected, and failed with an IndexError now and then)."""
    router = mode.router
    copy = getattr(router, "_composite", None)
    if copy is None:
        ref = weakref.ref(router)

        def sdpa_site(*a: Any, **k: Any) -> Any:
            return ref().handle(F.scaled_dot_product_attention, a, k)

        def softmax_site(*a: Any, **k: Any) -> Any:
            return ref().handle(F.softmax, a, k)

        copy = _unchecked(func, f"{__name__}._composite_{id(router):x}", scaled_dot_product_attention=sdpa_site,
                          softmax=softmax_site)
        router._composite = copy
    return copy(*args, **kwargs)
