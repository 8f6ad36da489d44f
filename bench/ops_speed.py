"""Speed of LUTGELU / LUTSiLU against native F.gelu / F.silu. Run: python -m bench.ops_speed

Same process, same tensor, median of repeated runs (on CUDA, of batches of back-to-back calls);
forward and forward+backward; 2^16, 2^20, 2^24 and 2^26 elements; float32 and bfloat16. On CUDA, also the achieved memory bandwidth (bytes read
+ written by the forward, over its time) against a device-to-device copy of the same tensor,
measured here, and the datasheet's ~3 TB/s. Results are merged into
bench/results/ops_speed.json under the device's key, so CPU and GPU runs sit side by side.

    python -m bench.ops_speed [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench._common import RESULTS, ints_in, machine, positive_int, print_table, timer, write_results

from ops.nn import LUTGELU, LUTSiLU

# LUT time / native time, at these sizes and above (the QAT speed issue's targets)
TARGETS = {"cpu": {"forward": (1.2, 20)},
           "cuda": {"forward": (1.1, 24), "forward+backward": (1.3, 24)}}
DATASHEET_BW = 3.0e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="2^20 elements, float32, few repetitions")
    ap.add_argument("--sizes", type=ints_in(1, 30), default="16,20,24,26", help="log2 of the element counts")
    ap.add_argument("--reps", type=positive_int)
    args = ap.parse_args()
    dev = args.device
    sizes = [20] if args.quick else args.sizes
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    reps = args.reps or (3 if args.quick else (10 if dev == "cuda" else 5))
    rows, recs = [], []
    for log2n in sizes:
        n = 1 << log2n
        for dtype in dtypes:
            torch.manual_seed(0)
            x = (torch.randn(n, device=dev) * 3).to(dtype)
            grad = torch.ones_like(x)
            copy_s = timer(dev, lambda: torch.empty_like(x).copy_(x), reps)
            for name, native, lut in (("gelu", F.gelu, LUTGELU().to(dev)), ("silu", F.silu, LUTSiLU().to(dev))):
                r = reps * (8 if log2n <= 20 else 1)  # small tensors: more samples, the same wall time
                for mode in ("forward", "forward+backward"):
                    if mode == "forward":
                        with torch.no_grad():
                            t_nat = timer(dev, lambda: native(x), r)
                            t_lut = timer(dev, lambda: lut(x), r)
                    else:
                        xr = x.detach().requires_grad_(True)
                        t_nat = timer(dev, lambda: native(xr).backward(grad), r)
                        t_lut = timer(dev, lambda: lut(xr).backward(grad), r)
                    ratio = t_lut / t_nat
                    rec = {"op": name, "elements": n, "log2_elements": log2n, "dtype": str(dtype).replace("torch.", ""),
                           "mode": mode, "native_ms": t_nat * 1e3, "lut_ms": t_lut * 1e3, "ratio": ratio}
                    if dev == "cuda" and mode == "forward":
                        rec["copy_bandwidth_tbs"] = 2 * n * x.element_size() / copy_s / 1e12
                        with torch.no_grad():  # one call alone: includes the launch overhead
                            rec_single = (timer(dev, lambda: native(x), reps, batch=1),
                                          timer(dev, lambda: lut(x), reps, batch=1))
                        nbytes = 2 * n * x.element_size()
                        rec.update(lut_bandwidth_tbs=nbytes / t_lut / 1e12, native_bandwidth_tbs=nbytes / t_nat / 1e12,
                                   lut_fraction_of_datasheet=nbytes / t_lut / DATASHEET_BW,
                                   single_call_native_ms=rec_single[0] * 1e3, single_call_lut_ms=rec_single[1] * 1e3)
                    recs.append(rec)
                    bw = f"{rec['lut_bandwidth_tbs']:.2f}" if "lut_bandwidth_tbs" in rec else "-"
                    rows.append([name, f"2^{log2n}", rec["dtype"], mode, f"{t_nat * 1e3:.3f}", f"{t_lut * 1e3:.3f}",
                                 f"{ratio:.2f}", bw])
    print_table(["op", "n", "dtype", "mode", "native ms", "LUT ms", "ratio", "LUT TB/s"], rows)
    key = "cpu" if dev == "cpu" else "cuda"
    summary = {}
    for mode, (target, from_log2) in TARGETS[key].items():
        held = [r for r in recs if r["mode"] == mode and r["log2_elements"] >= from_log2]
        if held:
            worst = max(r["ratio"] for r in held)
            summary[mode] = {"worst_ratio": worst, "from_log2_elements": from_log2, "target": target,
                             "target_met": worst <= target}
            print(f"worst LUT/native {mode} ratio at 2^{from_log2} and above: {worst:.2f} (target <= {target})")
    if dev == "cuda":
        summary["device_name"] = torch.cuda.get_device_name()
        summary["copy_bandwidth_tbs"] = max(r["copy_bandwidth_tbs"] for r in recs if "copy_bandwidth_tbs" in r)
    path = RESULTS / "ops_speed.json"
    doc = json.loads(path.read_text()) if path.exists() else {"benchmark": "ops_speed"}
    doc[key] = {"machine": machine(), "torch": torch.__version__, "quick": args.quick, "reps": reps,
                "rows": recs, "summary": summary}
    print(f"wrote {write_results('ops_speed.json', doc)}")


if __name__ == "__main__":
    main()
