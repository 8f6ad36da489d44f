"""Scaled dot-product attention with the softmax through the tables, fused in Triton (forward
and backward), on CUDA: tiles of Q K^T in registers, never the L x S matrix.

Why: written out (ops.convert.call_sites.sdpa) attention with the LUT softmax materialises the
scores, the numerators and the probabilities, O(L * S) memory and traffic per head, where
torch's SDPA runs flash attention; a 0.5 B Llama at 4 x 2048 tokens then trained at 3.2x the
float model's peak memory (issue #28).

What it computes is the written-out path's arithmetic, tile by tile:
- scores s = (q * scale) k^T for a power-of-two scale (q * scale is exact), else (q k^T) * scale,
  rounded to the inputs' dtype as the written-out matmul's output is; the causal mask (top-left
  aligned) and a bool mask set -inf, a float mask is added (rounded to the promoted dtype);
- the softmax of ops.nn.softmax.LUTSoftmax: z = s - rowmax (NaN -> -inf, clamped at Z_MIN),
  n = floor(-z / ln 2), r = z + n ln 2, e = exp_table(r) * 2^-n (0 where n > N_MAX), the
  row sum l, and 1/l through the range-reduced reciprocal table R;
- O = (sum_j e_j v_j) * R.
The row max must be final before any table input exists (the exp table is not multiplicative,
so flash attention's running rescale would change the table's inputs), so the forward makes two
passes over the keys: the max first, then exp, sum and P V. The table inputs are then the
written-out path's wherever the two matmuls round the scores alike; the sums (l, P V) run in
another order and P is rounded to the dtype before the matmul there and after it here, so the
outputs differ from the written-out path by float rounding (tests/test_gpu.py states the
tolerance, and checks bit-equality where the scores and sums are exact).
Without a mask tensor each loop of the forward and of dQ runs first over the tiles that need
no mask (keys inside S, before the causal diagonal), then over the edge tiles that do, so that
most tiles skip the selects (python -m bench.kernel_sass counts what that saves); without a
mask tensor the row-max pass also keeps the float32 dot products and rounds (and scales) only
the row's max, which is the max of the rounded scores since both steps are monotone.

Backward: the straight-through gradient autograd takes through the written-out ops: with
dP = dO V^T, p = e R and l = sum e, de = R dP + R'(l) sum_k dP_k e_k, and sum_k dP_k e_k =
(dO . O) / R, so delta = R'(l) (dO . O) / R per row (R'(l) = -1/l^2, the reciprocal table's exact
derivative, 0 where the table's straight-through mask or the clamp of an empty row pass none); dS = g (R dP + delta) with
g = exp(r) 2^-n the exp table's derivative (0 where the weight is 0); dQ = dS K scale,
dK = dS^T Q scale, dV = P^T dO (P recomputed from the saved row max and R). dK and dV are
computed per query head and summed over a key head's group.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from gqa_lut.quantization import int_range
from ops.kernels import triton_lut

LN2 = math.log(2.0)
HEAD_DIMS = (16, 32, 64, 128)  # head dims the kernels are built for (others take the written-out path)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ENABLED = True  # False: the written-out path runs on CUDA too (tests and benchmarks compare the two)
CALLS = 0  # fused calls made in this process (tests check which path ran)
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

if triton_lut.AVAILABLE:
    import triton
    import triton.language as tl

    from ops.kernels.triton_lut import _pow2, _reduced_lookup, libdevice

    @triton.jit
    def _round(x, ROUND: tl.constexpr):
        """x (float32) rounded to the dtype numbered ROUND (0 float32, 1 float16, 2 bfloat16)."""
        if ROUND == 1:
            x = x.to(tl.float16).to(tl.float32)
        elif ROUND == 2:
            x = x.to(tl.bfloat16).to(tl.float32)
        return x

    @triton.jit
    def _scores(q, k_ptrs, mask_ptrs, offs_m, offs_n, L, S, scale, POW2: tl.constexpr, CAUSAL: tl.constexpr,
                MASK: tl.constexpr, ROUND: tl.constexpr, MROUND: tl.constexpr, IEEE: tl.constexpr,
                EDGE: tl.constexpr, RAW: tl.constexpr):
        """One (BLOCK_M, BLOCK_N) tile of the masked scores, as the written-out path has them.
        EDGE: the tile may hold keys past S, rows past L or keys after a causal row, which then
        get -inf; a tile inside all three skips those selects (its rows past L, if any, are never
        stored). RAW: the float32 dot product before the dtype's rounding and the scale (the row
        max takes them once per row: both are monotone)."""
        k = tl.load(k_ptrs, mask=offs_n[None, :] < S, other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if not RAW:
            s = _round(s, ROUND)
            if not POW2:
                s = _round(s * scale, ROUND)
        if EDGE and CAUSAL:
            s = tl.where(offs_n[None, :] > offs_m[:, None], float("-inf"), s)
        if EDGE or MASK != 0:
            inside = (offs_n[None, :] < S) & (offs_m[:, None] < L)  # rows past L read no mask and weigh 0
            if MASK == 1:  # bool: keep where True
                keep = tl.load(mask_ptrs, mask=inside, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            elif MASK == 2:  # float: added
                add = tl.load(mask_ptrs, mask=inside, other=0.0).to(tl.float32)
                s = _round(s + add, MROUND)
            if EDGE:
                s = tl.where(inside, s, float("-inf"))
        return s

    @triton.jit
    def _full_tiles(first_row, S, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
        """Where the tiles of keys that need no mask end for a block of queries from first_row:
        keys inside S and, causal, before every row of the block. With a mask tensor every
        tile loads it anyway, and the split saved nothing in the compiled code (bench.kernel_sass):
        all tiles are edge tiles then."""
        full = S * 0
        if MASK == 0:
            full = S // BLOCK_N * BLOCK_N
            if CAUSAL:
                full = tl.minimum(full, first_row // BLOCK_N * BLOCK_N)
        return full

    @triton.jit
    def _numerators(s, top, table_ptr, exp_row, exp_scale, QMIN: tl.constexpr, QMAX: tl.constexpr,
                    ZMIN: tl.constexpr, NMAX: tl.constexpr, GRAD: tl.constexpr):
        """LUTSoftmax.numerators on a tile: exp(s - top) through the exp table after range
        reduction, and (GRAD) the exp table's straight-through derivative times 2^-n."""
        z = s - top[:, None]
        z = tl.where(z == z, z, float("-inf"))
        z = tl.maximum(z, ZMIN)
        n = tl.floor(z * (-1.0 / 0.6931471805599453))
        r = z + n * 0.6931471805599453
        code = tl.minimum(tl.maximum(libdevice.rint(r * exp_scale), QMIN), QMAX)
        t = tl.load(table_ptr + exp_row + (code - QMIN).to(tl.int32))
        shift = _pow2(-(n.to(tl.int32)))
        live = n <= NMAX
        e = tl.where(live, t * shift, 0.0)
        if GRAD:
            rs = r * exp_scale
            inside = (rs >= QMIN - 0.5) & (rs <= QMAX + 0.5)
            g = tl.where(live & inside, libdevice.exp(r) * shift, 0.0)
        else:
            g = e
        return e, g

    @triton.jit
    def _heads(H, GROUP):
        """This program's (batch x query head) row, its batch, query head and key head."""
        bh = tl.program_id(1)
        h = bh % H
        return bh, bh // H, h, h // GROUP

    @triton.jit
    def _exp_grid(exp_index, exp_d, QMIN: tl.constexpr, QMAX: tl.constexpr):
        """The exp table's row offset in the expanded table and its input step 2^d."""
        return tl.load(exp_index).to(tl.int64) * (QMAX - QMIN + 1), tl.exp2(tl.load(exp_d).to(tl.float32))

    @triton.jit
    def _load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, L, scale, POW2: tl.constexpr):
        """A (BLOCK_M, D) tile of queries, times the scale where it is a power of two (exact)."""
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=offs_m[:, None] < L, other=0.0)
        if POW2:
            q = (q.to(tl.float32) * scale).to(Q.dtype.element_ty)
        return q

    @triton.jit
    def _fwd_tile(q, k_base, v_base, m_base, offs_n, offs_m, l, acc, top, exp_table, exp_row, exp_scale, skn, svn, smn,
                  L, S, scale, QMIN: tl.constexpr, QMAX: tl.constexpr, ZMIN: tl.constexpr, NMAX: tl.constexpr,
                  POW2: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, ROUND: tl.constexpr,
                  MROUND: tl.constexpr, IEEE: tl.constexpr, EDGE: tl.constexpr):
        """The forward's second pass on one tile of keys: the numerators, their row sums and P V."""
        s = _scores(q, k_base + offs_n[None, :] * skn, m_base + offs_n[None, :] * smn, offs_m, offs_n, L, S, scale,
                    POW2, CAUSAL, MASK, ROUND, MROUND, IEEE, EDGE, False)
        e, g = _numerators(s, top, exp_table, exp_row, exp_scale, QMIN, QMAX, ZMIN, NMAX, False)
        l += tl.sum(e, axis=1)
        v = tl.load(v_base + offs_n[:, None] * svn, mask=offs_n[:, None] < S, other=0.0)
        if IEEE:
            acc += tl.dot(e.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(e.to(v.dtype), v)
        return l, acc

    @triton.jit
    def _attn_fwd(Q, K, V, Mask, O, Stats, exp_table, exp_index, exp_d, rec_table, rec_index, rec_d,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                  sob, soh, som, sod, H, GROUP, L, S, scale,
                  QMIN: tl.constexpr, QMAX: tl.constexpr, RQMIN: tl.constexpr, RQMAX: tl.constexpr,
                  ZMIN: tl.constexpr, NMAX: tl.constexpr, POW2: tl.constexpr, CAUSAL: tl.constexpr,
                  MASK: tl.constexpr, ROUND: tl.constexpr, MROUND: tl.constexpr, IEEE: tl.constexpr,
                  DEFER: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  MAX_STAGES: tl.constexpr, LOOP_STAGES: tl.constexpr):
        pid_m = tl.program_id(0)
        bh, b, h, hk = _heads(H, GROUP)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n0 = tl.arange(0, BLOCK_N)
        q = _load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, L, scale, POW2)
        k_base = K + b * skb + hk * skh + offs_d[:, None] * skd
        v_base = V + b * svb + hk * svh + offs_d[None, :] * svd
        m_base = Mask + b * smb + h * smh + offs_m[:, None] * smm
        exp_row, exp_scale = _exp_grid(exp_index, exp_d, QMIN, QMAX)
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        full = _full_tiles(pid_m * BLOCK_M, S, BLOCK_N, CAUSAL, MASK)
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for start in tl.range(0, full, BLOCK_N, num_stages=MAX_STAGES):
            offs_n = start + offs_n0
            s = _scores(q, k_base + offs_n[None, :] * skn, m_base + offs_n[None, :] * smn, offs_m, offs_n, L, S, scale,
                        POW2, CAUSAL, MASK, ROUND, MROUND, IEEE, False, DEFER)
            top = tl.maximum(top, tl.max(s, axis=1))
        for start in tl.range(full, hi, BLOCK_N, num_stages=MAX_STAGES):
            offs_n = start + offs_n0
            s = _scores(q, k_base + offs_n[None, :] * skn, m_base + offs_n[None, :] * smn, offs_m, offs_n, L, S, scale,
                        POW2, CAUSAL, MASK, ROUND, MROUND, IEEE, True, DEFER)
            top = tl.maximum(top, tl.max(s, axis=1))
        if DEFER:  # the max of the rounded scores is the rounded max
            top = _round(top, ROUND)
            if not POW2:
                top = _round(top * scale, ROUND)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in tl.range(0, full, BLOCK_N, num_stages=LOOP_STAGES):
            l, acc = _fwd_tile(q, k_base, v_base, m_base, start + offs_n0, offs_m, l, acc, top, exp_table, exp_row,
                               exp_scale, skn, svn, smn, L, S, scale, QMIN, QMAX, ZMIN, NMAX, POW2, CAUSAL, MASK,
                               ROUND, MROUND, IEEE, False)
        for start in tl.range(full, hi, BLOCK_N, num_stages=LOOP_STAGES):
            l, acc = _fwd_tile(q, k_base, v_base, m_base, start + offs_n0, offs_m, l, acc, top, exp_table, exp_row,
                               exp_scale, skn, svn, smn, L, S, scale, QMIN, QMAX, ZMIN, NMAX, POW2, CAUSAL, MASK,
                               ROUND, MROUND, IEEE, True)
        R = _reduced_lookup(l, rec_table, rec_index, rec_d, RQMIN, RQMAX, False)  # RangeReducedLUT('reciprocal')
        out = acc * R[:, None]
        rows = offs_m < L
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=rows[:, None])
        stat = Stats + bh.to(tl.int64) * 3 * L + offs_m
        tl.store(stat, top, mask=rows)
        tl.store(stat + L, l, mask=rows)
        tl.store(stat + 2 * L, R, mask=rows)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, Mask, dO, Stats, Delta, dK, dV, exp_table, exp_index, exp_d,
                       sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                       sob, soh, som, sod, H, GROUP, L, S, scale,
                       QMIN: tl.constexpr, QMAX: tl.constexpr, ZMIN: tl.constexpr, NMAX: tl.constexpr,
                       POW2: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, ROUND: tl.constexpr,
                       MROUND: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, MAX_STAGES: tl.constexpr, LOOP_STAGES: tl.constexpr):
        """dK and dV of one block of keys for one query head (float32, summed over a group
        by the caller): a loop over the query blocks that see these keys."""
        pid_n = tl.program_id(0)
        bh, b, h, hk = _heads(H, GROUP)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        offs_m0 = tl.arange(0, BLOCK_M)
        kT_ptrs = K + b * skb + hk * skh + offs_d[:, None] * skd + offs_n[None, :] * skn  # (D, BLOCK_N)
        vT = tl.load(V + b * svb + hk * svh + offs_d[:, None] * svd + offs_n[None, :] * svn,
                     mask=offs_n[None, :] < S, other=0.0)  # (D, BLOCK_N)
        exp_row, exp_scale = _exp_grid(exp_index, exp_d, QMIN, QMAX)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
        stat = Stats + bh.to(tl.int64) * 3 * L
        # one loop with every mask: split like the forward's, the three loops' live values spill
        # registers (checked in the SASS for sm_90)
        for start in tl.range(lo, L, BLOCK_M, num_stages=LOOP_STAGES):
            offs_m = start + offs_m0
            rows = offs_m < L
            q = _load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, L, scale, POW2)
            do = tl.load(dO + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                         mask=rows[:, None], other=0.0)
            top = tl.load(stat + offs_m, mask=rows, other=0.0)
            R = tl.load(stat + 2 * L + offs_m, mask=rows, other=0.0)
            delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=rows, other=0.0)
            s = _scores(q, kT_ptrs, Mask + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn,
                        offs_m, offs_n, L, S, scale, POW2, CAUSAL, MASK, ROUND, MROUND, IEEE, True, False)
            e, g = _numerators(s, top, exp_table, exp_row, exp_scale, QMIN, QMAX, ZMIN, NMAX, True)
            p = (e * R[:, None]).to(dO.dtype.element_ty)
            if IEEE:
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dp = tl.dot(do, vT, input_precision="ieee")
            else:
                dv += tl.dot(tl.trans(p), do)
                dp = tl.dot(do, vT)
            dp = _round(dp, ROUND)  # dO V^T as the written-out matmul rounds it
            ds = tl.where(g != 0.0, g * (R[:, None] * dp + delta[:, None]), 0.0)
            ds = tl.where(rows[:, None], ds, 0.0).to(Q.dtype.element_ty)
            if IEEE:
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
            else:
                dk += tl.dot(tl.trans(ds), q)
        if not POW2:
            dk = dk * scale
        keys = offs_n < S
        out = bh.to(tl.int64) * S * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(dK + out, dk, mask=keys[:, None])
        tl.store(dV + out, dv, mask=keys[:, None])

    @triton.jit
    def _dq_tile(q, do, top, R, delta, k_base, v_base, m_base, offs_n, offs_m, offs_d, dq, exp_table, exp_row, exp_scale,
                 skn, skd, svn, svd, smn, L, S, scale, QMIN: tl.constexpr, QMAX: tl.constexpr, ZMIN: tl.constexpr,
                 NMAX: tl.constexpr, POW2: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                 ROUND: tl.constexpr, MROUND: tl.constexpr, IEEE: tl.constexpr, EDGE: tl.constexpr):
        """One tile of keys' share of a block of queries' dQ."""
        s = _scores(q, k_base + offs_d[:, None] * skd + offs_n[None, :] * skn, m_base + offs_n[None, :] * smn,
                    offs_m, offs_n, L, S, scale, POW2, CAUSAL, MASK, ROUND, MROUND, IEEE, EDGE, False)
        e, g = _numerators(s, top, exp_table, exp_row, exp_scale, QMIN, QMAX, ZMIN, NMAX, True)
        vT = tl.load(v_base + offs_d[:, None] * svd + offs_n[None, :] * svn, mask=offs_n[None, :] < S, other=0.0)
        k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=offs_n[:, None] < S, other=0.0)
        if IEEE:
            dp = tl.dot(do, vT, input_precision="ieee")
        else:
            dp = tl.dot(do, vT)
        dp = _round(dp, ROUND)
        ds = tl.where(g != 0.0, g * (R[:, None] * dp + delta[:, None]), 0.0).to(q.dtype)
        if IEEE:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds, k)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, Mask, dO, Stats, Delta, dQ, exp_table, exp_index, exp_d,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                     sob, soh, som, sod, H, GROUP, L, S, scale,
                     QMIN: tl.constexpr, QMAX: tl.constexpr, ZMIN: tl.constexpr, NMAX: tl.constexpr,
                     POW2: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, ROUND: tl.constexpr,
                     MROUND: tl.constexpr, IEEE: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, MAX_STAGES: tl.constexpr, LOOP_STAGES: tl.constexpr):
        """dQ of one block of queries: a loop over the keys they see."""
        pid_m = tl.program_id(0)
        bh, b, h, hk = _heads(H, GROUP)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n0 = tl.arange(0, BLOCK_N)
        rows = offs_m < L
        q = _load_q(Q, b, h, offs_m, offs_d, sqb, sqh, sqm, sqd, L, scale, POW2)
        do = tl.load(dO + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
                     mask=rows[:, None], other=0.0)
        stat = Stats + bh.to(tl.int64) * 3 * L
        top = tl.load(stat + offs_m, mask=rows, other=0.0)
        R = tl.load(stat + 2 * L + offs_m, mask=rows, other=0.0)
        delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=rows, other=0.0)
        exp_row, exp_scale = _exp_grid(exp_index, exp_d, QMIN, QMAX)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        m_base = Mask + b * smb + h * smh + offs_m[:, None] * smm
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        hi = S
        if CAUSAL:
            hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)
        full = _full_tiles(pid_m * BLOCK_M, S, BLOCK_N, CAUSAL, MASK)
        for start in tl.range(0, full, BLOCK_N, num_stages=LOOP_STAGES):
            dq = _dq_tile(q, do, top, R, delta, k_base, v_base, m_base, start + offs_n0, offs_m, offs_d, dq, exp_table,
                          exp_row, exp_scale, skn, skd, svn, svd, smn, L, S, scale, QMIN, QMAX, ZMIN, NMAX, POW2,
                          CAUSAL, MASK, ROUND, MROUND, IEEE, False)
        for start in tl.range(full, hi, BLOCK_N, num_stages=LOOP_STAGES):
            dq = _dq_tile(q, do, top, R, delta, k_base, v_base, m_base, start + offs_n0, offs_m, offs_d, dq, exp_table,
                          exp_row, exp_scale, skn, skd, svn, svd, smn, L, S, scale, QMIN, QMAX, ZMIN, NMAX, POW2,
                          CAUSAL, MASK, ROUND, MROUND, IEEE, True)
        dq = dq * scale
        tl.store(dQ + bh.to(tl.int64) * L * D + offs_m[:, None] * D + offs_d[None, :], dq, mask=rows[:, None])


