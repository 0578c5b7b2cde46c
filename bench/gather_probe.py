"""Probe: row-gather speed of XLA's gather on this GPU, as bf16 elements vs 32-bit words."""
import jax
import jax.numpy as jnp

from timing import timed  # bench/timing.py (run from the repo root: python3 bench/...)


def main():
    n_src, n_out, H = 16384, 40960, 7168
    k = jax.random.split(jax.random.key(0), 2)
    rows = jax.random.normal(k[0], (n_src, H), jnp.float32).astype(jnp.bfloat16)
    idx = jax.random.randint(k[1], (n_out,), 0, n_src + n_src // 4, jnp.int32)  # some fill

    def as_bf16(r, i):
        return jnp.take(r, i, axis=0, mode="fill", fill_value=0)

    def as_u32(r, i):
        w = jax.lax.bitcast_convert_type(r.reshape(n_src, H // 2, 2), jnp.uint32)
        g = jnp.take(w, i, axis=0, mode="fill", fill_value=0)
        return jax.lax.bitcast_convert_type(g, jnp.bfloat16).reshape(n_out, H)

    def as_u32_clip(r, i):  # clamp + mask instead of fill
        w = jax.lax.bitcast_convert_type(r.reshape(n_src, H // 2, 2), jnp.uint32)
        ok = (i >= 0) & (i < n_src)
        g = jnp.take(w, jnp.clip(i, 0, n_src - 1), axis=0, mode="clip")
        g = jnp.where(ok[:, None], g, jnp.uint32(0))
        return jax.lax.bitcast_convert_type(g, jnp.bfloat16).reshape(n_out, H)

    ref = jax.jit(as_bf16)(rows, idx)
    for name, fn in (("bf16", as_bf16), ("u32", as_u32), ("u32_clip", as_u32_clip)):
        f = jax.jit(fn)
        assert bool(jnp.all(f(rows, idx) == ref)), name
        us = timed(f, (rows, idx), 20) * 1e6
        gb = (n_out * H * 2 + n_out * H * 2 * 0.8) / 1e9
        print(f"gather {name:9s} {us:8.1f} us  ~{gb / us * 1e6 / 1e3:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
