"""Tests of numba_ep.reference, the NumPy specification.

Hand-worked cases write the expected arrays out literally (derived by hand in the comments), so a
mistake in the reference cannot hide behind the same mistake in the test. Property tests on random
inputs check invariants that must hold whatever the data.
"""
import ml_dtypes
import numpy as np
import pytest

from numba_ep import reference as ref

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn


def f32(v):
    return np.asarray(v, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# calc_diff, channel ranges
# ------------------------------------------------------------------------------------------------

def test_calc_diff_hand_values():
    assert ref.calc_diff(np.zeros(4), np.zeros(4)) == 0.0
    # x+1 = [2], y+1 = [1]: 1 - 2*2/(4+1) = 0.2
    assert ref.calc_diff([1.0], [0.0]) == pytest.approx(0.2, abs=1e-15)
    # both all -1: x+1 = y+1 = 0 -> defined as 0
    assert ref.calc_diff([-1.0, -1.0], [-1.0, -1.0]) == 0.0
    # bf16 inputs are accepted
    assert ref.calc_diff(np.ones(3, BF16), np.ones(3, np.float32)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        ref.calc_diff(np.zeros(3), np.zeros(4))


def test_channel_task_range_hand_values():
    assert [ref.get_channel_task_range(4, 2, c) for c in range(2)] == [(0, 2), (2, 4)]
    assert [ref.get_channel_task_range(3, 2, c) for c in range(2)] == [(0, 2), (2, 3)]
    assert [ref.get_channel_task_range(1, 3, c) for c in range(3)] == [(0, 1), (1, 1), (1, 1)]
    assert [ref.get_channel_task_range(10, 4, c) for c in range(4)] == [(0, 3), (3, 6), (6, 9),
                                                                         (9, 10)]
    assert ref.get_channel_task_range(0, 5, 4) == (0, 0)
    with pytest.raises(ValueError, match="channel"):
        ref.get_channel_task_range(4, 2, 2)


def test_channel_task_range_covers_tokens():
    for t in range(0, 40):
        for c in range(1, 9):
            ranges = [ref.get_channel_task_range(t, c, i) for i in range(c)]
            assert ranges[0][0] == 0 and ranges[-1][1] == t
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(0 <= e - s <= -(-t // c) for s, e in ranges)


# ------------------------------------------------------------------------------------------------
# get_dispatch_layout
# ------------------------------------------------------------------------------------------------

def test_dispatch_layout_hand_worked():
    # E=4, R=2 -> L=2: experts 0,1 on rank 0, experts 2,3 on rank 1.
    # token 0: experts 0 and 3 -> ranks 0 and 1; token 1: expert 1 (+ a -1 slot) -> rank 0;
    # token 2: experts 2 and 3 -> rank 1 only.
    topk = np.array([[0, 3], [1, -1], [2, 3]], dtype=np.int64)
    per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(topk, 4, 2)
    np.testing.assert_array_equal(per_rank, [2, 2])
    assert per_rank.dtype == np.int32
    assert per_rdma is None
    np.testing.assert_array_equal(per_expert, [1, 1, 1, 2])
    assert per_expert.dtype == np.int32
    np.testing.assert_array_equal(in_rank, [[True, True], [True, False], [False, True]])
    assert in_rank.dtype == np.bool_

    # same ids with R=4 (L=1) and 2 GPUs per node: nodes {0,1} and {2,3}.
    # token 0 -> ranks 0,3; token 1 -> rank 1; token 2 -> ranks 2,3.
    per_rank, per_rdma, per_expert, in_rank = ref.get_dispatch_layout(
        topk.astype(np.int32), 4, 4, num_gpus_per_node=2)
    np.testing.assert_array_equal(per_rank, [1, 1, 1, 2])
    np.testing.assert_array_equal(per_rdma, [2, 2])   # node 0: tokens 0,1; node 1: tokens 0,2
    assert per_rdma.dtype == np.int32
    np.testing.assert_array_equal(in_rank, [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]])
    # G >= R: single node -> None
    assert ref.get_dispatch_layout(topk, 4, 4, num_gpus_per_node=4)[1] is None


def test_dispatch_layout_errors():
    with pytest.raises(ValueError, match=r"topk_idx.*\[-1, 4\).*4 at \[1, 0\]"):
        ref.get_dispatch_layout(np.array([[0, 1], [4, 0]]), 4, 2)
    with pytest.raises(ValueError, match=r"topk_idx.*-2"):
        ref.get_dispatch_layout(np.array([[-2, 1]]), 4, 2)
    with pytest.raises(ValueError, match="num_experts.*multiple"):
        ref.get_dispatch_layout(np.array([[0, 1]]), 5, 2)
    with pytest.raises(ValueError, match="topk_idx.*2-D"):
        ref.get_dispatch_layout(np.array([0, 1]), 4, 2)
    with pytest.raises(ValueError, match="topk_idx.*integer"):
        ref.get_dispatch_layout(np.array([[0.0, 1.0]]), 4, 2)


def test_dispatch_layout_random_properties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        t, k, r = int(rng.integers(0, 50)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
        e = r * int(rng.integers(1, 5))
        idx = rng.integers(-1, e, size=(t, k))
        per_rank, _, per_expert, in_rank = ref.get_dispatch_layout(idx, e, r)
        assert per_expert.sum() == (idx >= 0).sum()
        np.testing.assert_array_equal(per_rank, in_rank.sum(0))
        for tok in range(t):
            ranks = {int(v) // (e // r) for v in idx[tok] if v >= 0}
            assert set(np.nonzero(in_rank[tok])[0].tolist()) == ranks


# ------------------------------------------------------------------------------------------------
# FP8 codec
# ------------------------------------------------------------------------------------------------

def _fp8_row():
    """One token, H = 512 = four 128-channel blocks (hand-worked below)."""
    x = np.zeros((1, 512), np.float32)
    x[0, 0:5] = [448, -224, 1.5, 17, 19]   # block 0: amax 448 exactly
    x[0, 128:130] = [1e-5, -5e-5]          # block 1: amax 5e-5 < floor 1e-4
    x[0, 256:259] = [1.0, -0.5, 0.3]       # block 2: amax 1
    x[0, 384:386] = [1000, -3]             # block 3: amax 1000
    return x


def test_fp8_cast_hand_worked_default_scales():
    x_fp8, scales = ref.per_token_cast_to_fp8(_fp8_row())
    assert x_fp8.dtype == FP8 and x_fp8.shape == (1, 512)
    assert scales.dtype == np.float32 and scales.shape == (1, 4)
    # scale_inv = amax / 448 in float32:
    #   448/448 = 1; float32(1e-4)/448; 1/448; 1000/448
    want_scales = [1.0, float.fromhex("0x1.df595ap-23"), float.fromhex("0x1.24924ap-9"),
                   float.fromhex("0x1.1db6dcp+1")]
    np.testing.assert_array_equal(scales[0], f32(want_scales))
    q = x_fp8.astype(np.float32)[0]
    # block 0 (scale 1): 17 is halfway between e4m3 16 and 18 -> even mantissa 16;
    #                    19 is halfway between 18 and 20 -> 20
    np.testing.assert_array_equal(q[0:5], [448, -224, 1.5, 16, 20])
    # block 1: scale = 448/1e-4 = 4480000: 1e-5 -> 44.8 -> 44 (step 4 in [32, 64)); -5e-5 -> -224
    np.testing.assert_array_equal(q[128:130], [44, -224])
    # block 2: scale 448: 1 -> 448, -0.5 -> -224, 0.3 -> 134.4 -> 128 (step 16 in [128, 256))
    np.testing.assert_array_equal(q[256:259], [448, -224, 128])
    # block 3: scale 0.448: 1000 -> 448, -3 -> -1.344 -> -1.375 (step 0.125 in [1, 2))
    np.testing.assert_array_equal(q[384:386], [448, -1.375])
    # everything else is zero
    mask = np.ones(512, bool)
    mask[[0, 1, 2, 3, 4, 128, 129, 256, 257, 258, 384, 385]] = False
    assert (q[mask] == 0).all()


def test_fp8_cast_hand_worked_round_scale_and_ue8m0():
    x_fp8, scales = ref.per_token_cast_to_fp8(_fp8_row(), round_scale=True)
    # 2**ceil(log2(amax/448)): 1 -> 2**0; 2.23e-7 -> 2**-22; 1/448 -> 2**-8; 2.23 -> 2**2
    np.testing.assert_array_equal(scales[0], f32([1.0, 2.0 ** -22, 2.0 ** -8, 4.0]))
    q = x_fp8.astype(np.float32)[0]
    np.testing.assert_array_equal(q[0:5], [448, -224, 1.5, 16, 20])
    # 1e-5 * 2**22 = 41.9 -> 40; -5e-5 * 2**22 = -209.7 -> -208
    np.testing.assert_array_equal(q[128:130], [40, -208])
    # *256: 256, -128, 76.8 -> 80 (step 8 in [64, 128))
    np.testing.assert_array_equal(q[256:259], [256, -128, 80])
    # /4: 250 -> 256, -0.75 exact
    np.testing.assert_array_equal(q[384:386], [256, -0.75])

    x8, packed = ref.per_token_cast_to_fp8(_fp8_row(), round_scale=True, use_ue8m0=True)
    np.testing.assert_array_equal(x8.view(np.uint8), x_fp8.view(np.uint8))
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    # biased exponents 127, 105, 119, 129 = 0x7f, 0x69, 0x77, 0x81, little-endian -> 0x8177697f
    assert int(packed[0, 0]) == 0x8177697F - (1 << 32)
    np.testing.assert_array_equal(ref.unpack_ue8m0(packed), scales)
    np.testing.assert_array_equal(ref.per_token_cast_back(x8, packed),
                                  ref.per_token_cast_back(x_fp8, scales))


def test_fp8_zero_block_and_bf16_input():
    x = np.zeros((2, 128), BF16)
    x[1, 5] = BF16(-3.0)
    x_fp8, scales = ref.per_token_cast_to_fp8(x)
    # all-zero row: amax floored at 1e-4
    assert scales[0, 0] == np.float32(1e-4) / np.float32(448)
    assert (x_fp8.astype(np.float32)[0] == 0).all()
    assert scales[1, 0] == np.float32(3.0) / np.float32(448)
    assert x_fp8.astype(np.float32)[1, 5] == -448.0


def test_pack_ue8m0_hand_worked():
    s = f32([[1.0, 0.5, 2.0, 2.0 ** -8, 2.0 ** 10, 2.0 ** -20, 1.0, 1.0]])
    packed = ref.pack_ue8m0(s)
    # bytes 127,126,128,119 -> 0x77807e7f ; bytes 137,107,127,127 -> 0x7f7f6b89
    np.testing.assert_array_equal(packed, np.array([[0x77807E7F, 0x7F7F6B89]], np.int32))
    np.testing.assert_array_equal(ref.unpack_ue8m0(packed), s)
    with pytest.raises(ValueError, match="scale_inv.*powers of two.*0.75"):
        ref.pack_ue8m0(f32([[1.0, 0.75, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="scale_inv.*multiple of 4"):
        ref.pack_ue8m0(f32([[1.0, 1.0]]))


def test_fp8_errors():
    with pytest.raises(ValueError, match="x.*multiple of 128.*H=100"):
        ref.per_token_cast_to_fp8(np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="x.*multiple of 512.*H=256"):
        ref.per_token_cast_to_fp8(np.zeros((1, 256), np.float32), round_scale=True,
                                  use_ue8m0=True)
    with pytest.raises(ValueError, match="use_ue8m0.*round_scale"):
        ref.per_token_cast_to_fp8(np.zeros((1, 512), np.float32), use_ue8m0=True)
    with pytest.raises(ValueError, match="scales.*shape"):
        ref.per_token_cast_back(np.zeros((1, 256), FP8), np.ones((1, 3), np.float32))


def test_fp8_random_properties():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 1024)) * np.exp2(rng.integers(-10, 10, (16, 1))))
    x = x.astype(BF16)
    for round_scale in (False, True):
        x_fp8, scales = ref.per_token_cast_to_fp8(x, round_scale=round_scale)
        back = ref.per_token_cast_back(x_fp8, scales)
        xf = x.astype(np.float32)
        # every element within half an e4m3 step (relative 2**-4) or one subnormal step
        err = np.abs(back - xf)
        step = np.repeat(scales, 128, axis=1) * 2.0 ** -9   # e4m3 subnormal step, scaled
        assert (err <= np.abs(xf) * 2.0 ** -4 + step).all()
        assert ref.calc_diff(back, xf) < 1e-3
        q = np.abs(x_fp8.astype(np.float32))
        assert q.max() <= 448
        if round_scale:
            # exact powers of two (zero mantissa bits), and at least amax/448
            assert (scales.view(np.uint32) & 0x7FFFFF == 0).all()
            amax = np.maximum(np.abs(xf).reshape(16, 8, 128).max(-1), np.float32(1e-4))
            assert (scales >= amax / 448).all() and (scales < amax / 448 * 2).all()
        else:
            # the amax element of each block lands exactly on +-448
            assert (q.reshape(16, 8, 128).max(-1) == 448).all()


# ------------------------------------------------------------------------------------------------
# LogFMT-10
# ------------------------------------------------------------------------------------------------

def test_log2_f32_is_correctly_rounded_on_all_bf16():
    # For every positive finite bf16, the float64 log2 must be far from a float32 rounding
    # boundary, so float32(log2_f64) is the correctly rounded value a GPU can reproduce.
    mags = np.arange(1, 0x7F80, dtype=np.uint16).view(BF16).astype(np.float64)
    y = np.log2(mags)
    lo = (y - np.abs(y) * 1e-13).astype(np.float32)
    hi = (y + np.abs(y) * 1e-13).astype(np.float32)
    assert (lo == hi).all()
    np.testing.assert_array_equal(ref.log2_f32(mags.astype(np.float32)), y.astype(np.float32))
    assert ref.log2_f32(f32([0.0]))[0] == -np.inf


def test_logfmt10_hand_worked_codes():
    # One division: amax = 0.5 (log2 -1), amin = 2**-9 (log2 -9): d = 8, step = 8/510,
    # inv_step = 510/8 = 63.75.
    x = np.zeros((1, 128), np.float32)
    x[0, :9] = [0.5, 2.0 ** -9, 2.0 ** -5, -(2.0 ** -5), 0.25, 0.0, -0.0, 2.0 ** -3, 2.0 ** -7]
    enc = ref.logfmt10_encode(x)
    assert enc.encoded.tolist() == [[True]]
    assert float(enc.amax[0, 0]) == 0.5 and float(enc.amin[0, 0]) == 2.0 ** -9
    # code = 1 + rint((log2|v| + 9) * 63.75):
    # 0.5: t = 8*63.75 = 510 -> 511;  2**-9: t = 0 -> 1;  2**-5: t = 4*63.75 = 255 -> 256;
    # -2**-5: 256 | sign bit 512 = 768;  0.25: t = 7*63.75 = 446.25 -> 446 -> 447;
    # 0.0 -> 0;  -0.0 -> 0 | 512;
    # ties go to even: 2**-3: t = 6*63.75 = 382.5 -> 382 -> 383; 2**-7: t = 127.5 -> 128 -> 129
    assert enc.codes[0, :9].tolist() == [511, 1, 256, 768, 447, 0, 512, 383, 129]
    assert (enc.codes[0, 9:] == 0).all()
    dec = ref.logfmt10_decode(enc)[0]
    assert dec[0] == 0.5 and dec[1] == 2.0 ** -9 and dec[5] == 0.0
    assert dec[2] == 2.0 ** -5 and dec[3] == -(2.0 ** -5)
    # 0.25 decodes to 2**(446*8/510 - 9) = 2**-2.003922 = 0.249321
    assert dec[4] == pytest.approx(0.249321, rel=1e-5)


def test_logfmt10_pass_through_cases():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 512)) * 0.1).astype(np.float32)
    x[0, 0] = 1.0                 # division 0 of row 0: amax >= 1 -> raw
    x[0, 128:256] = 0.0           # division 1: all zero -> raw
    x[0, 256:384] = -0.125        # division 2: one magnitude (amin == amax) -> raw
    x[0, 384:512] = x[1, 384:512] * 0.5   # division 3: encoded
    x[1, 130] = np.inf            # row 1 division 1: inf -> raw
    x[1, 300] = np.nan            # row 1 division 2: nan -> raw
    enc = ref.logfmt10_encode(x)
    assert enc.encoded.tolist() == [[False, False, False, True], [True, False, False, True]]
    out = ref.logfmt10_roundtrip(x)
    xb = x.astype(BF16).astype(np.float32)
    for row, div in [(0, 0), (0, 1), (0, 2), (1, 1)]:
        np.testing.assert_array_equal(out[row, div * 128:(div + 1) * 128],
                                      xb[row, div * 128:(div + 1) * 128])
    assert np.isnan(out[1, 300]) and (enc.codes[0, :384] == 0).all()


def test_logfmt10_error_bound_random():
    rng = np.random.default_rng(4)
    # values spanning up to ~20 octaves per division, all < 1
    x = rng.standard_normal((8, 1024)) * np.exp2(rng.uniform(-20, -2, (8, 1024)))
    xb = x.astype(BF16)
    enc = ref.logfmt10_encode(xb)
    assert enc.encoded.all()
    out = ref.logfmt10_decode(enc)
    xf = xb.astype(np.float32)
    p = ref.logfmt10_params(enc.amax, enc.amin)
    bound = np.exp2(np.repeat(p.step, 128, axis=-1) / 2 + 1e-4) - 1
    rel = np.abs(out - xf) / np.abs(xf)
    assert (rel <= bound).all()
    assert (np.sign(out) == np.sign(xf)).all()
    assert rel.max() > 0.5 * bound.min()      # the bound is not vacuous
    # 32-octave clipping: values far below amax*2**-32 become 0 or small; error stays tiny
    y = np.full((1, 128), 2.0 ** -60, np.float32)
    y[0, 0] = 0.5
    y[0, 1] = 2.0 ** -10
    out_y = ref.logfmt10_roundtrip(y)
    assert out_y[0, 0] == 0.5
    assert (out_y[0, 2:] == 0).all()          # > half a step below 2**(-1-32): code 0
    assert abs(out_y[0, 1] / 2.0 ** -10 - 1) < 2 ** (32 / 510 / 2) - 1 + 1e-4


def test_logfmt10_pack_hand_worked():
    codes = np.zeros(16, np.uint16)
    codes[0] = 511 | 512     # magnitude 0x1ff, sign
    codes[3] = 0x155         # bits 27..35: low 5 bits 0x15 -> word0 bits 27..31, high 4 bits 0xa
    codes[15] = 511 | 512    # bits 135..143 -> word 4 bits 7..15, sign bit 31
    words = ref.logfmt10_pack_codes(codes)
    assert words.dtype == np.uint32
    assert words.tolist() == [0xA80001FF, 0x0000000A, 0, 0, 0x8001FF80]
    np.testing.assert_array_equal(ref.logfmt10_unpack_codes(words), codes)


def test_logfmt10_pack_random_roundtrip_and_bytes():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 1024, size=(3, 256)).astype(np.uint16)
    words = ref.logfmt10_pack_codes(codes)
    assert words.shape == (3, 80)
    np.testing.assert_array_equal(ref.logfmt10_unpack_codes(words), codes)
    assert ref.logfmt10_bytes_per_token(7168) == 8960 + 224
    assert ref.logfmt10_bytes_per_token(128) == 164
    with pytest.raises(ValueError, match="hidden.*multiple of 128"):
        ref.logfmt10_bytes_per_token(100)
    with pytest.raises(ValueError, match="x.*multiple of 128"):
        ref.logfmt10_encode(np.zeros((1, 100), np.float32))


# ------------------------------------------------------------------------------------------------
# Intranode dispatch / combine: the hand-worked 2-rank, 2-channel case
# ------------------------------------------------------------------------------------------------
# E=4, R=2 (L=2), K=2, C=2.
# rank 0: T=4, channels [0,2) [2,4)      rank 1: T=3, channels [0,2) [2,3)
#   t0 [0, 2] -> ranks 0,1                 t0 [3, 2]   -> rank 1
#   t1 [3,-1] -> rank 1                    t1 [-1,-1]  -> nowhere
#   t2 [1, 0] -> rank 0                    t2 [0, 3]   -> ranks 0,1
#   t3 [2, 1] -> ranks 0,1

TOPK = [np.array([[0, 2], [3, -1], [1, 0], [2, 1]]), np.array([[3, 2], [-1, -1], [0, 3]])]
WEIGHTS = [f32([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]]),
           f32([[1.1, 1.2], [1.3, 1.4], [1.5, 1.6]])]