def _strides4(t: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


class Tables:
    """The exp and reciprocal tables a LUTSoftmax holds, as the kernels read them (device
    tensors: a scale index and d, the expanded table), and the constants of its arithmetic."""

    def __init__(self, softmax, zmin: float, nmax: int) -> None:
        exp, rec = softmax.exp, softmax.reciprocal.lut
        self.exp = (exp.table_real, exp.scale_index.reshape(1), exp.d_current.reshape(1))
        self.rec = (rec.table_real, rec.scale_index.reshape(1), rec.d_current.reshape(1))
        self.rec_lut = rec  # its slopes and breakpoints, for the reciprocal's backward
        self.qmin, self.qmax = int_range(exp.table.input_bits)
        self.rqmin, self.rqmax = int_range(rec.table.input_bits)
        self.zmin, self.nmax = zmin, nmax


def _meta(q: torch.Tensor, mask: Optional[torch.Tensor], causal: bool, scale: float) -> dict:
    if mask is None:
        kind, mround = 0, 0
    elif mask.dtype == torch.bool:
        kind, mround = 1, 0
    else:
        kind, mround = 2, _ROUND[torch.promote_types(q.dtype, mask.dtype)]
    return dict(POW2=math.frexp(scale)[0] == 0.5, CAUSAL=causal, MASK=kind, ROUND=_ROUND[q.dtype], MROUND=mround,
                IEEE=q.dtype == torch.float32, D=q.shape[-1])


# tile sizes, warps and software-pipeline stages per (pass, head dim): "fwd", "bwd" (both
# backward kernels); MAX_STAGES for the forward's row-max loop, LOOP_STAGES for every other loop.
# The best of a sweep on an H200 (bf16, causal, 4 x 16 heads x 2048 x 128; BLOCK_M and BLOCK_N
# 64/128, 4/8 warps, 1-3 stages for the whole kernel): 64 x 64 tiles with 4 warps both ways;
# Triton 3.6 could not pipeline the kernels whole (see _run).
BLOCKS = {(p, d): dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, MAX_STAGES=1, LOOP_STAGES=1)
          for p in ("fwd", "bwd") for d in HEAD_DIMS}


