"""The fused attention's kernels compiled for an H100/H200 (sm_90) without a GPU: per loop, the
SASS instructions of one iteration, and which loops Triton's software pipeliner can compile.
Run: python -m bench.kernel_sass [--baseline OLD.py] (needs `pip install triton`, no GPU)

Why: GPU time is scarce and shared; what a kernel change does to the work per tile (the selects
and conversions around the two matmuls, register spills) and whether a loop pipelines can be
read from the compiled code on any x86-64 machine. The kernels are specialised as the JIT
specialises a contiguous (B, H, L, D) launch (last-dim strides 1, pointers and other strides
divisible by 16), head dim 128, 64 x 64 tiles, 4 warps. With --baseline, the same kernels of
another copy of ops/kernels/triton_attention.py (`git show REV:ops/kernels/triton_attention.py >
old.py`) are compiled beside them. Instruction counts are static: a loop's count is what one
of its iterations issues per thread, not a time.

JSON to bench/results/kernel_sass.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from bench._common import machine, print_table, write_results

KERNELS = {"fwd": "_attn_fwd", "dq": "_attn_bwd_dq", "dkdv": "_attn_bwd_dkdv"}
# (dtype, mask kind 0 none / 1 bool / 2 float, causal, power-of-two scale)
CASES = (("bf16", 0, True, True), ("bf16", 0, True, False), ("fp16", 1, False, True), ("bf16", 2, False, True))
# (MAX_STAGES: the forward's row-max loop, LOOP_STAGES: every other loop)
STAGES = ((1, 1), (3, 1), (1, 2))
POINTERS = {"Mask": None, "Stats": "fp32", "Delta": "fp32", "dK": "fp32", "dV": "fp32", "dQ": "fp32",
            "exp_table": "fp32", "exp_index": "i64", "exp_d": "i64", "rec_table": "fp32", "rec_index": "i64",
            "rec_d": "i64"}
UNIT_STRIDES = ("sqd", "skd", "svd", "sod")
SCALARS = ("exp_index", "exp_d", "rec_index", "rec_d")  # one-element tensors: no alignment promised


def load_kernels(path: Path | None) -> ModuleType:
    if path is None:
        from ops.kernels import triton_attention
        return triton_attention
    spec = importlib.util.spec_from_file_location(f"baseline_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def signature(fn, dtype: str, mask: int, consts: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch as the JIT specialises it."""
    sig, constexprs, attrs = {}, {k: v for k, v in consts.items() if k in fn.arg_names}, {}
    for name in UNIT_STRIDES:
        if name in fn.arg_names:
            constexprs[name] = 1
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS or name in ("Q", "K", "V", "O", "dO"):
            elem = POINTERS.get(name) or dtype
            if name == "Mask":
                elem = {0: dtype, 1: "u8", 2: dtype}[mask]
            sig[name] = "*" + elem
            if name not in SCALARS:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        else:  # strides and sizes
            sig[name] = "i32"
            if name[0] == "s" and not name.startswith("sm"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def constants(mod: ModuleType, kernel: str, dtype: str, mask: int, causal: bool, pow2: bool,
              stages: tuple[int, int]) -> dict:
    rounding = {"fp32": 0, "fp16": 1, "bf16": 2}[dtype]
    c = dict(QMIN=-128, QMAX=127, RQMIN=-128, RQMAX=127, ZMIN=-100.0, NMAX=30, POW2=pow2, CAUSAL=causal, MASK=mask,
             ROUND=rounding, MROUND=rounding if mask == 2 else 0, IEEE=dtype == "fp32", D=128, BLOCK_M=64,
             BLOCK_N=64, MAX_STAGES=stages[0], LOOP_STAGES=stages[1])
    if "DEFER" in getattr(mod, kernel).arg_names:
        c["DEFER"] = mask == 0  # as triton_attention.forward sets it (a positive scale)
    return c


def sass_of(cubin: bytes) -> str:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), f.name], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> list[dict]:
    """Every loop (a branch back to an earlier label), in code order: instructions per
    iteration, tensor-core instructions, global loads and local-memory (spill) accesses."""
    where, insns, pending = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            addr = int(ins.group(1), 16)
            where.update((p, addr) for p in pending)
            pending = []
            insns.append((addr, ins.group(2)))
    out = []
    for addr, text in insns:
        target = re.search(r"BRA\s+(?:`\()?(\.L_x_\d+)", text)
        if target and where.get(target.group(1), addr) < addr:
            body = [t for a, t in insns if where[target.group(1)] <= a <= addr]
            out.append({"instructions": len(body), "mma": sum("MMA" in t for t in body),
                        "global_loads": sum("LDG" in t for t in body),
                        "local_memory": sum("LDL" in t or "STL" in t for t in body)})
    return out