def _hand_x():
    # row value = 10*rank + token + 1, in 3 columns (second column negated) - float32
    return [np.array([[10 * r + t + 1, -(10 * r + t + 1), 0.5] for t in range(n)], np.float32)
            for r, n in enumerate((4, 3))]


def test_intranode_dispatch_hand_worked():
    scales = [np.arange(8, dtype=np.float32).reshape(4, 2), 10 + np.arange(6, dtype=np.float32)
              .reshape(3, 2)]
    res = ref.intranode_dispatch(_hand_x(), TOPK, WEIGHTS, num_experts=4, num_channels=2,
                                 x_scales=scales)
    r0, r1 = res
    # rank 0 receives from rank 0: t0, t2, t3 ; from rank 1: t2
    # rank 1 receives from rank 0: t0, t1, t3 ; from rank 1: t0, t2
    rank_prefix = [[3, 3], [4, 5]]
    for r in res:
        np.testing.assert_array_equal(r["rank_prefix_matrix"], rank_prefix)
        assert r["rank_prefix_matrix"].dtype == np.int32
    assert r0["num_recv_tokens"] == 4 and r1["num_recv_tokens"] == 5
    np.testing.assert_array_equal(r0["recv_src_idx"], [0, 2, 3, 2])
    np.testing.assert_array_equal(r1["recv_src_idx"], [0, 1, 3, 0, 2])
    np.testing.assert_array_equal(r0["recv_x"][:, 0], [1, 3, 4, 13])
    np.testing.assert_array_equal(r1["recv_x"][:, 1], [-1, -2, -4, -11, -13])
    np.testing.assert_array_equal(r0["recv_x_scales"], [[0, 1], [4, 5], [6, 7], [14, 15]])
    np.testing.assert_array_equal(r1["recv_x_scales"][:, 0], [0, 2, 6, 10, 14])
    # sender side, [dst][c] inclusive over channels:
    #   rank 0 -> dst 0: ch0 {t0}, ch1 {t2,t3} -> [1,3];  -> dst 1: ch0 {t0,t1}, ch1 {t3} -> [2,3]
    #   rank 1 -> dst 0: ch0 {}, ch1 {t2} -> [0,1];           -> dst 1: ch0 {t0}, ch1 {t2} -> [1,2]
    np.testing.assert_array_equal(r0["channel_prefix_matrix"], [[1, 3], [2, 3]])
    np.testing.assert_array_equal(r1["channel_prefix_matrix"], [[0, 1], [1, 2]])
    # receiver side, [src][c] exclusive start inside the src block
    np.testing.assert_array_equal(r0["recv_channel_prefix_matrix"], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(r1["recv_channel_prefix_matrix"], [[0, 2], [0, 1]])
    # send_head: position among the channel's tokens going to that destination
    np.testing.assert_array_equal(r0["send_head"], [[0, 0], [-1, 1], [0, -1], [1, 0]])
    np.testing.assert_array_equal(r1["send_head"], [[-1, 0], [-1, -1], [0, 0]])
    assert r0["send_head"].dtype == np.int32
    np.testing.assert_array_equal(r1["is_token_in_rank"], [[0, 1], [0, 0], [1, 1]])
    # local top-k: rank 0 owns 0,1 ; rank 1 owns 2,3 (-> 0,1)
    np.testing.assert_array_equal(r0["recv_topk_idx"], [[0, -1], [1, 0], [-1, 1], [0, -1]])
    np.testing.assert_array_equal(r1["recv_topk_idx"], [[-1, 0], [1, -1], [0, -1], [1, 0],
                                                        [-1, 1]])
    assert r0["recv_topk_idx"].dtype == np.int64
    np.testing.assert_array_equal(r0["recv_topk_weights"],
                                  f32([[0.1, 0], [0.5, 0.6], [0, 0.8], [1.5, 0]]))
    np.testing.assert_array_equal(r1["recv_topk_weights"],
                                  f32([[0, 0.2], [0.3, 0], [0.7, 0], [1.1, 1.2], [0, 1.6]]))
    # per local expert: global 0 <- r0t0, r0t2, r1t2 = 3; global 1 <- r0t2, r0t3 = 2
    #                   global 2 <- r0t0, r0t3, r1t0 = 3; global 3 <- r0t1, r1t0, r1t2 = 3
    assert r0["num_recv_tokens_per_expert_list"] == [3, 2]
    assert r1["num_recv_tokens_per_expert_list"] == [3, 3]


@pytest.mark.parametrize("alignment, want0, want1", [(1, [3, 2], [3, 3]), (2, [4, 2], [4, 4]),
                                                     (4, [4, 4], [4, 4]), (5, [5, 5], [5, 5])])
def test_intranode_dispatch_expert_alignment(alignment, want0, want1):
    r0, r1 = ref.intranode_dispatch(_hand_x(), TOPK, WEIGHTS, 4, 2, expert_alignment=alignment)
    assert r0["num_recv_tokens_per_expert_list"] == want0
    assert r1["num_recv_tokens_per_expert_list"] == want1


def test_intranode_dispatch_num_worst_tokens():
    normal = ref.intranode_dispatch(_hand_x(), TOPK, WEIGHTS, 4, 2)
    worst = ref.intranode_dispatch(_hand_x(), TOPK, WEIGHTS, 4, 2, num_worst_tokens=6)
    for n, w, real in zip(normal, worst, (4, 5)):
        assert w["recv_x"].shape == (6, 3) and w["recv_topk_idx"].shape == (6, 2)
        assert w["num_recv_tokens"] == real
        assert w["num_recv_tokens_per_expert_list"] == []
        for key in ("recv_x", "recv_topk_idx", "recv_topk_weights", "recv_src_idx"):
            np.testing.assert_array_equal(w[key][:real], n[key])
        assert (w["recv_topk_idx"][real:] == -1).all()
        # documented poison
        assert (w["recv_x"][real:] == 0).all() and (w["recv_src_idx"][real:] == -1).all()
        assert (w["recv_topk_weights"][real:] == 0).all()
    with pytest.raises(ValueError, match="num_worst_tokens.*5 rows rank 1"):
        ref.intranode_dispatch(_hand_x(), TOPK, WEIGHTS, 4, 2, num_worst_tokens=4)


def test_intranode_combine_hand_worked():
    x = _hand_x()
    res = ref.intranode_dispatch(x, TOPK, WEIGHTS, 4, 2)
    # every rank sends back its recv_x unchanged, with its recv_topk_weights
    out = ref.intranode_combine([r["recv_x"] for r in res], res,
                                topk_weights=[r["recv_topk_weights"] for r in res],
                                bias=[(np.ones((4, 3), np.float32), None), None])
    (c0, w0), (c1, w1) = out
    # rank 0 tokens reach 2,1,1,2 ranks; +1 bias ; rank 1 tokens reach 1,0,2 ranks
    np.testing.assert_array_equal(c0[:, 0], [2 * 1 + 1, 1 * 2 + 1, 1 * 3 + 1, 2 * 4 + 1])
    np.testing.assert_array_equal(c0[:, 2], [2, 1.5, 1.5, 2])
    np.testing.assert_array_equal(c1[:, 1], [-11, 0, -26])
    # weights rebuilt: original where the slot is valid, 0 for -1 slots
    np.testing.assert_array_equal(w0, WEIGHTS[0] * f32([[1, 1], [1, 0], [1, 1], [1, 1]]))
    np.testing.assert_array_equal(w1, f32([[1.1, 1.2], [0, 0], [1.5, 1.6]]))
    assert c0.dtype == np.float32


def test_intranode_zero_tokens_and_empty_receiver():
    # rank 0 has 3 tokens all for rank 0's experts, rank 1 has none: rank 1 receives nothing.
    x = [np.arange(6, dtype=np.float32).reshape(3, 2), np.zeros((0, 2), np.float32)]
    topk = [np.array([[0, -1], [1, 0], [-1, 1]]), np.zeros((0, 2), np.int64)]
    res = ref.intranode_dispatch(x, topk, None, num_experts=4, num_channels=4)
    r0, r1 = res
    assert r0["recv_x"].shape == (3, 2) and r1["recv_x"].shape == (0, 2)
    assert r1["recv_topk_idx"].shape == (0, 2) and r1["recv_topk_weights"] is None
    assert r1["recv_src_idx"].shape == (0,)
    np.testing.assert_array_equal(r0["rank_prefix_matrix"], [[3, 0], [3, 0]])
    # channels of 1 token each: [0,1) [1,2) [2,3) [3,3)
    np.testing.assert_array_equal(r0["channel_prefix_matrix"], [[1, 2, 3, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(r1["channel_prefix_matrix"], np.zeros((2, 4)))
    np.testing.assert_array_equal(r0["recv_channel_prefix_matrix"], [[0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(r0["send_head"], [[0, -1], [0, -1], [0, -1]])
    assert r1["send_head"].shape == (0, 2)
    # expert 0 <- t0, t1 ; expert 1 <- t1, t2
    assert r0["num_recv_tokens_per_expert_list"] == [2, 2]
    assert r1["num_recv_tokens_per_expert_list"] == [0, 0]
    out = ref.intranode_combine([r["recv_x"] for r in res], res)
    np.testing.assert_array_equal(out[0][0], x[0])
    assert out[1][0].shape == (0, 2) and out[0][1] is None


def test_intranode_dispatch_without_topk():
    x = _hand_x()
    routing = [ref.get_dispatch_layout(t, 4, 2)[3] for t in TOPK]
    with_topk = ref.intranode_dispatch(x, TOPK, WEIGHTS, 4, 2)
    no_topk = ref.intranode_dispatch(x, None, None, None, 2, is_token_in_rank=routing)
    for a, b in zip(with_topk, no_topk):
        assert b["recv_topk_idx"] is None and b["recv_topk_weights"] is None
        assert b["num_recv_tokens_per_expert_list"] == []
        for key in ("recv_x", "recv_src_idx", "send_head", "rank_prefix_matrix",
                    "channel_prefix_matrix", "recv_channel_prefix_matrix"):
            np.testing.assert_array_equal(a[key], b[key])
    npe = [ref.get_dispatch_layout(t, 4, 2)[2] for t in TOPK]
    again = ref.intranode_dispatch(x, None, None, 4, 2, is_token_in_rank=routing,
                                   num_tokens_per_expert=npe, expert_alignment=2)
    assert again[0]["num_recv_tokens_per_expert_list"] == [4, 2]


def test_intranode_errors():
    x = _hand_x()
    with pytest.raises(ValueError, match=r"topk_idx\[1\].*\[-1, 4\).*7"):
        ref.intranode_dispatch(x, [TOPK[0], np.array([[7, 0], [0, 0], [0, 0]])], None, 4, 2)
    with pytest.raises(ValueError, match=r"x\[1\].*like x\[0\]"):
        ref.intranode_dispatch([x[0], x[1][:, :2]], TOPK, None, 4, 2)
    with pytest.raises(ValueError, match="num_experts.*multiple"):
        ref.intranode_dispatch(x, TOPK, None, 5, 2)
    with pytest.raises(ValueError, match="num_channels.*>= 1"):
        ref.intranode_dispatch(x, TOPK, None, 4, 0)
    with pytest.raises(ValueError, match="is_token_in_rank.*per-rank list"):
        ref.intranode_dispatch(x, None, None, 4, 2)
    with pytest.raises(ValueError, match=r"topk_weights\[0\].*shape \(4, 2\)"):
        ref.intranode_dispatch(x, TOPK, [WEIGHTS[0][:, :1], WEIGHTS[1]], 4, 2)
    res = ref.intranode_dispatch(x, TOPK, None, 4, 2)
    with pytest.raises(ValueError, match=r"x\[1\].*shape \(5, 3\)"):
        ref.intranode_combine([res[0]["recv_x"], res[1]["recv_x"][:4]], res)
    broken = [dict(r) for r in res]
    broken[0]["send_head"] = res[0]["send_head"].copy()
    broken[0]["send_head"][3, 0] = 0
    with pytest.raises(ValueError, match="handles.*inconsistent"):
        ref.intranode_combine([r["recv_x"] for r in res], broken)


def test_intranode_random_roundtrip_bf16_with_bias():
    rng = np.random.default_rng(6)
    num_ranks, num_experts, hidden, k = 3, 9, 32, 3
    tokens = [5, 0, 11]
    x = [rng.integers(-8, 9, (t, hidden)).astype(BF16) for t in tokens]
    topk = [rng.integers(-1, num_experts, (t, k)) for t in tokens]
    weights = [rng.random((t, k)).astype(np.float32) for t in tokens]
    bias = [(rng.integers(-4, 5, (t, hidden)).astype(BF16), np.ones((t, hidden), BF16))
            for t in tokens]
    res = ref.intranode_dispatch(x, topk, weights, num_experts, 3)
    for d, r in enumerate(res):
        # source-rank-major order
        for s in range(num_ranks):
            lo = r["rank_prefix_matrix"][s - 1][d] if s else 0
            hi = r["rank_prefix_matrix"][s][d]
            src_tokens = np.nonzero(ref.get_dispatch_layout(topk[s], num_experts,
                                                            num_ranks)[3][:, d])[0]
            np.testing.assert_array_equal(r["recv_src_idx"][lo:hi], src_tokens)
            np.testing.assert_array_equal(r["recv_x"][lo:hi].view(np.uint16),
                                          x[s][src_tokens].view(np.uint16))
        # per-expert counts agree with the received local ids
        counts = [(r["recv_topk_idx"] == i).sum() for i in range(num_experts // num_ranks)]
        assert counts == r["num_recv_tokens_per_expert_list"]
    out = ref.intranode_combine([r["recv_x"] for r in res], res,
                                topk_weights=[r["recv_topk_weights"] for r in res], bias=bias)
    for s in range(num_ranks):
        times = res[s]["is_token_in_rank"].sum(1)[:, None]
        want = x[s].astype(np.float32) * times + bias[s][0].astype(np.float32) + 1
        assert out[s][0].dtype == BF16
        np.testing.assert_array_equal(out[s][0].astype(np.float32), want)   # small ints: exact
        np.testing.assert_array_equal(out[s][1], np.where(topk[s] >= 0, weights[s], 0))


# ------------------------------------------------------------------------------------------------
# Low-latency dispatch / combine: R=2, L=2 (E=4), M=4, H=128, K=2
# ------------------------------------------------------------------------------------------------
# rank 0: t0 [0, 3]  t1 [2, -1]  t2 [1, 2]          rank 1: t0 [2, 0]  t1 [3, 2]
# expert 0 (rank 0, local 0): r0 t0 ; r1 t0          -> count 2, ranges [(0,1), (1,1)]
# expert 1 (rank 0, local 1): r0 t2                  -> count 1, ranges [(0,1), (1,0)]
# expert 2 (rank 1, local 0): r0 t1 t2 ; r1 t0 t1    -> count 4, ranges [(0,2), (2,2)]
# expert 3 (rank 1, local 1): r0 t0 ; r1 t1          -> count 2, ranges [(0,1), (1,1)]

LL_TOPK = [np.array([[0, 3], [2, -1], [1, 2]]), np.array([[2, 0], [3, 2]])]
LL_W = [f32([[0.5, 0.25], [2.0, 9.0], [1.0, 1.0]]), f32([[0.5, 0.5], [1.0, -1.0]])]


def _ll_x():
    rng = np.random.default_rng(7)
    # rows with distinct per-128 ranges; bf16
    return [(rng.standard_normal((t, 128)) * (r + 1)).astype(BF16) for r, t in enumerate((3, 2))]


def test_low_latency_dispatch_hand_worked_bf16():
    x = _ll_x()
    r0, r1 = ref.low_latency_dispatch(x, LL_TOPK, 4, 4, use_fp8=False)
    assert r0["recv_x"].shape == (2, 8, 128) and r0["recv_x"].dtype == BF16
    assert r0["recv_x_scales"] is None
    np.testing.assert_array_equal(r0["recv_count"], [2, 1])
    np.testing.assert_array_equal(r1["recv_count"], [4, 2])
    assert r0["recv_count"].dtype == np.int32
    assert r0["layout_range"].dtype == np.int64
    np.testing.assert_array_equal(r0["layout_range"], [[(0 << 32) | 1, (1 << 32) | 1],
                                                       [(0 << 32) | 1, (1 << 32) | 0]])
    np.testing.assert_array_equal(r1["layout_range"], [[(0 << 32) | 2, (2 << 32) | 2],
                                                       [(0 << 32) | 1, (1 << 32) | 1]])
    np.testing.assert_array_equal(r0["src_info"][0, :2], [0, 0])
    np.testing.assert_array_equal(r0["src_info"][1, :1], [2])
    np.testing.assert_array_equal(r1["src_info"][0, :4], [1, 2, 0, 1])
    np.testing.assert_array_equal(r1["src_info"][1, :2], [0, 1])
    assert (r1["src_info"][0, 4:] == -1).all()     # poison beyond recv_count
    # rows: expert 2 on rank 1 = x0[1], x0[2], x1[0], x1[1]
    want = np.stack([x[0][1], x[0][2], x[1][0], x[1][1]])
    np.testing.assert_array_equal(r1["recv_x"][0, :4].view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(r0["recv_x"][1, 0].view(np.uint16), x[0][2].view(np.uint16))
    assert r0["num_max_dispatch_tokens_per_rank"] == 4


def test_low_latency_dispatch_fp8_matches_cast():
    x = _ll_x()
    for round_scale, ue8m0 in ((False, False), (True, False)):
        res = ref.low_latency_dispatch(x, LL_TOPK, 4, 4, round_scale=round_scale,
                                       use_ue8m0=ue8m0)
        q, s = ref.per_token_cast_to_fp8(x[1], round_scale=round_scale)
        r1 = res[1]
        assert r1["recv_x"].dtype == FP8 and r1["recv_x_scales"].shape == (2, 8, 1)
        # expert 3 (rank 1, local 1) rows: r0 t0, r1 t1
        np.testing.assert_array_equal(r1["recv_x"][1, 1].view(np.uint8), q[1].view(np.uint8))
        np.testing.assert_array_equal(r1["recv_x_scales"][1, 1], s[1])
    x512 = [np.tile(a, (1, 4)) for a in x]
    res = ref.low_latency_dispatch(x512, LL_TOPK, 4, 4, round_scale=True, use_ue8m0=True)
    assert res[0]["recv_x_scales"].dtype == np.int32 and res[0]["recv_x_scales"].shape == (2, 8, 1)
    _, s = ref.per_token_cast_to_fp8(x512[0], round_scale=True, use_ue8m0=True)
    np.testing.assert_array_equal(res[0]["recv_x_scales"][1, 0], s[2])   # expert 1 <- r0 t2
    with pytest.raises(ValueError, match="x.*multiple of 512"):
        ref.low_latency_dispatch(x, LL_TOPK, 4, 4, round_scale=True, use_ue8m0=True)


def test_low_latency_dispatch_errors():
    x = _ll_x()
    with pytest.raises(ValueError, match=r"x\[0\].*at most num_max_dispatch_tokens_per_rank=2"):
        ref.low_latency_dispatch(x, LL_TOPK, 2, 4)
    with pytest.raises(ValueError, match="num_experts.*multiple"):
        ref.low_latency_dispatch(x, LL_TOPK, 4, 5)
    with pytest.raises(ValueError, match="x.*multiple of 128.*H=64"):
        ref.low_latency_dispatch([a[:, :64] for a in x], LL_TOPK, 4, 4)
    with pytest.raises(ValueError, match=r"topk_idx\[1\].*\[-1, 4\)"):
        ref.low_latency_dispatch(x, [LL_TOPK[0], LL_TOPK[1] + 2], 4, 4)


def _permuted(res: dict) -> dict:
    """Rank 1's result with expert 0's two source blocks swapped and rows reversed in a block."""
    got = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in res.items()}
    for key in ("recv_x", "recv_x_scales", "src_info"):
        if res[key] is None:
            continue
        a, b = res[key], got[key]
        b[0, 0:2] = a[0, 2:4][::-1]      # rank-1 block first, its rows reversed
        b[0, 2:4] = a[0, 0:2]
    got["layout_range"][0] = [(2 << 32) | 2, (0 << 32) | 2]
    return got


def test_check_low_latency_dispatch_accepts_permutation_rejects_corruption():
    want = ref.low_latency_dispatch(_ll_x(), LL_TOPK, 4, 4)[1]
    ref.check_low_latency_dispatch(want, want)
    got = _permuted(want)
    ref.check_low_latency_dispatch(got, want)
    ref.check_low_latency_dispatch(got, want, exact=False)
    with pytest.raises(AssertionError, match="src_info"):
        ref.check_low_latency_dispatch(got, want, require_token_order=True)
    # rows beyond recv_count are not compared
    tail = _permuted(want)
    tail["recv_x"][0, 6] = FP8(1.0)
    ref.check_low_latency_dispatch(tail, want)
    # the GPU hands back raw bytes: uint8 is read as e4m3
    raw = dict(got, recv_x=got["recv_x"].view(np.uint8))
    ref.check_low_latency_dispatch(raw, want)

    bad = _permuted(want)
    bad["recv_x"][0, 1, 77] = FP8(float(bad["recv_x"][0, 1, 77]) * 2 + 1)
    with pytest.raises(AssertionError, match=r"local expert 0, source rank 1, token 0.*column 77"):
        ref.check_low_latency_dispatch(bad, want)
    bad = _permuted(want)
    bad["recv_x_scales"][0, 3, 0] *= 2
    with pytest.raises(AssertionError, match="recv_x_scales"):
        ref.check_low_latency_dispatch(bad, want)
    bad = _permuted(want)
    bad["recv_count"][0] = 3
    with pytest.raises(AssertionError, match="recv_count"):
        ref.check_low_latency_dispatch(bad, want)
    bad = _permuted(want)
    bad["layout_range"][0] = [(1 << 32) | 2, (0 << 32) | 2]     # overlapping blocks
    with pytest.raises(AssertionError, match="overlap"):
        ref.check_low_latency_dispatch(bad, want)
    bad = _permuted(want)
    bad["layout_range"][0] = [(3 << 32) | 2, (0 << 32) | 2]     # runs past recv_count
    with pytest.raises(AssertionError, match="outside"):
        ref.check_low_latency_dispatch(bad, want)
    bad = _permuted(want)
    bad["src_info"][1, 0] = 1
    with pytest.raises(AssertionError, match="local expert 1, source rank 0: src_info"):
        ref.check_low_latency_dispatch(bad, want)


def test_low_latency_combine_hand_worked():
    # small integers: every product and sum below is exact in bf16 and float32
    rng = np.random.default_rng(9)
    x = [rng.integers(-8, 9, (t, 128)).astype(BF16) for t in (3, 2)]
    res = ref.low_latency_dispatch(x, LL_TOPK, 4, 4, use_fp8=False)
    # expert e multiplies its input by (e + 1): local le on rank d is e = 2d + le
    outs = [(r["recv_x"].astype(np.float32) * f32([[[2 * d + 1]], [[2 * d + 2]]])).astype(BF16)
            for d, r in enumerate(res)]
    combined = ref.low_latency_combine(outs, LL_TOPK, LL_W, res)
    # rank 0: t0 0.5*1 + 0.25*4 = 1.5 ; t1 2*3 = 6 (slot -1 ignored) ; t2 1*2 + 1*3 = 5
    # rank 1: t0 0.5*3 + 0.5*1 = 2 ; t1 1*4 - 1*3 = 1
    factors = [[1.5, 6.0, 5.0], [2.0, 1.0]]
    for s in range(2):
        assert combined[s].dtype == BF16 and combined[s].shape == x[s].shape
        want = x[s].astype(np.float32) * f32(factors[s])[:, None]
        np.testing.assert_array_equal(combined[s].astype(np.float32), want)
    # arbitrary block order on the expert side gives the same result
    perm = [res[0], _permuted(res[1])]
    outs_perm = [outs[0], _permuted(dict(res[1], recv_x=outs[1]))["recv_x"]]
    again = ref.low_latency_combine(outs_perm, LL_TOPK, LL_W, perm)
    for a, b in zip(combined, again):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))


def test_low_latency_combine_logfmt():
    x = _ll_x()
    res = ref.low_latency_dispatch(x, LL_TOPK, 4, 4, use_fp8=False)
    # |v| >= 1 would pass through unencoded: scale down so the divisions encode
    small = [(r["recv_x"].astype(np.float32) / 64).astype(BF16) for r in res]
    assert all(ref.logfmt10_encode(s[0, :1]).encoded.all() for s in small)
    log = ref.low_latency_combine(small, LL_TOPK, LL_W, res, use_logfmt=True)
    exact = ref.low_latency_combine(small, LL_TOPK, LL_W, res)
    for a, b in zip(log, exact):
        assert 0 < ref.calc_diff(a, b) < 1e-3


def test_low_latency_random_roundtrip_properties():
    rng = np.random.default_rng(8)
    num_ranks, num_experts, m, hidden, k = 3, 6, 5, 256, 3
    tokens = [5, 0, 3]
    x = [rng.standard_normal((t, hidden)).astype(BF16) for t in tokens]
    topk = [np.array([rng.permutation(num_experts)[:k] for _ in range(t)],
                     dtype=np.int64).reshape(t, k) for t in tokens]
    for t in topk:
        if t.size:
            t[0, 0] = -1
    weights = [rng.random((t, k)).astype(np.float32) for t in tokens]
    res = ref.low_latency_dispatch(x, topk, m, num_experts)
    total = sum(int(r["recv_count"].sum()) for r in res)
    assert total == sum(int((t >= 0).sum()) for t in topk)
    for d, r in enumerate(res):
        for le in range(num_experts // num_ranks):
            counts = r["layout_range"][le] & 0xFFFFFFFF
            assert counts.sum() == r["recv_count"][le]
            for s in range(num_ranks):
                assert counts[s] == (topk[s] == d * 2 + le).sum()
        ref.check_low_latency_dispatch(r, r, exact=False)
    # identity experts on the dequantised data: combined = x * sum of valid weights
    outs = [ref.per_token_cast_back(r["recv_x"], r["recv_x_scales"]).astype(BF16) for r in res]
    combined = ref.low_latency_combine(outs, topk, weights, res)
    for s in range(num_ranks):
        want = x[s].astype(np.float32) * np.where(topk[s] >= 0, weights[s], 0).sum(1)[:, None]
        assert combined[s].shape == (tokens[s], hidden)
        if tokens[s]:
            assert ref.calc_diff(combined[s], want) < 9e-4


# ------------------------------------------------------------------------------------------------
# Buffer sizes
# ------------------------------------------------------------------------------------------------

def test_low_latency_layout_hand_worked():
    # DeepEP's example: M=128, H=7168, E=288 (R=8)
    lay = ref.low_latency_layout(128, 7168, 8, 288)
    assert lay["dispatch_msg_bytes"] == 16 + 14336
    assert lay["combine_msg_bytes"] == 14560                  # 56*4 + 14336
    assert lay["recv_bytes"] == 288 * 128 * 14560 == 536_739_840
    assert lay["send_bytes"] == 536_739_840                   # E*M*combine > M*dispatch
    assert lay["signal_bytes"] == 1152                        # 288*4 = 1152 = 9*128
    assert lay["total_bytes"] == 2 * (1152 + 2 * 536_739_840) == 2_146_961_664
    assert lay["signal_offsets"] == (0, 1152)
    assert lay["send_offsets"] == (2304, 2304 + 536_739_840)
    assert lay["recv_offsets"] == (2304 + 2 * 536_739_840, 2304 + 3 * 536_739_840)
    assert ref.get_low_latency_rdma_size_hint(128, 7168, 8, 288) == 2_146_961_664

    # tiny: M=4, H=128, R=2, E=4: dispatch 16+256=272, combine 4+256=260,
    # send = max(4*272, 16*260) = 4160, recv = max(16*272, 16*260) = 4352, signal = 128
    lay = ref.low_latency_layout(4, 128, 2, 4)
    assert (lay["dispatch_msg_bytes"], lay["combine_msg_bytes"]) == (272, 260)
    assert (lay["send_bytes"], lay["recv_bytes"], lay["signal_bytes"]) == (4160, 4352, 128)
    assert lay["total_bytes"] == 2 * (128 + 4160 + 4352) == 17280
    assert ref.get_low_latency_rdma_size_hint(4, 128, 2, 4) == 17280   # 135*128
    # E=3 ints -> 12 bytes -> signal 128; total 2*(128 + 1*272... ) rounded to 128
    hint = ref.get_low_latency_rdma_size_hint(1, 128, 1, 3)
    # send = max(272, 3*260=780) = 780, recv = max(816, 780) = 816: 2*(128+780+816) = 3448 -> 3456
    assert hint == 3456
    with pytest.raises(ValueError, match="hidden.*multiple of 128"):
        ref.low_latency_layout(4, 100, 2, 4)
    with pytest.raises(ValueError, match="num_experts.*multiple of num_ranks=3"):
        ref.low_latency_layout(4, 128, 3, 4)
