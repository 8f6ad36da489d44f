"""Block layouts and random starts: the starts that let a coarse scale own its own lines."""
import numpy as np
import pytest

from gqa_lut.blocks import best_layouts, block_starts, layouts
from gqa_lut.config import FitConfig, validate_config
from gqa_lut.functions import get_op
from gqa_lut.localsearch import resegment
from gqa_lut.multistart import finish_best, random_starts
from gqa_lut.problem import build_problem
from gqa_lut.search import fit
from gqa_lut.segmentation import assign

GELU16_ISSUE = 7.92e-6  # issue 12: the independent search's gelu table at 16 segments


def problem(op: str, segments: int, frac_bits: int = 6):
    return build_problem(validate_config(get_op(op), FitConfig(segments=segments, frac_bits=frac_bits)))


def test_every_layout_gives_each_scale_one_block_between_the_tails():
    p = problem("gelu", 8)
    K, B, allowed = block_starts(p)
    assert K.shape[0] == len(layouts(p)) > 0
    assert np.all(K[:, 0] == p.left_tail[0]) and np.all(B[:, 0] == p.left_tail[1])
    assert np.all(K[:, -1] == p.right_tail[0]) and np.all(B[:, -1] == p.right_tail[1])
    for mask in allowed:
        for row in mask:
            on = np.flatnonzero(row)
            assert on.size >= 2 and np.array_equal(on, np.arange(on[0], on[-1] + 1))  # one block, tails inside
        # every line belongs to exactly one group's block
        assert np.array_equal(np.sort(np.unique(mask, axis=0).sum(axis=0)), np.ones(p.segments, int))


def test_confined_breakpoints_keep_every_scored_code_on_its_block():
    p = problem("gelu", 8)
    K, B, allowed = block_starts(p)
    idx, fit_ = resegment(p, K, B, allowed)
    seg = assign(p, idx)
    for m in range(seg.shape[0]):
        for r in range(seg.shape[1]):
            assert np.all(allowed[m, r, seg[m, r, p.inside[r]]])
    _, free_fit = resegment(p, K, B)
    assert np.all(free_fit <= fit_ * (1 + 1e-12))  # confining can only cost


def test_layouts_find_the_issue_gelu_table_at_16_segments():
    """The table the GA and every local start missed (3.9e-5): the coarsest scale on a block of
    its own. 8e-6 is the issue's target; the layouts reach 7.924e-6 (relative slack 1%)."""
    p = problem("gelu", 16)
    cand = best_layouts(p)
    start = cand.take(len(cand.fitness) - 1)  # the worst layout as the incumbent
    best = finish_best(p, start, cand)
    assert best.fitness[0] <= GELU16_ISSUE * 1.01


def test_random_starts_are_reproducible_and_seeded():
    p = problem("exp", 4)
    a, b, c = random_starts(p, 3, 100), random_starts(p, 3, 100), random_starts(p, 4, 100)
    assert np.array_equal(a.K, b.K) and np.array_equal(a.B, b.B) and np.array_equal(a.idx, b.idx)
    assert not (np.array_equal(a.K, c.K) and np.array_equal(a.idx, c.idx))
    assert np.all(np.diff(a.fitness) >= 0)  # best first


def test_fit_history_names_the_new_phases():
    t = fit("gelu", FitConfig(segments=8, population=8, generations=2))  # 8: room for two blocks
    phases = [h["phase"] for h in t.search["history"] if "phase" in h]
    assert "block layouts" in phases and "random starts" in phases


@pytest.mark.slow
def test_layouts_past_16_segments_step_their_block_sizes():
    """Past 16 segments the block sizes of two groups are multiples of N / 16 (about as many
    layouts as at 16), those of three groups (only there) multiples of N / 8, and they find
    what doubling the 16-segment layout cannot: a doubled line never splits, so gelu at 32
    stayed at the 16-segment 7.92e-6; its own layouts reach 2.95e-6 (slack 1%)."""
    p16, p32 = problem("gelu", 16), problem("gelu", 32)
    l16, l32 = layouts(p16), layouts(p32)
    two = [sizes for g, sizes in l32 if len(g) == 2]
    three = [sizes for g, sizes in l32 if len(g) == 3]
    assert len(two) <= 1.25 * len(l16) and all(size % 2 == 0 for sizes in two for size in sizes)
    assert three and all(size % 4 == 0 for sizes in three for size in sizes)
    assert sorted({len(g) for g, _ in l16}) == [2] and sorted({len(g) for g, _ in l32}) == [2, 3]
    cand = best_layouts(p32)
    best = finish_best(p32, cand.take(len(cand.fitness) - 1), cand)
    assert best.fitness[0] <= 2.96e-6 < GELU16_ISSUE / 2


def test_scale_block_sizes_is_the_best_split_with_a_line_for_every_scale():
    import itertools

    from gqa_lut.blocks import scale_block_sizes

    rng = np.random.default_rng(1)
    for _ in range(40):
        scales, lines = int(rng.integers(1, 4)), int(rng.integers(0, 7))
        optima = np.concatenate([np.full((scales, 1), np.inf), -np.sort(-rng.random((scales, lines)), axis=1)], axis=1)
        got = scale_block_sizes(optima, lines)
        splits = [c for c in itertools.product(range(1, lines + 1), repeat=scales) if sum(c) == lines]
        if not splits:
            assert got is None
            continue
        best = min(sum(optima[s, n] for s, n in enumerate(c)) for c in splits)
        assert got[0] == pytest.approx(best, rel=1e-12) and sum(got[1]) == lines
        assert sum(optima[s, n] for s, n in enumerate(got[1])) == pytest.approx(best, rel=1e-12)


def test_one_block_per_scale_buys_error_past_64_segments():
    """Every scale on its own block with its own tails, parking the rest: at 256 segments below
    the 64-segment table the N/2 fits carried up (gelu 2.513e-6, bench/results/segments.json)."""
    from gqa_lut.blocks import scale_blocks

    p = problem("gelu", 256)
    K, B, allowed = scale_blocks(p)
    assert K.shape == (1, 256) and allowed.shape == (1, p.dscale.size, 256)
    assert np.array_equal(allowed[0].sum(axis=0), np.ones(256, int))  # each line in one scale's block
    for row in allowed[0]:
        on = np.flatnonzero(row)
        assert K[0, on[0]] == p.left_tail[0] and K[0, on[-1]] == p.right_tail[0]  # its own tails
    idx, fit_ = resegment(p, K, B, allowed)
    seg = assign(p, idx)
    for r in range(p.dscale.size):
        assert np.all(allowed[0, r, seg[0, r, p.inside[r]]])
    assert fit_[0] < 2.513e-6 * 0.9
    assert scale_blocks(problem("gelu", 16))[0].shape[0] == 0  # 16 lines do not reach 7 scales with tails
