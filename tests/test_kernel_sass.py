"""bench/kernel_sass.py: the fused attention's SASS read without a GPU."""
import importlib.util
import sys

import pytest

from bench import kernel_sass
from bench._common import RESULTS

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ ;
        /*0030*/                   STL [R1], R2 ;
        /*0040*/              @P0  BRA `(.L_x_1) ;
        /*0050*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*0060*/                   FADD R3, R3, R2 ;
.L_x_3:
        /*0070*/                   FMUL R3, R3, R2 ;
        /*0080*/              @P1  BRA `(.L_x_3) ;
        /*0090*/                   EXIT ;
"""


def test_loops_are_the_backward_branches_of_the_sass():
    got = kernel_sass.loops(SASS)
    assert got == [{"instructions": 4, "mma": 1, "global_loads": 1, "local_memory": 1},
                   {"instructions": 2, "mma": 0, "global_loads": 0, "local_memory": 0}]


def test_bad_baseline_and_missing_triton_exit_2(tmp_path, capsys, monkeypatch):
    assert kernel_sass.main(["--baseline", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.py: no such file" in err[0]
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert kernel_sass.main(["--out", "kernel_sass_never_written.json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs triton" in err[0]
    assert not (RESULTS / "kernel_sass_never_written.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (not in the test install)")
def test_the_forward_compiles_for_sm90_and_its_full_tiles_do_less():
    from ops.kernels import triton_attention
    got = kernel_sass.compile_kernel(triton_attention, "_attn_fwd", ("bf16", 0, True, True), (1, 1))
    assert got["compiles"]
    row_max_full, row_max_edge, pv_full, pv_edge = (lp["instructions"] for lp in got["loops"])
    assert row_max_full < row_max_edge and pv_full < pv_edge
    assert all(lp["local_memory"] == 0 for lp in got["loops"])