def _blocks(d: int, backward: bool) -> dict:
    return BLOCKS[("bwd" if backward else "fwd", d)]


_UNPIPELINED: set = set()  # specialisations whose software pipelining Triton failed to compile


def _run(kernel, grid, args: tuple, meta: dict) -> None:
    """Launch with the tuned stages; where Triton's pipeliner cannot compile a specialisation
    (Triton 3.6 on Hopper: "pipeliner doesn't know how to predicate this op" for some dtypes
    and masks) launch it unpipelined, and remember that."""
    stages = ("num_stages", "MAX_STAGES", "LOOP_STAGES")
    key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in meta.items())))
    if any(meta.get(k, 1) > 1 for k in stages) and key not in _UNPIPELINED:
        try:
            kernel[grid](*args, **meta, enable_fp_fusion=False)
            return
        except RuntimeError:
            _UNPIPELINED.add(key)
    kernel[grid](*args, **{**meta, **dict.fromkeys(stages, 1)}, enable_fp_fusion=False)


def _mask_view(mask: Optional[torch.Tensor], q: torch.Tensor, S: int) -> Optional[torch.Tensor]:
    """The mask broadcast to (B, H, L, S) without a copy (a bool as bytes)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask.expand(q.shape[0], q.shape[1], q.shape[2], S)


def _common(q, k, v, mask, scale: float) -> tuple[tuple, dict]:
    """The strides of q, k, v and the (broadcast) mask, and the shape arguments every kernel takes."""
    H, L = q.shape[1], q.shape[2]
    strides = (*q.stride(), *k.stride(), *v.stride(), *_strides4(mask))
    return strides, dict(H=H, GROUP=H // k.shape[1], L=L, S=k.shape[2], scale=scale)


def forward(q, k, v, mask, tables: Tables, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, stats) with stats (B * H, 3, L) float32: per row the max, the sum l and R = 1/l."""
    B, H, L, D = q.shape
    o = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    stats = torch.empty(B * H, 3, L, dtype=torch.float32, device=q.device)
    m = _mask_view(mask, q, k.shape[2])
    strides, shape = _common(q, k, v, m, scale)
    meta, blocks = _meta(q, mask, causal, scale), _blocks(D, False)
    grid = (triton.cdiv(L, blocks["BLOCK_M"]), B * H)
    _run(_attn_fwd, grid, (q, k, v, m if m is not None else q, o, stats, *tables.exp, *tables.rec, *strides,
                           *o.stride(), *shape.values()),
         dict(QMIN=tables.qmin, QMAX=tables.qmax, RQMIN=tables.rqmin, RQMAX=tables.rqmax, ZMIN=tables.zmin,
              NMAX=tables.nmax, DEFER=mask is None and scale > 0, **meta, **blocks))
    return o, stats


