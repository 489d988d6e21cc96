"""Wire formats of the outer communication (docs/streaming.md): quantize and dequantize.

A pseudo-gradient block is sent as small integers or floats plus float32 scales:

  dtype      element on the wire           scale per block        error |x - deq(q(x))|
  float32    f32 (4 bytes)                 none                   0
  bfloat16   bf16 (2 bytes)                none                   <= 2^-8 |x|
  float8     f8 e4m3fn (1 byte)            amax / 448             <= max(2^-4 |x|, 2^-10 s)
  int8       s8 (1 byte), round(x / s)     amax / 127             <= s / 2 = amax / 254
  int4       two 4-bit codes per u8 byte   amax / 7               <= s / 2 = amax / 14

`block` elements share a scale (amax = the largest |x| of the block); `block = 0` gives one scale
per tensor (the caller passes the tensor's amax). Scales are float32 (4 bytes per block: at block
256, int8 costs 1.016 bytes per element, 3.94x less than float32; int4 0.516 bytes, 7.76x less).
Arrays here are [..., m] with m a multiple of the block (and even for int4); the quantized array
keeps the leading axes ([..., m / 2] bytes for int4) and the scales are [..., m / block].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

OUTER_DTYPES = ("float32", "bfloat16", "float8", "int8", "int4")
_QMAX = {"float8": 448.0, "int8": 127.0, "int4": 7.0}  # largest code after scaling
WIRE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float8": 1.0, "int8": 1.0, "int4": 0.5}


def check_dtype(dtype: str) -> None:
  if dtype not in OUTER_DTYPES:
    raise ValueError(f"Unknown local_sgd.outer_dtype {dtype!r}; allowed: "
                     f"{', '.join(OUTER_DTYPES)}.")


def scaled(dtype: str) -> bool:
  """Whether the format carries scales (float8, int8, int4)."""
  return dtype in _QMAX


def bytes_per_element(dtype: str, block: int) -> float:
  """Bytes on the wire per element, scales included (per-tensor scales count as nothing)."""
  check_dtype(dtype)
  return WIRE_BYTES[dtype] + (4.0 / block if scaled(dtype) and block else 0.0)


def unit(dtype: str, block: int) -> int:
  """The length a quantized array must be a multiple of."""
  return block if block else (2 if dtype == "int4" else 1)


_BITS = {"bfloat16": (jnp.bfloat16, jnp.uint16), "float8": (jnp.float8_e4m3fn, jnp.uint8)}


def to_wire(codes: jax.Array, dtype: str) -> jax.Array:
  """The codes as unsigned integers of the same width for a collective. XLA's CPU backend widens
  bf16 and f8 collectives (to f32 and f16), which would send 2x the bytes; bits are moved as
  they are."""
  return lax.bitcast_convert_type(codes, _BITS[dtype][1]) if dtype in _BITS else codes


def from_wire(bits: jax.Array, dtype: str) -> jax.Array:
  return lax.bitcast_convert_type(bits, _BITS[dtype][0]) if dtype in _BITS else bits


def _blocks(x: jax.Array, block: int) -> jax.Array:
  return x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))


def block_amax(x: jax.Array, block: int) -> jax.Array:
  """The largest |x| of each block: [..., m] -> [..., m / block]."""
  return jnp.max(jnp.abs(_blocks(x, block)), axis=-1)


def quantize(x: jax.Array, dtype: str, block: int, amax: jax.Array | None = None):
  """float32 [..., m] -> (codes, scales [..., m / block] or None).

  Per-tensor (`block = 0`): `amax` is the tensor's largest |x|, broadcastable to the leading
  axes [...]; the scales are then [..., 1].
  """
  check_dtype(dtype)
  x = x.astype(jnp.float32)
  if dtype == "float32":
    return x, None
  if dtype == "bfloat16":
    return x.astype(jnp.bfloat16), None
  qmax = _QMAX[dtype]
  if block:
    amax = block_amax(x, block)
    xb = _blocks(x, block)
  else:
    amax = jnp.broadcast_to(jnp.asarray(amax, jnp.float32), x.shape[:-1])[..., None]
    xb = x[..., None, :]
  scale = jnp.where(amax > 0, amax / qmax, 1.0)
  y = xb / scale[..., None]
  if dtype == "float8":
    codes = y.astype(jnp.float8_e4m3fn)
  else:
    codes = jnp.clip(jnp.round(y), -qmax, qmax).astype(jnp.int8)
  codes = codes.reshape(x.shape)
  if dtype == "int4":  # two codes in [-7, 7] per byte, stored as code + 8 in [1, 15]
    u = (codes.astype(jnp.int32) + 8).astype(jnp.uint8)
    codes = u[..., 0::2] | (u[..., 1::2] << 4)
  return codes, scale


def dequantize(codes: jax.Array, scales: jax.Array | None, dtype: str, block: int) -> jax.Array:
  """The float32 values [..., m] that `quantize` encoded."""
  check_dtype(dtype)
  if dtype in ("float32", "bfloat16"):
    return codes.astype(jnp.float32)
  if dtype == "int4":
    lo = (codes & 0xF).astype(jnp.int32) - 8
    hi = (codes >> 4).astype(jnp.int32) - 8
    codes = jnp.stack([lo, hi], axis=-1).reshape(codes.shape[:-1] + (2 * codes.shape[-1],))
  y = codes.astype(jnp.float32)
  if block:
    return (_blocks(y, block) * scales[..., None]).reshape(y.shape)
  return y * scales


def error_bound(x: jax.Array, dtype: str, block: int, amax: jax.Array | None = None):
  """The largest |x - dequantize(quantize(x))| the format allows, elementwise (module docstring)."""
  check_dtype(dtype)
  x = jnp.abs(x.astype(jnp.float32))
  if dtype == "float32":
    return jnp.zeros_like(x)
  if dtype == "bfloat16":
    return x * 2.0**-8
  if block:
    amax = jnp.repeat(block_amax(x, block), block, axis=-1)
  else:
    amax = jnp.broadcast_to(jnp.broadcast_to(jnp.asarray(amax, jnp.float32), x.shape[:-1])[
        ..., None], x.shape)
  s = jnp.where(amax > 0, amax / _QMAX[dtype], 1.0)
  if dtype == "float8":
    return jnp.maximum(x * 2.0**-4, s * 2.0**-10)
  return s / 2
