"""Check and time every kernel against its baselines in one run; write JSON.

    python -m bench.kernels --out $OUT/kernels.json [--small] [--skip-check]
    python -m bench.kernels --out $OUT/select_variants.json --select-variants --skip-check

`--only storages` times dense, sparse and HATA attention over each caller storage of K/V
(bench.kv_layouts: both layouts, pages, int8 / fp8) next to the head-major cache.

`--select-variants` times each BandConfig variant of the band select (`check_kernels.SELECT_VARIANTS`)
for select_topk on [8, S] float32 scores and for the fused hamming_topk at batch 1, 8 KV heads
(S = 131072, k = 2048 unless --small), next to lax.top_k, with per-launch device times; then the
fused hamming_topk under other tilings (`tiling_variants`), each row saying whether its slots equal
the default tiling's.

Shapes (unless --small): Llama-3.1-8B attention, 32 query heads, 8 KV heads, D=128, bf16,
rbit 128, budget 2048. The HATA layer (`pallas hata attention`) runs HataConfig's default score, as the
model's layers do (rows before 2026-12-07 ran the paper's key_norm score). Every timing is a median (see
bench.timing) taken in this process next to its baseline; byte floors use the copy bandwidth measured in
the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

import hata_jax as hj
from bench import check_kernels, kv_layouts
from bench.decode_steps import hata_attention
from bench.profile import device_kernel_us
from bench.timing import environment, floor_bandwidth_gbps, median_us, write_json
from hata_jax import HataCache, HataConfig
from pallas_kernels import band_select, hamming_topk
from pallas_kernels import radix_select as rs
from pallas_kernels.backend import on_gpu


@dataclasses.dataclass(frozen=True)
class Shapes:
    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    rbit: int = 128
    budget: int = 2048
    dtype: str = "bfloat16"
    long: int = 131072
    contexts: tuple = (32768, 131072)
    batches: tuple = (1, 8)


SMALL = Shapes(q_heads=8, kv_heads=2, head_dim=64, budget=64, long=2048, contexts=(1024, 2048), batches=(1, 2))


def _random_codes(key, shape):
    return jax.random.bits(key, shape, jnp.uint32)


def tiling_variants(rows: int, seq: int) -> dict[str, rs.Tiling]:
    """Tilings of the select-variants sweep at `rows` x `seq`: the default and, where the row is long
    enough, chunks of 4x and 2x the default with two pipeline stages, and half the default."""
    default = rs.default_tiling(rows, seq)
    out = {f"default (chunk {default.chunk})": default}
    for factor, stages in ((4, 2), (2, 2), (1, 2)):
        chunk = default.chunk * factor
        if chunk <= seq:
            out[f"chunk {chunk}, {stages} stages"] = dataclasses.replace(default, chunk=chunk, num_stages=stages)
    if default.chunk // 2 >= max(default.block, rs.MIN_BLOCK):
        half = default.chunk // 2
        out[f"chunk {half}"] = dataclasses.replace(default, chunk=half, scan_block=min(default.scan_block, half))
    return out


class Bench:
    def __init__(self, shapes: Shapes, bandwidth_gbps: float, small: bool):
        self.s, self.bw, self.small = shapes, bandwidth_gbps, small
        self.rows: list[dict] = []
        self.key = jax.random.PRNGKey(1234)
        self.storage_shapes: list[tuple[int, int]] = []  # (batch, context) pairs of `storages`; []: its default
        self.storage_kinds: list[str] = []  # the kinds of `storages` (bench.kv_layouts.KINDS); []: all

    def _next(self):
        self.key, sub = jax.random.split(self.key)
        return sub

    def normal(self, shape, dtype=None):
        return jax.random.normal(self._next(), shape, jnp.dtype(dtype or self.s.dtype))

    def timed(self, fn, arg_sets) -> dict:
        """Wall-time medians (bench.timing) plus the device time of the kernels alone (profiler)."""
        timing = median_us(fn, arg_sets)
        if jax.default_backend() == "gpu":
            try:
                kernels = device_kernel_us(fn, arg_sets[0], calls=3)
            except Exception as err:  # a trace too large to parse: keep the wall time
                timing["device_error"] = str(err)[:200]
                return timing
            timing["device_us"] = kernels.pop("total")
            kernels.pop("lines_seen", None)
            timing["kernels_us"] = {k: round(v, 2) for k, v in kernels.items()}
        return timing

    def record(self, group: str, name: str, shape: dict, timing: dict, nbytes: float | None = None, **extra):
        row = {"group": group, "name": name, **shape, **timing, **extra}
        if nbytes:
            row["bytes"] = nbytes
            row["floor_us"] = nbytes / (self.bw * 1e3)
            row["gbps"] = nbytes / (timing["median_us"] * 1e3)
            row["of_floor"] = timing["median_us"] / row["floor_us"]
        self.rows.append(row)
        print(
            f"  {group:<10} {name:<28} {str(shape):<60} {timing['median_us']:>10.1f} us"
            + (f" (device {timing['device_us']:.1f} us)" if "device_us" in timing else "")
            + (f"   {row['gbps']:>7.0f} GB/s ({row['of_floor']:.2f}x floor)" if nbytes else ""),
            flush=True,
        )
        return timing["median_us"]

    def n_sets(self, bytes_per_set: float) -> int:
        """Enough distinct argument sets that their large arrays overflow the 50 MB L2, at most 16."""
        return int(np.clip(np.ceil(200e6 / max(bytes_per_set, 1)), 2, 16))

    def selection(self):
        s = self.s
        rows, n = s.kv_heads, s.long
        shape = {"rows": rows, "seq": n, "k": s.budget}
        sets = [(jax.random.normal(self._next(), (1, rows, n), jnp.float32),) for _ in range(self.n_sets(rows * n * 4))]
        lengths = jnp.array([n], jnp.int32)
        t_topk = self.record("select", "lax.top_k", shape, self.timed(lambda x: jax.lax.top_k(x, s.budget), sets))
        t_ours = self.record(
            "select",
            "pallas select_topk",
            shape,
            self.timed(lambda x: hj.select_topk(x, s.budget, lengths, impl="pallas"), sets),
        )
        self.rows[-1]["speedup_vs_top_k"] = t_topk / t_ours

    def select_variants(self):
        """select_topk and hamming_topk in each band-select variant, on the same inputs."""
        s = self.s
        rows, n, g, words = s.kv_heads, s.long, s.q_heads // s.kv_heads, s.rbit // 32
        lengths = jnp.array([n], jnp.int32)
        interpret = not on_gpu()
        score_sets = [
            (jax.random.normal(self._next(), (1, rows, n), jnp.float32),) for _ in range(self.n_sets(rows * n * 4))
        ]
        code_bytes = rows * n * (4 * words + 4)
        code_sets = [
            (
                _random_codes(self._next(), (1, s.q_heads, words)),
                _random_codes(self._next(), (1, rows, n, words)),
                jnp.abs(jax.random.normal(self._next(), (1, rows, n), jnp.float32)),
            )
            for _ in range(self.n_sets(code_bytes))
        ]
        select_shape = {"rows": rows, "seq": n, "k": s.budget}
        topk_shape = {"batch": 1, "kv_heads": rows, "gqa": g, "seq": n, "rbit": s.rbit, "k": s.budget}
        t_topk = self.record(
            "select_variants", "lax.top_k", select_shape, self.timed(lambda x: jax.lax.top_k(x, s.budget), score_sets)
        )
        for variant, config in check_kernels.SELECT_VARIANTS.items():

            def select(x, config=config):
                return band_select.select_topk_with_path(x, s.budget, lengths, config=config, interpret=interpret)

            def topk(q, k, norms, config=config):
                return hamming_topk.hamming_topk_with_path(
                    q, k, norms, lengths, budget=s.budget, config=config, interpret=interpret
                )

            paths = np.unique(np.asarray(jax.jit(select)(*score_sets[0])[2])).tolist()
            t = self.record(
                "select_variants", f"select_topk {variant}", select_shape, self.timed(select, score_sets), paths=paths
            )
            self.rows[-1]["speedup_vs_top_k"] = t_topk / t
            paths = np.unique(np.asarray(jax.jit(topk)(*code_sets[0])[2])).tolist()
            self.record(
                "select_variants",
                f"hamming_topk {variant}",
                topk_shape,
                self.timed(topk, code_sets),
                code_bytes,
                paths=paths,
            )
        # The fused hamming_topk (default BandConfig) under other tilings: fewer, longer programs whose
        # loop steps can overlap loads with compute (num_stages 2), or more, shorter ones.
        default_idx = np.asarray(jax.jit(lambda *a: hj.hamming_topk(*a, lengths, budget=s.budget,
                                                                     impl="pallas")[0])(*code_sets[0]))
        for name, tiling in tiling_variants(rows, n).items():

            def tiled(q, k, norms, tiling=tiling):
                return hamming_topk.hamming_topk_with_path(
                    q, k, norms, lengths, budget=s.budget, interpret=interpret, tiling=tiling
                )

            idx, _, path = jax.jit(tiled)(*code_sets[0])
            self.record("select_variants", f"hamming_topk tiling {name}", topk_shape, self.timed(tiled, code_sets),
                        code_bytes, paths=np.unique(np.asarray(path)).tolist(),
                        same_as_default=bool(np.array_equal(np.asarray(idx), default_idx)))

    def scoring(self):
        s = self.s
        g, words, n = s.q_heads // s.kv_heads, s.rbit // 32, s.long
        shape = {"batch": 1, "kv_heads": s.kv_heads, "gqa": g, "seq": n, "rbit": s.rbit}
        code_bytes = s.kv_heads * n * (4 * words + 4)
        sets = [
            (
                _random_codes(self._next(), (1, s.q_heads, words)),
                _random_codes(self._next(), (1, s.kv_heads, n, words)),
                jnp.abs(jax.random.normal(self._next(), (1, s.kv_heads, n), jnp.float32)),
                jnp.array([n], jnp.int32),
            )
            for _ in range(self.n_sets(code_bytes))
        ]
        self.record(
            "score",
            "xla reference scores",
            shape,
            self.timed(lambda *a: hj.hamming_scores(*a, impl="reference"), sets),
            code_bytes,
        )
        self.record(
            "score",
            "pallas hamming_scores",
            shape,
            self.timed(lambda *a: hj.hamming_scores(*a, impl="pallas"), sets),
            code_bytes,
            note="bytes = codes + norms read (the 4 B/token score write not counted)",
        )
        self.record(
            "score+select",
            "xla scores + lax.top_k",
            {**shape, "k": s.budget},
            self.timed(lambda *a: hj.hamming_topk(*a, budget=s.budget, impl="reference"), sets),
            code_bytes,
        )
        self.record(
            "score+select",
            "pallas hamming_topk",
            {**shape, "k": s.budget},
            self.timed(lambda *a: hj.hamming_topk(*a, budget=s.budget, impl="pallas"), sets),
            code_bytes,
        )
        # The asymmetric score on the same keys: 4 query planes per KV head and their scales.
        planes = [(_random_codes(self._next(), (1, s.kv_heads * hj.QUERY_PLANES, words)), *rest,
                   jnp.abs(jax.random.normal(self._next(), (1, s.kv_heads), jnp.float32)) + 0.01)
                  for _, *rest in sets]
        self.record(
            "score+select",
            "pallas hamming_topk asymmetric",
            {**shape, "k": s.budget, "planes": hj.QUERY_PLANES},
            self.timed(lambda q, k, n, l, sc: hj.hamming_topk(q, k, n, l, budget=s.budget, score="asymmetric",
                                                              q_scales=sc, impl="pallas"), planes),
            code_bytes,
        )

    def _cache(self, b, n):
        k, v = (
            self.normal((b, self.s.kv_heads, n, self.s.head_dim)),
            self.normal((b, self.s.kv_heads, n, self.s.head_dim)),
        )
        return k, v

    def attention(self):
        s = self.s
        item = jnp.dtype(s.dtype).itemsize
        self.best_dense = {}
        for n in s.contexts:
            for b in s.batches:
                shape = {"batch": b, "seq": n, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim}
                k, v = self._cache(b, n)
                lengths = jnp.full((b,), n, jnp.int32)
                kv_bytes = 2 * b * s.kv_heads * n * s.head_dim * item
                qs = [self.normal((b, s.q_heads, s.head_dim)) for _ in range(4)]
                sets = [(q, k, v, lengths) for q in qs]
                times = {
                    "pallas": self.record(
                        "dense",
                        "pallas dense_decode",
                        shape,
                        self.timed(lambda q, k, v, l: hj.dense_decode_attention(q, k, v, l, impl="pallas"), sets),
                        kv_bytes,
                    )
                }
                if b == 1:  # XLA is far behind at larger batches (2x cuDNN at 32K x 8): not worth the run time
                    times["xla"] = self.record(
                        "dense",
                        "xla reference",
                        shape,
                        self.timed(lambda q, k, v, l: hj.dense_decode_attention(q, k, v, l, impl="reference"), sets),
                        kv_bytes,
                    )
                if jax.default_backend() == "gpu":
                    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # cuDNN wants [B, S, H, D]
                    cudnn_sets = [(q[:, None], kt, vt, lengths) for q in qs]
                    try:
                        times["cudnn"] = self.record(
                            "dense",
                            "cudnn dot_product_attention",
                            shape,
                            self.timed(
                                lambda q, k, v, l: jax.nn.dot_product_attention(
                                    q, k, v, key_value_seq_lengths=l, implementation="cudnn"
                                ),
                                cudnn_sets,
                            ),
                            kv_bytes,
                        )
                    except Exception as err:  # record why the baseline is missing, keep going
                        self.rows.append(
                            {"group": "dense", "name": "cudnn dot_product_attention", **shape, "error": str(err)[:500]}
                        )
                        print(f"  cudnn failed: {str(err)[:200]}")
                    del kt, vt
                best = min(times, key=times.get)
                dense_rows = [
                    r for r in self.rows if r["group"] == "dense" and r.get("batch") == b and r.get("seq") == n
                ]
                device = [r["device_us"] for r in dense_rows if "device_us" in r]
                self.best_dense[(b, n)] = (best, times[best], min(device) if device else None)
                self.hata(b, n, k, v, qs, shape)
                del k, v

    def hata(self, b, n, k, v, qs, shape):
        """Encode (q and k_new) + score + select + sparse attention on a full cache, vs the best dense."""
        s = self.s
        words = s.rbit // 32
        w = jax.random.normal(self._next(), (s.kv_heads, s.head_dim, s.rbit), jnp.float32)
        codes = _random_codes(self._next(), (b, s.kv_heads, n, words))
        norms = jnp.abs(jax.random.normal(self._next(), (b, s.kv_heads, n), jnp.float32))
        lengths = jnp.full((b,), n, jnp.int32)
        k_new = self.normal((b, s.kv_heads, s.head_dim))
        item = jnp.dtype(s.dtype).itemsize

        config = HataConfig(rbit=s.rbit, budget=s.budget)  # the default score, as the model's layers run it
        none = jnp.zeros((b,), bool)
        cache = HataCache(k=k, v=v, codes=codes, norms=norms, lengths=lengths, starts=jnp.zeros((b,), jnp.int32),
                          overflow=none, uncoded=none)
        sel_bytes = b * s.kv_heads * (n * (4 * words + 4) + s.budget * (2 * s.head_dim * item + 4))
        sets = [(q,) for q in qs]
        t = self.record(
            "hata",
            "pallas hata attention",
            {**shape, "budget": s.budget, "score": config.score},
            self.timed(lambda q: hata_attention(q, k_new, cache, w, config, "pallas"), sets),
            sel_bytes,
        )
        best, t_dense, dense_device = self.best_dense[(b, n)]
        self.rows[-1].update(best_dense=best, best_dense_us=t_dense, speedup_vs_best_dense=t_dense / t)
        if dense_device and "device_us" in self.rows[-1]:
            self.rows[-1].update(
                best_dense_device_us=dense_device,
                device_speedup_vs_best_dense=dense_device / self.rows[-1]["device_us"],
            )
        ks = [jnp.asarray(np.random.default_rng(i).choice(n, (b, s.kv_heads, s.budget)), jnp.int32) for i in range(4)]
        counts = jnp.full((b, s.kv_heads), s.budget, jnp.int32)
        row_bytes = b * s.kv_heads * s.budget * (2 * s.head_dim * item + 4)
        self.record(
            "sparse",
            "pallas sparse_decode",
            {**shape, "budget": s.budget},
            self.timed(lambda q, i: hj.sparse_decode_attention(q, k, v, i, counts, impl="pallas"), list(zip(qs, ks))),
            row_bytes,
        )
        self.record(
            "sparse",
            "xla reference",
            {**shape, "budget": s.budget},
            self.timed(
                lambda q, i: hj.sparse_decode_attention(q, k, v, i, counts, impl="reference"), list(zip(qs, ks))
            ),
            row_bytes,
        )

    def storages(self):
        """Dense, sparse and HATA attention over each caller storage (bench.kv_layouts.KINDS: layouts,
        pages of 16 rows, int8 / fp8 K/V) at 128K x 1 and 32K x 8 (unless --small), each next to
        the head-major bf16 cache of the same tokens in this run."""
        s = self.s
        words = s.rbit // 32
        rng = np.random.default_rng(0)
        for b, n in self.storage_shapes or ((1, s.long), (max(s.batches), min(s.contexts))):
            k, v = self._cache(b, n)
            qs = [self.normal((b, s.q_heads, s.head_dim)) for _ in range(4)]
            lengths = jnp.full((b,), n, jnp.int32)
            w = jax.random.normal(self._next(), (s.kv_heads, s.head_dim, s.rbit), jnp.float32)
            codes = _random_codes(self._next(), (b, s.kv_heads, n, words))
            norms = jnp.abs(jax.random.normal(self._next(), (b, s.kv_heads, n), jnp.float32))
            k_new = self.normal((b, s.kv_heads, s.head_dim))
            idx = [jnp.asarray(np.random.default_rng(i).choice(n, (b, s.kv_heads, s.budget)), jnp.int32)
                   for i in range(4)]
            counts = jnp.full((b, s.kv_heads), s.budget, jnp.int32)
            shape = {"batch": b, "seq": n, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim}
            for kind, (seq_axis, paged, quant) in kv_layouts.KINDS.items():
                if self.storage_kinds and kind not in self.storage_kinds:
                    continue
                stored, _, _ = kv_layouts.make_storage(rng, k, v, seq_axis, paged, quant, page_size=16,
                                                       logical=False)
                sk, sv = stored.pop("k"), stored.pop("v")
                row = {**shape, "storage": kind, "kv_dtype": str(sk.dtype)}
                kv_item = jnp.dtype(sk.dtype).itemsize + (4 / s.head_dim if stored["k_scale"] is not None else 0)

                def dense(q, sk=sk, sv=sv, stored=stored):
                    return hj.dense_decode_attention(q, sk, sv, lengths, impl="pallas", **stored)

                def sparse(q, i, sk=sk, sv=sv, stored=stored):
                    return hj.sparse_decode_attention(q, sk, sv, i, counts, impl="pallas", **stored)

                def hata(q, sk=sk, sv=sv, stored=stored):
                    q_codes, _, _ = hj.encode_step(q, k_new, w, impl="pallas")
                    i, c = hj.hamming_topk(q_codes, codes, norms, lengths, budget=s.budget, impl="pallas")
                    return hj.sparse_decode_attention(q, sk, sv, i, c, impl="pallas", **stored)

                dense_bytes = 2 * b * s.kv_heads * n * s.head_dim * kv_item
                rows_bytes = b * s.kv_heads * s.budget * (2 * s.head_dim * kv_item + 4)
                sel_bytes = b * s.kv_heads * n * (4 * words + 4) + rows_bytes
                self.record("storage", f"dense {kind}", row, self.timed(dense, [(q,) for q in qs]), dense_bytes)
                self.record("storage", f"sparse {kind}", {**row, "budget": s.budget},
                            self.timed(sparse, list(zip(qs, idx))), rows_bytes)
                self.record("storage", f"hata {kind}", {**row, "budget": s.budget},
                            self.timed(hata, [(q,) for q in qs]), sel_bytes)
                del sk, sv, stored
            del k, v

    def encode(self):
        s = self.s
        n = s.long
        x_sets = [(self.normal((1, s.kv_heads, n, s.head_dim)),) for _ in range(2)]
        w = jax.random.normal(self._next(), (s.kv_heads, s.head_dim, s.rbit), jnp.float32)
        nbytes = s.kv_heads * n * (s.head_dim * jnp.dtype(s.dtype).itemsize + s.rbit // 8)
        shape = {"batch": 1, "kv_heads": s.kv_heads, "tokens": n, "rbit": s.rbit}
        self.record(
            "encode",
            "pallas encode (prefill)",
            shape,
            self.timed(lambda x: hj.encode(x, w, head_axis=1, impl="pallas"), x_sets),
            nbytes,
        )
        self.record(
            "encode",
            "xla reference",
            shape,
            self.timed(lambda x: hj.encode(x, w, head_axis=1, impl="reference"), x_sets),
            nbytes,
        )
        step_sets = [
            (self.normal((1, s.q_heads, s.head_dim)), self.normal((1, s.kv_heads, s.head_dim))) for _ in range(16)
        ]
        shape = {"batch": 1, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "rbit": s.rbit}
        self.record(
            "encode",
            "pallas encode_step",
            shape,
            self.timed(lambda q, k: hj.encode_step(q, k, w, impl="pallas"), step_sets),
        )
        self.record(
            "encode",
            "xla reference step",
            shape,
            self.timed(lambda q, k: hj.encode_step(q, k, w, impl="reference"), step_sets),
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--skip-check", action="store_true", help="do not run bench.check_kernels first")
    parser.add_argument(
        "--only", nargs="*", default=None,
        help="subset of: encode selection scoring attention storages select_variants"
    )
    parser.add_argument(
        "--contexts", type=int, nargs="*", default=None, help="attention contexts (default 32768 131072)"
    )
    parser.add_argument("--batches", type=int, nargs="*", default=None, help="attention batches (default 1 8)")
    parser.add_argument(
        "--select-variants", action="store_true", help="time each band-select variant (alone, or added to --only)"
    )
    parser.add_argument("--storage-shapes", nargs="*", default=[], metavar="BATCH:CONTEXT",
                        help="(batch, context) pairs of --only storages (default 1:131072 8:32768)")
    parser.add_argument("--storage-kinds", nargs="*", default=[], help="kinds of --only storages (default: all)")
    args = parser.parse_args(argv)
    env = environment()
    print(env, flush=True)
    check_status = None
    if not args.skip_check:
        check_status = check_kernels.main(
            ["--out", args.out.replace(".json", "_check.json")] + (["--small"] if args.small else [])
        )
    bandwidth = floor_bandwidth_gbps(1 << (24 if args.small else 30))
    print(f"bandwidth: {bandwidth}", flush=True)
    shapes = SMALL if args.small else Shapes()
    shapes = dataclasses.replace(
        shapes, contexts=tuple(args.contexts or shapes.contexts), batches=tuple(args.batches or shapes.batches)
    )
    bench = Bench(shapes, bandwidth["floor_gbps"], args.small)
    bench.storage_shapes = [tuple(int(x) for x in pair.split(":")) for pair in args.storage_shapes]
    bench.storage_kinds = args.storage_kinds
    parts = args.only or ([] if args.select_variants else ["encode", "selection", "scoring", "attention"])
    for part in parts + (["select_variants"] if args.select_variants else []):
        try:
            getattr(bench, part)()
        except Exception as err:  # keep the other parts' numbers; the error goes into the JSON
            bench.rows.append({"group": part, "error": f"{type(err).__name__}: {str(err)[:1500]}"})
            print(f"!! {part} failed: {type(err).__name__}: {str(err)[:1500]}", flush=True)
        write_json(
            args.out,
            {
                "environment": env,
                **bandwidth,
                "checks_passed": check_status == 0,
                "shapes": dataclasses.asdict(bench.s),
                "rows": bench.rows,
            },
        )
    return 0 if check_status in (0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