def compile_kernel(mod: ModuleType, kernel: str, case: tuple, stages: tuple[int, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    dtype, mask, causal, pow2 = case
    fn = getattr(mod, kernel)
    sig, constexprs, attrs = signature(fn, dtype, mask, constants(mod, kernel, dtype, mask, causal, pow2, stages))
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    with tempfile.TemporaryFile(mode="w+") as log:  # MLIR writes its diagnostics to fd 2
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options=dict(num_warps=4, num_stages=max(stages), enable_fp_fusion=False))
        except Exception as exc:  # the pipeliner's refusals: RuntimeError, the reason on fd 2
            failed = exc
        else:
            failed = None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failed is not None:
            log.seek(0)
            reasons = [ln.split("error:", 1)[1].strip() for ln in log if "error:" in ln and "Failures have" not in ln]
            return {"compiles": False, "error": (reasons or [f"{type(failed).__name__}: {failed}"])[0][:200]}
    sass = sass_of(compiled.asm["cubin"])
    return {"compiles": True, "instructions": sum(1 for _ in re.finditer(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M)),
            "loops": loops(sass)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="another copy of ops/kernels/triton_attention.py to compile beside")
    ap.add_argument("--out", default="kernel_sass.json", help="JSON file name under bench/results")
    args = ap.parse_args(argv)
    if args.baseline is not None and not args.baseline.is_file():
        print(f"bench.kernel_sass: error: --baseline {args.baseline}: no such file", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton
    except ImportError:
        print("bench.kernel_sass: error: needs triton (pip install triton==3.6.0); no GPU is needed", file=sys.stderr)
        return 2
    versions = {"this tree": load_kernels(None)}
    if args.baseline is not None:
        versions = {"baseline": load_kernels(args.baseline), **versions}
    rows = []
    for kname, kernel in KERNELS.items():
        for case in CASES:
            for stages in STAGES:
                if kname != "fwd" and stages[0] != 1:
                    continue  # MAX_STAGES is the forward's row-max loop alone
                for label, mod in versions.items():
                    got = compile_kernel(mod, kernel, case, stages)
                    rows.append({"kernel": kname, "version": label, "dtype": case[0],
                                 "mask": ("none", "bool", "float")[case[1]], "causal": case[2], "pow2_scale": case[3],
                                 "max_stages": stages[0], "loop_stages": stages[1], **got})
                    print(rows[-1], flush=True)
    doc = {"benchmark": "kernel_sass", "machine": machine(), "triton": triton.__version__, "target": "cuda sm_90",
           "tiles": "64 x 64, 4 warps, head dim 128", "baseline": str(args.baseline) if args.baseline else None,
           "rows": rows}
    print_table(["kernel", "version", "case", "stages", "compiles", "instructions", "per iteration (spills)"],
                [[r["kernel"], r["version"], f"{r['dtype']} {r['mask']}{' causal' if r['causal'] else ''}"
                  f"{'' if r['pow2_scale'] else ' scale'}", f"{r['max_stages']}/{r['loop_stages']}",
                  "yes" if r["compiles"] else "no", str(r.get("instructions", "-")),
                  " ".join(f"{lp['instructions']}({lp['local_memory']})" for lp in r.get("loops", []))
                  or r.get("error", "")[:60]] for r in rows])
    print(f"-> {write_results(args.out, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
