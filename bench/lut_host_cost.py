"""Host time of one LUT call on CUDA: what a call costs the CPU, which bounds a small tensor's
time. Run: python -m bench.lut_host_cost (CUDA only)

Times many back-to-back calls on a 4096-element tensor (the GPU is never the bottleneck there)
with the host clock, synchronizing only before and after: microseconds per call, LUTGELU
against F.gelu, no-grad forward and forward+backward, float32 and bfloat16; LUTGELU through
its default path (the C++ operator where ops/kernels/cuda_kernel.py builds it) and through the Triton
kernels (`cuda_kernel.switched_off()`), in the same process. JSON to
bench/results/lut_host_cost.json.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench._common import machine, print_table, write_results
from ops.kernels import cuda_kernel
from ops.nn import LUTGELU


def host_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


def times(lut, x: torch.Tensor, xr: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """Host us per no-grad forward and per forward+backward of `lut`."""
    with torch.no_grad():
        fwd = host_us(lambda: lut(x))
    return fwd, host_us(lambda: lut(xr).backward(g), 500)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("lut_host_cost needs CUDA")
    lut = LUTGELU().cuda()
    print(f"CUDA LUT path: {cuda_kernel.status()}")
    rows, recs = [], []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4096, device="cuda").to(dtype)
        xr = x.detach().requires_grad_(True)
        g = torch.ones_like(x)
        with torch.no_grad():
            nat_fwd = host_us(lambda: F.gelu(x))
        nat_both = host_us(lambda: F.gelu(xr).backward(g), 500)
        lut_times = times(lut, x, xr, g)
        with cuda_kernel.switched_off():
            triton_times = times(lut, x, xr, g)
        for k, mode in enumerate(("forward", "forward+backward")):
            recs.append({"dtype": str(dtype).replace("torch.", ""), "mode": mode,
                         "native_us": (nat_fwd, nat_both)[k], "lut_us": lut_times[k], "lut_triton_us": triton_times[k]})
            rows.append([recs[-1]["dtype"], mode, f"{recs[-1]['native_us']:.1f}", f"{lut_times[k]:.1f}",
                         f"{triton_times[k]:.1f}"])
    print_table(["dtype", "mode", "native us/call", "LUT us/call", "LUT via Triton us/call"], rows)
    doc = {"machine": machine(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda_path": cuda_kernel.status(), "rows": recs}
    print(f"wrote {write_results('lut_host_cost.json', doc)}")


if __name__ == "__main__":
    main()
