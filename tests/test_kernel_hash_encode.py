"""Pallas hash-encode kernels (interpret mode on the CPU) against the hata_jax references.

Inputs are fresh random data from the `rng` fixture (tests/conftest.py; replay with HATA_TEST_SEED).

Codes must match bit for bit except bits whose projection lies within a rounding tolerance of 0
(the kernel sums in a different order); those are found with a float64 projection and must be
rare, so the comparison cannot pass vacuously.
"""
from __future__ import annotations

import functools

import brute_force as bf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import hata_jax
from hata_jax import hashing
from pallas_kernels import backend, hash_encode

# A bit is compared when |x . w| > NEAR_ZERO * sum_d |x_d w_d|. The float32 summation error is
# at most ~D * 2**-24 (< 1e-5) of that sum, so every compared bit has one right answer. About
# 0.05% of Gaussian bits fall under the tolerance; more than 1% (+2 for tiny cases) fails.
NEAR_ZERO = 1e-4
MAX_EXCLUDED_FRACTION = 0.01
MAX_EXCLUDED_SLACK = 2
NORM_RTOL = 1e-6


def _random(rng, shape, dtype):
    """Gaussian values with a random per-vector scale (fresh, never zeros)."""
    scale = rng.uniform(0.25, 4.0, size=shape[:-1] + (1,))
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _float64_signs(x, w, head_axis):
    """(bits, comparable): bool arrays in the codes' layout [..., heads, ..., rbit]."""
    xm = np.moveaxis(np.asarray(x, np.float64), head_axis, -2)
    wf = np.asarray(w, np.float64)
    wh = np.repeat(wf, xm.shape[-2] // wf.shape[0], axis=0)
    proj = np.einsum("...hd,hdr->...hr", xm, wh)
    magnitude = np.einsum("...hd,hdr->...hr", np.abs(xm), np.abs(wh))
    comparable = np.abs(proj) > NEAR_ZERO * magnitude
    return np.moveaxis(proj > 0, -2, head_axis), np.moveaxis(comparable, -2, head_axis)


def _assert_codes_match(codes, x, w, head_axis):
    """codes vs the reference: same shape and dtype, equal on every comparable bit."""
    expected = hashing.encode(x, w, head_axis=head_axis, impl="reference")
    assert codes.shape == expected.shape and codes.dtype == jnp.uint32
    signs, comparable = _float64_signs(x, w, head_axis)
    assert comparable.size - comparable.sum() <= MAX_EXCLUDED_FRACTION * comparable.size + MAX_EXCLUDED_SLACK
    got = np.asarray(hashing.unpack_bits(codes))
    want = np.asarray(hashing.unpack_bits(expected))
    np.testing.assert_array_equal(got[comparable], want[comparable])
    np.testing.assert_array_equal(got[comparable], signs[comparable])


def _projection(rng, kv_heads, head_dim, rbit, dtype):
    return _random(rng, (kv_heads, head_dim, rbit), dtype)


HEAD_MAJOR_CASES = [
    # dtype, head_dim, rbit, group, batch, tokens
    (jnp.bfloat16, 128, 128, 4, 2, 37),
    (jnp.float16, 64, 96, 3, 2, 37),
    (jnp.float32, 128, 256, 1, 3, 19),
    (jnp.bfloat16, 64, 32, 8, 2, 200),
    (jnp.float32, 64, 160, 2, 2, 130),
]


@pytest.mark.parametrize("dtype,head_dim,rbit,group,batch,tokens", HEAD_MAJOR_CASES)
def test_encode_head_major_cache_layout(dtype, head_dim, rbit, group, batch, tokens, rng):
    """x: [B, H, S, D] (head_axis=1): rows run along S, including a partial last tile."""
    kv_heads = 2
    x = _random(rng, (batch, kv_heads * group, tokens, head_dim), dtype)
    w = _projection(rng, kv_heads, head_dim, rbit, dtype)
    codes = hash_encode.encode(x, w, head_axis=1, interpret=True)
    assert codes.shape == (batch, kv_heads * group, tokens, rbit // 32)
    _assert_codes_match(codes, x, w, head_axis=1)


TOKEN_MAJOR_CASES = [
    # dtype, head_dim, rbit, group, x shape before [heads, D] (then the heads' axis is len(lead))
    (jnp.bfloat16, 128, 128, 4, (37,)),
    (jnp.float16, 128, 256, 8, (3,)),
    (jnp.float32, 64, 96, 3, (2,)),
    (jnp.bfloat16, 64, 64, 1, (5,)),
    (jnp.float32, 128, 32, 2, (2, 150)),
]


@pytest.mark.parametrize("dtype,head_dim,rbit,group,lead", TOKEN_MAJOR_CASES)
def test_encode_token_major_layout(dtype, head_dim, rbit, group, lead, rng):
    """x: [..., H, D] (queries [B, Hq, D], tokens [N, H, D], [B, S, H, D]): rows run along the lead dims."""
    kv_heads = 2
    x = _random(rng, (*lead, kv_heads * group, head_dim), dtype)
    w = _projection(rng, kv_heads, head_dim, rbit, dtype)
    head_axis = len(lead)
    codes = hash_encode.encode(x, w, head_axis=head_axis, interpret=True)
    _assert_codes_match(codes, x, w, head_axis=head_axis)


def test_encode_heads_between_other_axes_and_mixed_dtypes(rng):
    """x: [A, H, C, D] with A and C > 1 both real axes; bf16 x against a float32 projection."""
    x = _random(rng, (3, 6, 5, 64), jnp.bfloat16)
    w = _projection(rng, 3, 64, 96, jnp.float32)
    codes = hash_encode.encode(x, w, head_axis=1, interpret=True)
    _assert_codes_match(codes, x, w, head_axis=1)


STEP_CASES = [
    # dtype, head_dim, rbit, group, batch
    (jnp.bfloat16, 128, 128, 4, 2),
    (jnp.float16, 64, 96, 3, 3),
    (jnp.float32, 128, 256, 8, 2),
    (jnp.bfloat16, 64, 32, 1, 3),
    (jnp.float32, 64, 128, 3, 1),
]


@pytest.mark.parametrize("dtype,head_dim,rbit,group,batch", STEP_CASES)
def test_encode_step(dtype, head_dim, rbit, group, batch, rng):
    kv_heads = 3
    q = _random(rng, (batch, kv_heads * group, head_dim), dtype)
    k_new = _random(rng, (batch, kv_heads, head_dim), dtype)
    w = _projection(rng, kv_heads, head_dim, rbit, dtype)
    q_codes, k_codes, k_norms = hash_encode.encode_step(q, k_new, w, interpret=True)
    _assert_codes_match(q_codes, q, w, head_axis=1)
    _assert_codes_match(k_codes, k_new, w, head_axis=1)
    assert k_norms.shape == (batch, kv_heads) and k_norms.dtype == jnp.float32
    np.testing.assert_allclose(k_norms, hashing.key_norms(k_new), rtol=NORM_RTOL)
    np.testing.assert_allclose(k_norms, np.linalg.norm(np.asarray(k_new, np.float64), axis=-1), rtol=NORM_RTOL)


@pytest.mark.parametrize("dtype, w_dtype, head_dim, rbit, group, batch, planes", [
    (jnp.bfloat16, jnp.float32, 128, 128, 4, 2, 4),
    (jnp.float32, jnp.float32, 64, 96, 3, 3, 8),
    (jnp.float16, jnp.float16, 64, 32, 1, 1, 1),
    (jnp.bfloat16, jnp.bfloat16, 64, 256, 7, 2, 5),
])
def test_encode_step_query_planes(dtype, w_dtype, head_dim, rbit, group, batch, planes, rng):
    """query_planes = P: the query as the planes of its group-summed projection (within one level of
    the float64 projection), the key outputs as without planes."""
    kv_heads = 2
    w = _projection(rng, kv_heads, head_dim, rbit, w_dtype)
    q = _random(rng, (batch, kv_heads * group, head_dim), dtype)
    k_new = _random(rng, (batch, kv_heads, head_dim), dtype)
    q_planes, q_scales, k_codes, k_norms = hash_encode.encode_step(q, k_new, w, query_planes=planes, interpret=True)
    bf.check_query_planes(q_planes, q_scales, q, w, planes)
    _assert_codes_match(k_codes, k_new, w, 1)
    np.testing.assert_allclose(k_norms, hashing.key_norms(k_new), rtol=NORM_RTOL)
    ref_planes, ref_scales = hata_jax.query_planes(q, w, planes=planes, impl="reference")
    np.testing.assert_allclose(q_scales, ref_scales, rtol=1e-5)
    # Plane words differ only where a coordinate lies at a rounding boundary of its level (rare).
    assert np.mean(np.asarray(q_planes) == np.asarray(ref_planes)) > 0.95
    public = hata_jax.query_planes(q, w, planes=planes, impl="pallas")
    np.testing.assert_array_equal(public[0], q_planes)
    np.testing.assert_array_equal(public[1], q_scales)


def test_public_wrappers_dispatch_to_the_kernels(rng):
    q = _random(rng, (2, 8, 128), jnp.bfloat16)
    k_new = _random(rng, (2, 2, 128), jnp.bfloat16)
    cache = _random(rng, (2, 2, 21, 128), jnp.bfloat16)
    w = _projection(rng, 2, 128, 128, jnp.bfloat16)
    before = hata_jax.TRACE_LOG[("encode", "pallas-interpret")]
    via_wrapper = hata_jax.encode(cache, w, head_axis=-3, impl="pallas")
    assert hata_jax.TRACE_LOG[("encode", "pallas-interpret")] == before + 1
    np.testing.assert_array_equal(via_wrapper, hash_encode.encode(cache, w, head_axis=1, interpret=True))
    for got, want in zip(
        hata_jax.encode_step(q, k_new, w, impl="pallas"), hash_encode.encode_step(q, k_new, w, interpret=True)
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "call",
    [
        lambda: hash_encode.encode(jnp.ones((2, 4, 96)), jnp.ones((2, 96, 128)), head_axis=1),  # head_dim 96
        lambda: hash_encode.encode(jnp.ones((2, 4, 64)), jnp.ones((2, 64, 288)), head_axis=1),  # rbit 288
        lambda: hash_encode.encode(jnp.ones((2, 4, 64)), jnp.ones((2, 64, 48)), head_axis=1),  # rbit 48
        lambda: hash_encode.encode(jnp.ones((2, 4, 64), jnp.int32), jnp.ones((2, 64, 64)), head_axis=1),
        lambda: hash_encode.encode(jnp.ones((2, 3, 64)), jnp.ones((2, 64, 64)), head_axis=1),  # 3 heads, 2 KV
        lambda: hash_encode.encode(jnp.ones((2, 4, 64)), jnp.ones((2, 64, 64)), head_axis=2),  # head_dim axis
        lambda: hash_encode.encode_step(jnp.ones((2, 32, 64)), jnp.ones((2, 2, 64)), jnp.ones((2, 64, 64))),  # G=16
        lambda: hash_encode.encode_step(jnp.ones((2, 4, 64)), jnp.ones((1, 2, 64)), jnp.ones((2, 64, 64))),
        lambda: hash_encode.encode_step(jnp.ones((2, 4, 64)), jnp.ones((2, 2, 64)), jnp.ones((2, 64, 64)),
                                        query_planes=9),
    ],
)
def test_unsupported_inputs_raise(call):
    with pytest.raises(ValueError):
        call()


def test_empty_inputs_give_empty_outputs():
    w = jnp.ones((2, 64, 96))
    codes = hash_encode.encode(jnp.ones((1, 2, 0, 64), jnp.bfloat16), w, head_axis=1)
    assert codes.shape == (1, 2, 0, 3) and codes.dtype == jnp.uint32
    q_codes, k_codes, k_norms = hash_encode.encode_step(jnp.ones((0, 4, 64)), jnp.ones((0, 2, 64)), w)
    assert (q_codes.shape, k_codes.shape, k_norms.shape) == ((0, 4, 3), (0, 2, 3), (0, 2))


CUDA_CASES = [
    # dtype, head_dim, rbit, group
    (jnp.bfloat16, 128, 128, 4),
    (jnp.float32, 64, 96, 3),
]


@pytest.mark.parametrize("dtype,head_dim,rbit,group", CUDA_CASES)
def test_lowers_for_cuda(dtype, head_dim, rbit, group):
    kv_heads = 8
    w = jnp.ones((kv_heads, head_dim, rbit), dtype)
    cache = jnp.ones((2, kv_heads, 4099, head_dim), dtype)
    queries = jnp.ones((37, kv_heads * group, head_dim), dtype)
    k_new = jnp.ones((2, kv_heads, head_dim), dtype)
    assert "hash_encode" in backend.lower_for_cuda(hash_encode.encode, cache, w, head_axis=1)
    assert "hash_encode" in backend.lower_for_cuda(hash_encode.encode, queries, w, head_axis=1)
    assert "hash_encode_step" in backend.lower_for_cuda(hash_encode.encode_step, queries[:2], k_new, w)
    assert "hash_encode_step" in backend.lower_for_cuda(
        functools.partial(hash_encode.encode_step, query_planes=4), queries[:2], k_new, w)


def test_float32_dot_lowers_to_ieee_not_tf32(monkeypatch, capsys):
    """Triton's default for a float32 dot is tf32, which flips signs near zero: the kernels ask for IEEE."""
    pallas_call = pl.pallas_call
    monkeypatch.setattr(backend.pl, "pallas_call", lambda *a, **kw: pallas_call(*a, debug=True, **kw))
    w = jnp.ones((2, 64, 64), jnp.float32)
    backend.lower_for_cuda(hash_encode.encode, jnp.ones((2, 2, 40, 64), jnp.float32), w, head_axis=1)
    backend.lower_for_cuda(hash_encode.encode_step, jnp.ones((2, 4, 64)), jnp.ones((2, 2, 64)), w)
    triton_ir = capsys.readouterr().out
    assert triton_ir.count("tt.dot") == 3  # prefill: a dot per word (2); the step: both words in one dot
    assert "tf32" not in triton_ir


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_float32_projection_split_is_exact_to_2_16(dtype, rng):
    """A float32 w for 16-bit x is split, inside the kernel, into w_hi + w_lo of x's dtype summing
    to w within 2^-16 (plus the dtype's smallest subnormal, for float16), w_hi being w rounded to
    nearest even: checked on the split itself (with values at the rounding ties and below float16's
    normal range) and under jit.

    The high part must not come from a `w.astype(dtype).astype(float32)` round trip: XLA:GPU's
    excess-precision pass deletes such convert pairs under jit, leaving w_lo = 0 (seen on the H100
    as flipped code bits); the split rounds with integer operations on the bits, which the lowered
    kernel is checked for.
    """
    w = np.asarray(_projection(rng, 4, 64, 96, jnp.float32)).copy()
    ulp = 2.0 ** -(jnp.finfo(dtype).nmant)
    w[0, 0, :4] = [1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 3e-6]  # ties (to even) and a float16 subnormal
    split = jax.jit(lambda w: hash_encode._projection_parts(w, dtype))
    hi, lo = split(jnp.asarray(w))
    assert hi.dtype == lo.dtype == dtype
    np.testing.assert_array_equal(np.asarray(hi[0, 0, :3], np.float64), [1.0, 1 + 2 * ulp, -1.0])
    normal = np.abs(w) >= 2.0**-14  # float16's normal range: there the high part is w cast, ties to even
    np.testing.assert_array_equal(np.asarray(hi)[normal], np.asarray(jnp.asarray(w).astype(dtype))[normal])
    np.testing.assert_allclose(np.asarray(hi, np.float64) + np.asarray(lo, np.float64), w,
                               rtol=2.0**-16, atol=float(jnp.finfo(dtype).smallest_subnormal))
    assert np.any(np.asarray(lo) != 0)
    assert "bitcast_convert" in split.lower(jnp.asarray(w)).as_text()


def test_the_kernels_split_w_themselves():
    """A float32 w reaches the kernels as is: no XLA op runs around `encode_step` but reshapes."""
    text = backend.lower_for_cuda(hash_encode.encode_step, jnp.ones((1, 32, 128), jnp.bfloat16),
                                  jnp.ones((1, 8, 128), jnp.bfloat16), jnp.ones((8, 128, 128), jnp.float32))
    ops = set(backend.lowered_ops(text)) - {"module", "func.func", "call", "return"}
    assert ops == {"stablehlo.custom_call", "stablehlo.reshape"}, ops


gpu_only = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.parametrize("dtype,w_dtype,head_dim,rbit,group", [
    (dtype, dtype, head_dim, rbit, group) for dtype, head_dim, rbit, group in CUDA_CASES
] + [(jnp.bfloat16, jnp.float32, 128, 128, 4)])
def test_gpu_kernels_match_reference(dtype, w_dtype, head_dim, rbit, group, rng):
    kv_heads = 8
    w = _projection(rng, kv_heads, head_dim, rbit, w_dtype)
    cache = _random(rng, (2, kv_heads, 4099, head_dim), dtype)
    _assert_codes_match(jax.jit(hash_encode.encode, static_argnames="head_axis")(cache, w, head_axis=1), cache, w, 1)
    q = _random(rng, (3, kv_heads * group, head_dim), dtype)
    k_new = _random(rng, (3, kv_heads, head_dim), dtype)
    q_codes, k_codes, k_norms = jax.jit(hash_encode.encode_step)(q, k_new, w)
    _assert_codes_match(q_codes, q, w, 1)
    _assert_codes_match(k_codes, k_new, w, 1)
    np.testing.assert_allclose(k_norms, hashing.key_norms(k_new), rtol=NORM_RTOL)
