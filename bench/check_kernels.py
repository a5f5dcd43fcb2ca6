"""Run every Pallas kernel on this machine against its pure-JAX reference; fail loudly.

Fresh random inputs for every case (never zeros); device memory is poisoned before each
kernel call (see `bench.timing.poison_device_memory`) so unwritten outputs show up; every
output element is compared. Exit status 1 on any mismatch.

    python -m bench.check_kernels [--out results.json] [--small] [--only select storage=ring]

`--only WORD ...` runs the cases whose name contains any of the words (e.g. `select`). With `--out`, the JSON
is rewritten after every case, so a run cut short by a time limit keeps what it checked.

`--small` shrinks the shapes so the script also runs on a CPU (kernels interpreted).
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax as hj
from bench import kv_layouts
from bench.selector_speed import random_selector_params
from bench.timing import environment, poison_device_memory, write_json
from hata_jax.models.plan import METHODS, AttentionPlan
from hata_jax.models.selector_cache import SelectorCache, selector_attention
from hata_jax.selection import exact_slots
from hata_jax.selectors import select_indices
from pallas_kernels import band_select, hamming_topk

# BandConfig variants of the band select, checked by `check_select_variants` and timed by
# `bench.kernels --select-variants`: the default; a 1024-position sample (4x launch A's pairwise
# ranking; r = 16 sample ranks for k at the Llama shape, a band miss ~exp(-16)); tight limits (a
# quarter chunk of band slots, a 256-key list), under which crowded or heavily tied rows take
# the fallback; and a band that always misses (margins of -30 sample ranks: ~7% of a row above
# t_hi, more than k), so every row of distinct scores takes the fallback, listed (its candidates
# listed by one scan) or, with a 128-key list, whole (one program's radix select): their cost.
SELECT_VARIANTS = {
    "default": band_select.BandConfig(),
    "sample 1024": band_select.BandConfig(sample=1024),
    "tight": band_select.BandConfig(slots_divisor=4, list_cap=256),
    "band miss": band_select.BandConfig(sigmas=0.0, slack=-30.0),
    "band miss, whole row": band_select.BandConfig(sigmas=0.0, slack=-30.0, list_cap=128),
}


def _rng_arrays(seed: int):
    rng = np.random.default_rng(seed)

    def normal(shape, dtype):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    return rng, normal


def _rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def selection_problems(scores, lengths, idx, count, budget: int, sink: int, recent: int) -> list[str]:
    """What is wrong with (idx, count) as a top-`budget` selection of `scores` (empty list: nothing)."""
    scores, lengths = np.asarray(scores, np.float64), np.asarray(lengths)
    idx, count = np.asarray(idx), np.asarray(count)
    big = np.finfo(np.float32).max
    problems = []
    for b in range(scores.shape[0]):
        n = int(lengths[b])
        for h in range(scores.shape[1]):
            c = int(count[b, h])
            where = f"row (b={b}, h={h}), length {n}"
            if c != min(n, budget):
                problems.append(f"{where}: count {c}, expected {min(n, budget)}")
                continue
            chosen, rest = idx[b, h, :c], idx[b, h, c:]
            if (rest != -1).any():
                problems.append(f"{where}: slots past count are not -1: {rest[rest != -1][:5]}")
            if len(set(chosen.tolist())) != c or ((chosen < 0) | (chosen >= n)).any():
                problems.append(f"{where}: selected positions not distinct and in [0, {n}): {np.sort(chosen)[:8]}")
                continue
            forced = set(range(min(sink, n))) | set(range(max(n - recent, 0), n))
            if not forced <= set(chosen.tolist()):
                problems.append(f"{where}: forced positions missing: {sorted(forced - set(chosen.tolist()))[:8]}")
            row = np.nan_to_num(scores[b, h, :n], nan=-big, posinf=big, neginf=-big)
            mask = np.zeros(n, bool)
            mask[chosen] = True
            free = mask.copy()
            free[list(forced)] = False
            if free.any() and (~mask).any() and row[free].min() < row[~mask].max():
                problems.append(f"{where}: a selected score {row[free].min()} < an unselected {row[~mask].max()}")
    return problems


def _case(results: list, name: str, fn) -> None:
    try:
        detail = fn()
        ok = not detail.get("problems")
    except Exception as err:  # a kernel that fails to compile or run is a failed check
        detail = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=6)}
        ok = False
    results.append({"case": name, "ok": ok, **detail})
    print(
        f"[{'PASS' if ok else 'FAIL'}] {name} { ({k: v for k, v in detail.items() if k != 'traceback'}) }", flush=True
    )


def check_encode(seed, b, hkv, g, s, d, rbit, dtype):
    _, normal = _rng_arrays(seed)
    w = normal((hkv, d, rbit), jnp.float32)
    k = normal((b, hkv, s, d), dtype)
    q = normal((b, hkv * g, d), dtype)
    k_new = normal((b, hkv, d), dtype)
    poison_device_memory()
    codes = hj.encode(k, w, head_axis=1, impl="pallas")
    poison_device_memory()
    q_codes, kn_codes, kn_norms = hj.encode_step(q, k_new, w, impl="pallas")
    problems = []
    for name, x, axis, got in (("k", k, 1, codes), ("q", q, 1, q_codes), ("k_new", k_new, 1, kn_codes)):
        ref = hj.encode(x, w, head_axis=axis, impl="reference")
        # Bits whose projection is within rounding of zero may differ: compare the rest.
        xm = jnp.moveaxis(x, axis, -2).astype(jnp.float32)
        heads = xm.shape[-2]
        proj = jnp.einsum(
            "...hgd,hdr->...hgr",
            xm.reshape(*xm.shape[:-2], hkv, heads // hkv, d),
            w,
            precision=jax.lax.Precision.HIGHEST,
        ).reshape(*xm.shape[:-2], heads, rbit)
        proj = jnp.moveaxis(proj, -2, axis)
        sure = np.abs(np.asarray(proj)) > 1e-3 * float(jnp.std(proj))
        diff = np.asarray(hj.unpack_bits(got) != hj.unpack_bits(ref)) & sure
        if diff.any():
            problems.append(f"{name}: {int(diff.sum())} of {diff.size} bits differ")
    norm_err = _rel_err(kn_norms, hj.key_norms(k_new))
    if norm_err > 1e-6:
        problems.append(f"k_new norms rel err {norm_err:.2e}")
    # The asymmetric score's query planes: each coordinate within one level of the float32
    # projection (plus 1e-3 of the largest, the kernel's dot), the scale that largest over 15.
    poison_device_memory()
    q_planes, q_scales, _, _ = hj.encode_step(q, k_new, w, query_planes=hj.QUERY_PLANES, impl="pallas")
    qsum = jnp.einsum("bhgd,hdr->bhr", q.reshape(b, hkv, g, d).astype(jnp.float32), w,
                      precision=jax.lax.Precision.HIGHEST)
    signs = jnp.where(hj.unpack_bits(q_planes), 1.0, -1.0).reshape(b, hkv, hj.QUERY_PLANES, rbit)
    values = jnp.einsum("bhpr,p->bhr", signs, 2.0 ** jnp.arange(hj.QUERY_PLANES))
    peak = jnp.max(jnp.abs(qsum), axis=-1)
    scale_err = _rel_err(q_scales, peak / (2**hj.QUERY_PLANES - 1))
    off = np.asarray(jnp.abs(values * q_scales[..., None] - qsum) > q_scales[..., None] + 1e-3 * peak[..., None])
    if scale_err > 1e-4:
        problems.append(f"query planes: scale rel err {scale_err:.2e}")
    if off.any():
        problems.append(f"query planes: {int(off.sum())} of {off.size} coordinates off by more than one level")
    return {"problems": problems, "norm_rel_err": norm_err, "plane_scale_rel_err": scale_err}


def check_scores_and_topk(seed, b, hkv, g, s, rbit, budget, sink, recent, score):
    rng, normal = _rng_arrays(seed)
    words = rbit // 32
    q_codes = jnp.asarray(rng.integers(0, 2**32, (b, hkv * g, words), dtype=np.uint64).astype(np.uint32))
    k_codes = jnp.asarray(rng.integers(0, 2**32, (b, hkv, s, words), dtype=np.uint64).astype(np.uint32))
    norms = jnp.abs(normal((b, hkv, s), jnp.float32)) + 0.1
    lengths = jnp.asarray(rng.integers(1, s + 1, b).astype(np.int32)).at[0].set(s)
    # "asymmetric": g random query planes per KV head and their scales
    q_scales = jnp.abs(normal((b, hkv), jnp.float32)) + 0.01 if score == "asymmetric" else None
    ref_scores = hj.hamming_scores(q_codes, k_codes, norms, lengths, score=score, q_scales=q_scales, impl="reference")
    poison_device_memory()
    scores = hj.hamming_scores(q_codes, k_codes, norms, lengths, score=score, q_scales=q_scales, impl="pallas")
    problems = []
    mismatch = ~np.asarray((scores == ref_scores) | (jnp.isinf(scores) & jnp.isinf(ref_scores)))
    if mismatch.any():
        problems.append(f"scores: {int(mismatch.sum())} of {mismatch.size} differ from the reference")
    poison_device_memory()
    idx, count = hj.hamming_topk(
        q_codes, k_codes, norms, lengths, budget=budget, score=score, q_scales=q_scales, sink=sink, recent=recent,
        impl="pallas"
    )
    problems += [
        f"hamming_topk: {p}" for p in selection_problems(ref_scores, lengths, idx, count, budget, sink, recent)[:5]
    ]
    poison_device_memory()
    idx, count = hj.select_topk(ref_scores, budget, lengths, sink=sink, recent=recent, impl="pallas")
    problems += [
        f"select_topk: {p}" for p in selection_problems(ref_scores, lengths, idx, count, budget, sink, recent)[:5]
    ]
    return {"problems": problems}


def check_select_adversarial(seed, rows, s, budget):
    rng, _ = _rng_arrays(seed)
    lengths = jnp.full((rows,), s, jnp.int32)
    problems = []
    for kind, scores in (
        ("ties", rng.integers(0, 5, (rows, 1, s)).astype(np.float32)),
        ("all equal", np.full((rows, 1, s), 0.25, np.float32)),
        (
            "outliers",
            np.where(rng.random((rows, 1, s)) < 1e-3, 1e30, rng.standard_normal((rows, 1, s))).astype(np.float32),
        ),
        ("negative", -np.abs(rng.standard_normal((rows, 1, s))).astype(np.float32)),
    ):
        poison_device_memory()
        idx, count = hj.select_topk(jnp.asarray(scores), budget, lengths, impl="pallas")
        problems += [f"{kind}: {p}" for p in selection_problems(scores, lengths, idx, count, budget, 0, 0)[:3]]
    return {"problems": problems}


def check_select_variants(seed, rows, s, budget, sink=4, recent=16):
    """Each band-select variant (`SELECT_VARIANTS`) against the exact answer, slot for slot, on
    random and adversarial scores (ties, all equal, outliers, near-equal, sorted, one row with
    a band-dense stretch that overflows its chunks' slots: the listed fallback), ragged
    lengths, sink and recent; then the fused hamming_topk on random codes."""
    rng, _ = _rng_arrays(seed)
    interpret = jax.default_backend() != "gpu"
    lengths = rng.integers(budget // 2, s + 1, rows).astype(np.int32)
    lengths[0] = s
    shape = (rows, 1, s)
    normal = rng.standard_normal(shape).astype(np.float32)
    dense_stretch = normal.copy()
    level = np.sort(normal[0, 0])[::-1][budget // 2]
    dense_stretch[0, 0, s // 8 : s // 8 + s // 32] = level - rng.uniform(0, 1e-3, s // 32).astype(np.float32)
    cases = {
        "normal": normal,
        "ties": rng.integers(0, 5, shape).astype(np.float32),
        "all equal": np.full(shape, 0.25, np.float32),
        "outliers": np.where(rng.random(shape) < 1e-3, 1e30, normal).astype(np.float32),
        "near threshold": (np.float32(1.0).view(np.uint32) + rng.integers(0, 200, shape).astype(np.uint32)).view(
            np.float32
        ),
        "sorted": np.broadcast_to(np.arange(s, dtype=np.float32), shape).copy(),
        "dense stretch": dense_stretch,
    }
    problems, paths = [], {}
    for variant, config in SELECT_VARIANTS.items():
        select = jax.jit(
            lambda x, n, config=config: band_select.select_topk_with_path(
                x, budget, n, sink=sink, recent=recent, config=config, interpret=interpret
            )
        )
        for kind, scores in cases.items():
            poison_device_memory()
            idx, count, path = select(jnp.asarray(scores), jnp.asarray(lengths))
            paths[f"{variant} {kind}"] = np.unique(np.asarray(path)).tolist()
            bad = np.asarray(idx) != exact_slots(scores, lengths, budget, sink, recent)
            if bad.any() or not np.array_equal(np.asarray(count)[:, 0], np.minimum(lengths, budget)):
                problems.append(f"select_topk {variant} {kind}: {int(bad.sum())} slots differ from the exact answer")
    words, group = 4, 4
    q = jnp.asarray(rng.integers(0, 2**32, (1, 8 * group, words), dtype=np.uint64).astype(np.uint32))
    k = jnp.asarray(rng.integers(0, 2**32, (1, 8, s, words), dtype=np.uint64).astype(np.uint32))
    norms = jnp.abs(jnp.asarray(rng.standard_normal((1, 8, s)), jnp.float32)) + 0.1
    code_lengths = jnp.array([s], jnp.int32)
    for score in ("key_norm", "hamming"):
        want = exact_slots(
            hj.hamming_scores(q, k, norms, code_lengths, score=score, impl="reference"),
            np.asarray(code_lengths),
            budget,
            sink,
            recent,
        )
        for variant, config in SELECT_VARIANTS.items():
            poison_device_memory()
            idx, _, path = jax.jit(
                lambda *a, config=config, score=score: hamming_topk.hamming_topk_with_path(
                    *a, budget=budget, score=score, sink=sink, recent=recent, config=config, interpret=interpret
                )
            )(q, k, norms, code_lengths)
            paths[f"{variant} hamming_topk {score}"] = np.unique(np.asarray(path)).tolist()
            bad = np.asarray(idx) != want
            if bad.any():
                problems.append(f"hamming_topk {variant} {score}: {int(bad.sum())} slots differ from the exact answer")
    return {"problems": problems, "paths": paths}


def _random_selection(rng, lengths, hkv: int, budget: int):
    """(idx int32[B, Hkv, budget], count int32[B, Hkv]): min(lengths[b], budget) distinct random
    positions of each row below its length, then -1."""
    b = lengths.shape[0]
    count = jnp.minimum(lengths, budget)[:, None] * jnp.ones((1, hkv), jnp.int32)
    idx = np.full((b, hkv, budget), -1, np.int32)
    for bb in range(b):
        for h in range(hkv):
            c = int(count[bb, h])
            idx[bb, h, :c] = rng.choice(int(lengths[bb]), c, replace=False)
    return jnp.asarray(idx), count


def check_attention(seed, b, hkv, g, s, d, budget, dtype):
    rng, normal = _rng_arrays(seed)
    q = normal((b, hkv * g, d), dtype)
    k = normal((b, hkv, s, d), dtype)
    v = normal((b, hkv, s, d), dtype)
    lengths = jnp.asarray(rng.integers(1, s + 1, b).astype(np.int32)).at[0].set(s)
    idx, count = _random_selection(rng, lengths, hkv, budget)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    problems, errs = [], {}
    for name, run in (
        ("dense", lambda impl: hj.dense_decode_attention(q, k, v, lengths, return_lse=True, impl=impl)),
        ("sparse", lambda impl: hj.sparse_decode_attention(q, k, v, idx, count, return_lse=True, impl=impl)),
    ):
        ref_out, ref_lse = run("reference")
        poison_device_memory()
        out, lse = run("pallas")
        errs[name] = (_rel_err(out, ref_out), _rel_err(lse, ref_lse))
        if max(errs[name]) > tol:
            problems.append(f"{name}: rel err out {errs[name][0]:.2e}, lse {errs[name][1]:.2e} > {tol}")
    return {"problems": problems, "rel_err": errs}


def check_storage(seed, b, hkv, g, s, d, budget, dtype, kind):
    """Dense and sparse attention's Pallas kernels over a caller storage (bench.kv_layouts.KINDS,
    pages of 16 rows; "ring": a head-major ring buffer whose rows run past its end) against the
    reference path over the same storage and over the plain cache of the same tokens."""
    rng, normal = _rng_arrays(seed)
    q, k, v = normal((b, hkv * g, d), dtype), normal((b, hkv, s, d), dtype), normal((b, hkv, s, d), dtype)
    lengths = jnp.asarray(rng.integers(1, s + 1, b).astype(np.int32)).at[0].set(s)
    starts = jnp.asarray([int(rng.integers(0, n)) for n in np.asarray(lengths)], jnp.int32).at[0].set(0)
    plain_dense = {"starts": starts}
    if kind == "ring":  # the plain cache's position p of row b at slot (p + shift[b]) % s
        shift = rng.integers(0, s, b)
        store = {name: jnp.stack([jnp.roll(x[i], int(shift[i]), axis=1) for i in range(b)])
                 for name, x in (("k", k), ("v", v))}
        plain_k, plain_v = k.astype(jnp.float32), v.astype(jnp.float32)
        ring_starts = (starts + jnp.asarray(shift, jnp.int32)) % s
        dense_storage, dense_lengths = {"ring": True, "starts": ring_starts}, ring_starts + lengths - starts
    else:
        store, plain_k, plain_v = kv_layouts.make_storage(rng, k, v, *kv_layouts.KINDS[kind], page_size=16)
        dense_storage, dense_lengths = plain_dense, lengths
    kv = (store.pop("k"), store.pop("v"))
    plain_idx, count = _random_selection(rng, lengths, hkv, budget)
    idx = jnp.where(plain_idx >= 0, (plain_idx + shift[:, None, None]) % s, -1) if kind == "ring" else plain_idx
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    problems, errs = [], {}
    for name, run, plain in (
        ("dense", lambda impl: hj.dense_decode_attention(q, *kv, dense_lengths, return_lse=True, impl=impl,
                                                         **dense_storage, **store),
         lambda: hj.dense_decode_attention(q, plain_k, plain_v, lengths, return_lse=True, impl="reference",
                                           **plain_dense)),
        ("sparse", lambda impl: hj.sparse_decode_attention(q, *kv, idx, count, return_lse=True, impl=impl, **store),
         lambda: hj.sparse_decode_attention(q, plain_k, plain_v, plain_idx, count, return_lse=True,
                                            impl="reference")),
    ):
        ref_out, ref_lse = run("reference")
        poison_device_memory()
        out, lse = run("pallas")
        plain_out, plain_lse = plain()
        errs[name] = (_rel_err(out, ref_out), _rel_err(lse, ref_lse), _rel_err(ref_out, plain_out))
        if max(errs[name]) > tol:
            problems.append(f"{name}: rel err out {errs[name][0]:.2e}, lse {errs[name][1]:.2e}, reference vs the "
                            f"plain cache {errs[name][2]:.2e} > {tol}")
    return {"problems": problems, "rel_err": errs}


def check_selector_attention(seed, method, b, hkv, g, s, d, budget, dtype):
    """A selector's decode attention on the kernels' path (its scores in XLA, `select_topk` and
    `sparse_decode_attention` in Pallas) against the reference path on the same cache and state:
    the same tokens chosen per row and the same outputs (issue 20's selector paths)."""
    rng, normal = _rng_arrays(seed)
    k, v = normal((b, hkv, s, d), dtype), normal((b, hkv, s, d), dtype)
    lengths = jnp.asarray(rng.integers(budget, s + 1, b).astype(np.int32)).at[0].set(s)
    cache = hj.HataCache(k=k, v=v, codes=jnp.zeros((b, hkv, s, 4), jnp.uint32), norms=hj.key_norms(k),
                         lengths=lengths, starts=jnp.zeros((b,), jnp.int32), overflow=jnp.zeros((b,), bool),
                         uncoded=jnp.ones((b,), bool))
    plans = {impl: AttentionPlan.for_method(1, method, hj.HataConfig(budget=budget), impl, dense_layers=0)
             for impl in ("reference", "pallas")}
    params = random_selector_params(plans["pallas"], jax.random.PRNGKey(seed), hkv * g, hkv, d)
    state = plans["pallas"].selector.init_state(params, k, lengths)
    q = normal((b, hkv * g, d), dtype)
    problems, chosen, outs = [], {}, {}
    for impl, plan in plans.items():
        if impl == "pallas":
            poison_device_memory()
        idx, count = jax.jit(lambda q, st, p, plan=plan: select_indices(
            plan.selector, p, st, q, k, lengths, budget=budget, impl=plan.impl))(q, state, params)
        chosen[impl] = [sorted(np.asarray(idx)[r][: int(np.asarray(count)[r])].tolist())
                        for r in np.ndindex(*np.asarray(count).shape)]
        outs[impl] = jax.jit(lambda q, c, p, plan=plan: selector_attention(q, c, plan, p))(
            q, SelectorCache(cache, state), params)
    differ = sum(a != r for a, r in zip(chosen["pallas"], chosen["reference"]))
    if differ:
        problems.append(f"{differ} of {len(chosen['pallas'])} rows chose other tokens than the reference")
    err = _rel_err(outs["pallas"], outs["reference"])
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    if err > tol:
        problems.append(f"output rel err {err:.2e} > {tol}")
    return {"problems": problems, "rel_err": err}


def check_decode_step(seed, b, hkv, g, s, d, budget, dtype, steps=4, padded=False, storage=None, score="key_norm"):
    """hata_decode_attention's Pallas path against the reference for several steps
    on one cache: outputs, appended cache arrays and lengths. `padded`: a left-padded cache over
    K/V buffers (`HataCache.from_kv` with random `starts`); `storage`: over a caller storage
    (a kind of bench.kv_layouts.KINDS, pages of 16 rows), left-padded too; `score`: HataConfig's."""
    rng, normal = _rng_arrays(seed)
    w = normal((hkv, d, 128), jnp.float32)
    cfg = hj.HataConfig(rbit=128, budget=budget, score=score)
    t = s - 8
    lengths = jnp.asarray(rng.integers(budget // 2, t + 1, b).astype(np.int32)).at[0].set(t)
    if padded or storage:
        starts = jnp.asarray(rng.integers(0, np.asarray(lengths) // 2 + 1).astype(np.int32))
        k, v = normal((b, hkv, s, d), dtype), normal((b, hkv, s, d), dtype)
        kw = {}
        if storage:
            kw, _, _ = kv_layouts.make_storage(rng, k, v, *kv_layouts.KINDS[storage], page_size=16, logical=False)
            k, v = kw.pop("k"), kw.pop("v")
        ref_cache = hj.HataCache.from_kv(k, v, w, lengths, starts=starts, impl="reference", **kw)
    else:
        ref_cache = hj.HataCache.init(b, hkv, s, d, rbit=128, dtype=dtype).prefill(
            normal((b, hkv, t, d), dtype), normal((b, hkv, t, d), dtype), w, lengths, impl="reference"
        )
    cache = ref_cache
    step = {
        impl: jax.jit(lambda q, kn, vn, c, impl=impl: hj.hata_decode_attention(q, kn, vn, c, w, cfg, impl=impl))
        for impl in ("reference", "pallas")
    }
    problems, errs = [], []
    for i in range(steps):
        q, k_new, v_new = normal((b, hkv * g, d), dtype), normal((b, hkv, d), dtype), normal((b, hkv, d), dtype)
        ref, ref_cache = step["reference"](q, k_new, v_new, ref_cache)
        poison_device_memory()
        out, cache = step["pallas"](q, k_new, v_new, cache)
        errs.append(_rel_err(out, ref))
        if errs[-1] > 3e-2:
            problems.append(f"step {i}: rel err {errs[-1]:.2e}")
        for name in ("k", "v", "codes", "lengths", "overflow", "k_scale", "v_scale"):
            if getattr(cache, name) is not None and not np.array_equal(np.asarray(getattr(cache, name), np.float32),
                                  np.asarray(getattr(ref_cache, name), np.float32)):
                problems.append(f"step {i}: cache.{name} differs from the reference append")
        norm_err = _rel_err(cache.norms, ref_cache.norms)  # the kernel sums k * k in its own order
        if norm_err > 1e-6:
            problems.append(f"step {i}: cache.norms rel err {norm_err:.2e}")
    return {"problems": problems, "rel_err": errs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--small", action="store_true", help="small shapes (for a CPU run)")
    parser.add_argument("--only", nargs="+", default=None, help="run only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    n = 1 if args.small else 64  # scale of sequence lengths
    results: list = []
    env = environment()

    def case(name, fn):
        if args.only is None or any(word in name for word in args.only):
            _case(results, name, fn)
            if args.out:
                write_json(args.out, {"environment": env, "results": results})

    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    for i, (b, hkv, g, s, d, rbit, dt) in enumerate(
        [
            (1, 8, 4, 37 * n, 128, 128, bf16),
            (2, 3, 3, 29 * n, 64, 96, f32),
            (3, 2, 8, 11 * n, 128, 256, f16),
            (2, 4, 1, 5 * n, 64, 32, bf16),
        ]
    ):
        case(
            f"encode b={b} hkv={hkv} g={g} s={s} d={d} rbit={rbit} {jnp.dtype(dt).name}",
            lambda: check_encode(i, b, hkv, g, s, d, rbit, dt),
        )
    for i, (b, hkv, g, s, rbit, budget, sink, recent, score) in enumerate(
        [
            (1, 8, 4, 2048 * n, 128, 32 * n, 0, 0, "key_norm"),
            (3, 2, 3, 1000 * n + 7, 96, 100, 4, 16, "key_norm"),
            (2, 4, 8, 300 * n + 1, 256, 64, 0, 8, "hamming"),
            (2, 2, 1, 4096 * n, 32, 8192 if not args.small else 512, 0, 0, "key_norm"),
            (2, 8, 4, 2048 * n + 5, 128, 32 * n, 0, 0, "asymmetric"),  # g = 4 query planes
        ]
    ):
        case(
            f"scores+topk b={b} hkv={hkv} g={g} s={s} rbit={rbit} budget={budget} sink={sink} recent={recent} {score}",
            lambda: check_scores_and_topk(100 + i, b, hkv, g, s, rbit, budget, sink, recent, score),
        )
    case(
        f"select adversarial rows=8 s={2048 * n} budget={32 * n}",
        lambda: check_select_adversarial(7, 8, 2048 * n, 32 * n),
    )
    case(
        f"select variants rows=8 s={2048 * n} budget={32 * n} sink=4 recent=16 (exact slots)",
        lambda: check_select_variants(8, 8, 2048 * n, 32 * n),
    )
    for i, (b, hkv, g, s, d, budget, dt) in enumerate(
        [
            (1, 8, 4, 512 * n, 128, 32 * n, bf16),
            (3, 2, 3, 100 * n + 3, 64, 100, f32),
            (2, 4, 8, 64 * n, 128, 64, f16),
            (2, 2, 1, 50 * n, 64, 48, bf16),
        ]
    ):
        case(
            f"attention b={b} hkv={hkv} g={g} s={s} d={d} budget={budget} {jnp.dtype(dt).name}",
            lambda: check_attention(200 + i, b, hkv, g, s, d, budget, dt),
        )
    for i, score in enumerate(("key_norm", "asymmetric")):
        case(
            f"hata_decode_attention b=2 hkv=8 g=4 s=4096 d=128 budget=256 bf16 {score}" if not args.small
            else f"hata step small {score}",
            lambda: check_decode_step(300 + 10 * i, 2, 8 if not args.small else 2, 4, 4096 if not args.small else 300,
                                      128, 256 if not args.small else 64, bf16, score=score),
        )
    case(
        "hata_decode_attention left-padded b=3 hkv=2 g=3 s=3000 d=64 budget=128 f16" if not args.small
        else "hata step small left-padded",
        lambda: check_decode_step(301, 3, 2, 3, 3000 if not args.small else 200, 64, 128 if not args.small else 32,
                                  f16, padded=True),
    )
    for i, kind in enumerate([*kv_layouts.KINDS, "ring"]):
        b, hkv, g, s, d, budget, dt = ((3, 4, 4, 700 * n + 5, 128, 64 * n, bf16) if i % 2
                                       else (2, 2, 1, 333 * n, 64, 48, f32))
        case(f"attention storage={kind} b={b} hkv={hkv} g={g} s={s} d={d} budget={budget} {jnp.dtype(dt).name}",
             lambda: check_storage(400 + i, b, hkv, g, s, d, budget, dt, kind))
    for i, method in enumerate(sorted(set(METHODS) - {"dense", "hata"})):
        b, hkv, g, s, d, budget, dt = ((1, 8, 4, 8192 * n // 4, 128, 256 * n // 4, bf16) if n > 1
                                       else (2, 2, 3, 333, 64, 20, f32))
        case(f"selector {method} b={b} hkv={hkv} g={g} s={s} d={d} budget={budget} {jnp.dtype(dt).name}",
             lambda: check_selector_attention(600 + i, method, b, hkv, g, s, d, budget, dt))
    for i, kind in enumerate(("paged", "paged int8", "seq-major", "fp8 per-head")):
        case(f"hata_decode_attention storage={kind} b=3 hkv=2 g=4 s={1000 * n if n > 1 else 200} d=128 bf16",
             lambda: check_decode_step(500 + i, 3, 2, 4, 1000 * n if n > 1 else 200, 128, 128 if n > 1 else 32,
                                       bf16, storage=kind))
    failed = [r["case"] for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
