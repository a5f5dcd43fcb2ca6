"""Compare the selection kernel's scratch and outputs on the GPU with the interpreter's (debugging aid)."""
import numpy as np, jax, jax.numpy as jnp
from pallas_kernels import topk_select as ts
rng = np.random.default_rng(0)
for (B, H, S, budget, chunk) in [(1, 2, 4096, 64, 1024), (1, 8, 131072, 2048, None)]:
    scores = jnp.asarray(rng.standard_normal((B, H, S)).astype(np.float32))
    lengths = jnp.full((B,), S, jnp.int32)
    tiling = ts.Tiling(chunk=chunk, block=min(1024, chunk)) if chunk else ts.default_tiling(B * H, S)
    src = ts.GivenScores(S)
    for state in (ts.init_state(B, H),):
        outs = {}
        for interp in (True, False):
            outs[interp] = jax.jit(lambda s, n, st, interp=interp: ts.run_select(src, n, src.inputs(s), st, batch=B, kv_heads=H, seq=S, budget=budget, sink=0, recent=0, tiling=tiling, interpret=interp, name="dbg", debug=True))(scores, lengths, state)
        (i0, c0, s0, (k0, p0, n0, e0)), (i1, c1, s1, (k1, p1, n1, e1)) = outs[True], outs[False]
        print("case", B, H, S, budget, "chunk", tiling.chunk)
        print(" count", np.asarray(c0).ravel()[:4], np.asarray(c1).ravel()[:4])
        print(" hint", np.asarray(s0.hint)[0, :2], np.asarray(s1.hint)[0, :2], "tickets", np.asarray(s1.tickets).ravel()[:4], "hist sum", np.asarray(s1.hist).sum(-1).ravel()[:4])
        print(" counts(scratch, after finisher = prefix)", np.asarray(n0)[0, 0, :8], np.asarray(n1)[0, 0, :8])
        N = int(np.asarray(c0).ravel()[0])
        for name, a, b in (("keys", k0, k1), ("pos", p0, p1), ("small", e0, e1), ("idx", i0, i1)):
            a, b = np.asarray(a)[0, 0], np.asarray(b)[0, 0]
            lim = 9000 if name in ("keys", "pos") else a.size
            d = np.flatnonzero(a[:lim] != b[:lim])
            print(f" {name}: {d.size} differ in the first {lim}; first at {d[:5]}: {a[d[:5]]} vs {b[d[:5]]}")