def backward(do, q, k, v, mask, o, stats, tables: Tables, scale: float, causal: bool):
    """(dQ, dK, dV) in the inputs' dtypes."""
    B, H, L, D = q.shape
    S, HK = k.shape[2], k.shape[1]
    do = do.contiguous() if do.stride(-1) != 1 else do
    l, R = stats[:, 1], stats[:, 2]
    dot = (do.float() * o.float()).sum(-1).reshape(B * H, L)
    # R'(l) (dO . O) / R through RangeReducedLUT('reciprocal')'s own backward kernel: its exact
    # derivative at l's mantissa, 0 where the straight-through mask or the clamp of an empty row pass none
    rec = tables.rec_lut
    delta = triton_lut.range_reduced_backward(dot / R, l.contiguous(), rec.slopes_real, rec.breakpoints,
                                              rec.scale_index, rec.d_current, tables.rqmin, tables.rqmax,
                                              rsqrt=False, slope=False)
    m = _mask_view(mask, q, S)
    strides, shape = _common(q, k, v, m, scale)
    meta, blocks = _meta(q, mask, causal, scale), _blocks(D, True)
    consts = dict(QMIN=tables.qmin, QMAX=tables.qmax, ZMIN=tables.zmin, NMAX=tables.nmax)
    dk = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    dq = torch.empty(B, H, L, D, dtype=torch.float32, device=q.device)
    mask_arg = m if m is not None else q
    _run(_attn_bwd_dkdv, (triton.cdiv(S, blocks["BLOCK_N"]), B * H),
         (q, k, v, mask_arg, do, stats, delta, dk, dv, *tables.exp, *strides, *do.stride(), *shape.values()),
         {**consts, **meta, **blocks})
    _run(_attn_bwd_dq, (triton.cdiv(L, blocks["BLOCK_M"]), B * H),
         (q, k, v, mask_arg, do, stats, delta, dq, *tables.exp, *strides, *do.stride(), *shape.values()),
         {**consts, **meta, **blocks})
    if HK != H:
        dk = dk.view(B, HK, H // HK, S, D).sum(2)
        dv = dv.view(B, HK, H // HK, S, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, tables, scale, causal):
        o, stats = forward(q, k, v, mask, tables, scale, causal)
        ctx.save_for_backward(q, k, v, mask, o, stats)
        ctx.args = (tables, scale, causal)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mask, o, stats = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, mask, o, stats, *ctx.args)
        return dq, dk, dv, None, None, None, None


def usable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    """Shapes and dtypes the kernels serve: 4-D (B, H, L, D) on CUDA, one dtype, a head dim of
    HEAD_DIMS shared by q, k and v, H a multiple of k's heads; a mask that broadcasts to
    (B, H, L, S) and needs no gradient."""
    if not (ENABLED and triton_lut.AVAILABLE and q.is_cuda and q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        return False
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    B, H, L, D = q.shape
    if D not in HEAD_DIMS or k.shape[-1] != D or v.shape[-1] != D or k.shape[:3] != v.shape[:3] or k.shape[0] != B:
        return False
    if k.shape[1] == 0 or H % k.shape[1] or L == 0 or k.shape[2] == 0:
        return False
    if mask is not None:
        if mask.requires_grad or mask.device != q.device or mask.dim() > 4:
            return False
        if mask.dtype != torch.bool and torch.promote_types(q.dtype, mask.dtype) not in DTYPES:
            return False
        try:
            torch.broadcast_shapes(mask.shape, (B, H, L, k.shape[2]))
        except RuntimeError:
            return False
    return True


def attention(q, k, v, mask, softmax, scale: float, causal: bool, zmin: float, nmax: int) -> torch.Tensor:
    """The fused attention (forward, and backward through autograd) for `usable` inputs, with
    LUTSoftmax's clamp zmin and largest shift nmax."""
    global CALLS
    CALLS += 1
    tables = Tables(softmax, zmin, nmax)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FusedAttention.apply(q, k, v, mask, tables, scale, causal)
    return forward(q, k, v, mask, tables, scale, causal)[0]
