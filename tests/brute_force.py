"""Plain-numpy brute-force versions of the reference API, written without hata_jax.

Everything here works in float64 with explicit loops over (sequence, head, token) where that
keeps the definition obvious; the shapes are small enough in the tests for that to be quick.
"""
from __future__ import annotations

import numpy as np

WORD = 32


def as_f64(x) -> np.ndarray:
    """Any array (including a bf16 jax array) as a float64 numpy array."""
    return np.asarray(np.asarray(x, dtype=np.float32), dtype=np.float64)


def projections(x, w, head_axis: int = -2) -> np.ndarray:
    """float64 `x[..., h, ..., :] @ w[h // G]`; heads moved to axis -2: [..., heads, rbit]."""
    x = np.moveaxis(as_f64(x), head_axis, -2)
    w = as_f64(w)
    heads, kv_heads = x.shape[-2], w.shape[0]
    group = heads // kv_heads
    out = np.empty(x.shape[:-1] + (w.shape[2],))
    for h in range(heads):
        out[..., h, :] = x[..., h, :] @ w[h // group]
    return out


def pack_bits(bits) -> np.ndarray:
    """bool[..., rbit] -> uint32[..., rbit // 32], bit j of word c = column 32 c + j."""
    bits = np.asarray(bits, dtype=bool)
    words = np.zeros(bits.shape[:-1] + (bits.shape[-1] // WORD,), np.uint64)
    for c in range(words.shape[-1]):
        for j in range(WORD):
            words[..., c] |= bits[..., WORD * c + j].astype(np.uint64) << np.uint64(j)
    return words.astype(np.uint32)


def unpack_bits(codes) -> np.ndarray:
    """uint32[..., W] -> bool[..., 32 W]."""
    codes = np.asarray(codes, dtype=np.uint32)
    bits = np.zeros(codes.shape[:-1] + (codes.shape[-1] * WORD,), bool)
    for c in range(codes.shape[-1]):
        for j in range(WORD):
            bits[..., WORD * c + j] = (codes[..., c] >> np.uint32(j)) & np.uint32(1) == 1
    return bits


def encode(x, w, head_axis: int = -2):
    """(codes uint32 with heads back at `head_axis`, projections float64 [..., heads, rbit])."""
    proj = projections(x, w, head_axis)
    codes = pack_bits(proj > 0)
    axis = head_axis % np.ndim(x)
    return np.moveaxis(codes, -2, axis), proj


def key_norms(k) -> np.ndarray:
    k = as_f64(k)
    return np.sqrt((k * k).sum(-1))


def popcount(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint32)
    return np.unpackbits(x[..., None].view(np.uint8), axis=-1).sum(-1).astype(np.int64)


def plane_values(q_planes, planes: int) -> np.ndarray:
    """uint32[B, Hkv * P, W] query planes -> float64[B, Hkv, 32 W]: sum_p 2**p (+1 if bit set else -1)."""
    signs = np.where(unpack_bits(q_planes), 1.0, -1.0)
    b, rows, r = signs.shape
    return (signs.reshape(b, rows // planes, planes, r) * 2.0 ** np.arange(planes)[:, None]).sum(2)


def check_query_planes(q_planes, q_scales, q, w, planes: int):
    """The planes' odd levels times the scale are the group-summed projection to within one scale,
    the largest |coordinate| of each KV head sits at level +-(2**planes - 1), and the scale is
    that coordinate's magnitude over 2**planes - 1 (up to 1e-4 of it: a kernel's float32 dot)."""
    q_planes, q_scales = np.asarray(q_planes), np.asarray(q_scales)
    b, hq, _ = q.shape
    kv_heads = w.shape[0]
    qsum = projections(q, w, -2).reshape(b, kv_heads, hq // kv_heads, -1).sum(2)  # [B, Hkv, r]
    values = plane_values(q_planes, planes)
    top = 2**planes - 1
    scales = as_f64(q_scales)
    assert q_planes.shape == (b, kv_heads * planes, w.shape[2] // 32) and q_planes.dtype == np.uint32
    assert q_scales.shape == (b, kv_heads) and q_scales.dtype == np.float32
    peak_magnitude = np.abs(qsum).max(-1, keepdims=True)
    np.testing.assert_allclose(scales, peak_magnitude[..., 0] / top, rtol=1e-4)
    assert np.all(np.abs(values * scales[..., None] - qsum) <= scales[..., None] + 1e-4 * peak_magnitude)
    peak = np.abs(qsum).argmax(-1)[..., None]
    np.testing.assert_array_equal(np.take_along_axis(values, peak, -1),
                                  top * np.sign(np.take_along_axis(qsum, peak, -1)))


def hamming_scores(q_codes, k_codes, k_norms, lengths, score: str = "key_norm", q_scales=None) -> np.ndarray:
    """float64[B, Hkv, S]: the HATA score (or minus the summed Hamming distance, or the asymmetric
    score `||k|| * scale * v . b(k) / rbit` of query planes), -inf past lengths."""
    q_codes, k_codes = np.asarray(q_codes), np.asarray(k_codes)
    norms = as_f64(k_norms)
    b, hkv, s, words = k_codes.shape
    group = q_codes.shape[1] // hkv
    rbit = WORD * words
    values = plane_values(q_codes, group) if score == "asymmetric" else None
    key_signs = np.where(unpack_bits(k_codes), 1.0, -1.0)
    out = np.full((b, hkv, s), -np.inf)
    for i in range(b):
        for h in range(hkv):
            for t in range(int(lengths[i])):
                if score == "asymmetric":
                    out[i, h, t] = norms[i, h, t] * float(q_scales[i, h]) * (values[i, h] @ key_signs[i, h, t]) / rbit
                    continue
                dists = [popcount(q_codes[i, h * group + g] ^ k_codes[i, h, t]).sum() for g in range(group)]
                if score == "key_norm":
                    out[i, h, t] = norms[i, h, t] * sum(1.0 - 2.0 * d / rbit for d in dists)
                else:
                    out[i, h, t] = -float(sum(dists))
    return out


def attention(q, k, v, positions, scale: float | None = None):
    """Softmax attention in float64 of each query head over `positions[b][kv_head]` (a list of ints).

    q: [B, Hq, D]; k, v: [B, Hkv, S, D]. Returns (out [B, Hq, D], lse [B, Hq]); a head with no
    positions gets out 0, lse -inf.
    """
    q, k, v = as_f64(q), as_f64(k), as_f64(v)
    b, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, hq, d))
    lse = np.full((b, hq), -np.inf)
    for i in range(b):
        for h in range(hq):
            pos = np.asarray(positions[i][h // group], dtype=np.int64)
            if pos.size == 0:
                continue
            logits = scale * (k[i, h // group, pos] @ q[i, h])
            m = logits.max()
            p = np.exp(logits - m)
            out[i, h] = p @ v[i, h // group, pos] / p.sum()
            lse[i, h] = m + np.log(p.sum())
    return out, lse


def prefix_positions(lengths, kv_heads: int):
    """positions[b][h] = range(lengths[b]), the argument of :func:`attention` for dense attention."""
    return [[np.arange(int(n)) for _ in range(kv_heads)] for n in lengths]


def top_positions(scores, lengths, budget: int):
    """positions[b][h]: the `min(lengths[b], budget)` highest-scoring valid positions (stable on ties)."""
    scores = np.asarray(scores)
    out = []
    for i, n in enumerate(lengths):
        n = int(n)
        out.append([np.argsort(-scores[i, h, :n], kind="stable")[: min(n, budget)] for h in range(scores.shape[1])])
    return out


def check_selection(idx, count, scores, lengths, budget: int, sink: int = 0, recent: int = 0) -> None:
    """Assert that (idx, count) is a valid top-`budget` selection of `scores`, as a set.

    Ties are arbitrary, so this checks properties instead of exact indices: count =
    min(length, budget); the first `count` slots hold distinct valid positions, the rest -1;
    forced sink/recent positions are in; every other selected score >= every unselected valid score.
    """
    idx, count, scores = np.asarray(idx), np.asarray(count), np.asarray(scores, np.float64)
    assert idx.shape == scores.shape[:2] + (budget,) and idx.dtype == np.int32
    assert count.shape == scores.shape[:2] and count.dtype == np.int32
    for i, n in enumerate(np.asarray(lengths)):
        n = int(n)
        for h in range(scores.shape[1]):
            where = f"row (b={i}, h={h}), length {n}, budget {budget}"
            c = min(n, budget)
            assert count[i, h] == c, where
            assert np.all(idx[i, h, c:] == -1), where
            chosen = idx[i, h, :c]
            assert len(set(chosen.tolist())) == c, f"duplicate positions in {where}: {chosen}"
            assert np.all((chosen >= 0) & (chosen < n)), f"invalid positions in {where}: {chosen}"
            forced = set(range(min(sink, n))) | set(range(max(n - recent, 0), n))
            assert forced <= set(chosen.tolist()), f"forced {sorted(forced)} missing in {where}"
            free = np.setdiff1d(chosen, sorted(forced))
            rest = np.setdiff1d(np.arange(n), chosen)
            if free.size and rest.size:
                assert scores[i, h, free].min() >= scores[i, h, rest].max(), where
            if n <= budget:
                assert sorted(chosen.tolist()) == list(range(n)), where


def check_codes(codes, x, w, head_axis: int) -> None:
    """Assert `codes` = encode(x, w) bit for bit, except bits whose float64 projection is ~0
    (within a float32 dot product's rounding of 0), and that such bits are rare."""
    expected, proj = encode(x, w, head_axis)
    codes = np.asarray(codes)
    assert codes.dtype == np.uint32 and codes.shape == expected.shape
    got_bits = np.moveaxis(unpack_bits(codes), head_axis % codes.ndim, -2)
    bound = 1e-5 * projections(np.abs(as_f64(x)), np.abs(as_f64(w)), head_axis)
    ambiguous = np.abs(proj) <= bound
    assert np.all((got_bits == (proj > 0)) | ambiguous)
    assert ambiguous.sum() <= 2 + 1e-3 * ambiguous.size
