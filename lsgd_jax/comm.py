"""Communication accounting read from compiled programs (not assumed).

`collectives(compiled, mesh)` parses the optimized HLO of a jitted function and returns every
collective with its payload size and the mesh axes its device groups span. Sizes are per device:
`payload_bytes` is the logical buffer the collective reduces or gathers (the parameters' size for a
gradient all-reduce); `wire_bytes` is what one device sends with bandwidth-optimal ring algorithms
(all-reduce 2 (R - 1) / R x payload, all-gather and reduce-scatter (R - 1) / R x the full buffer,
collective-permute 1x), the model behind "2N(1 - 1/R)" in Scaling Laws for DiLoCo (arXiv 2503.09799).
Collectives whose groups hold a single device move nothing and are left out.

Caveat: a collective inside an HLO while loop (e.g. `lax.scan`) is counted once, not once per
iteration. The CPU loop program (`rounds._steps_loop`, a `fori_loop` over train steps) relies on
it: its body is one step, so its count is one step's bytes (tests/test_calls.py checks the total
against a step-by-step run's).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_LINE = re.compile(r"=\s*(?P<shape>.*?)\s+(?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?")
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{[0-9,]*\},?)*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str                    # "all-reduce", "all-gather", ...
  payload_bytes: int         # logical buffer per device
  group_size: int            # devices per group
  axes: frozenset[str]       # mesh axes the groups span

  @property
  def wire_bytes(self) -> float:
    r = self.group_size
    if self.op == "all-reduce":
      return 2.0 * (r - 1) / r * self.payload_bytes
    if self.op in ("all-gather", "reduce-scatter", "all-to-all"):
      return (r - 1) / r * self.payload_bytes
    return float(self.payload_bytes)


def _arrays(shape: str) -> list[int]:
  return [_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
          for dt, dims in _ARRAY.findall(shape)]


def _groups(line: str, num_devices: int) -> list[list[int]]:
  m = _GROUPS_IOTA.search(line)
  if m:
    out_shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(out_shape).tolist()
  m = _GROUPS_LIST.search(line) or _PAIRS.search(line)
  if m and m.group(1):
    return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
  return [list(range(num_devices))]  # empty replica_groups: all devices in one group


def parse_hlo(hlo_text: str, mesh_shape: Sequence[int],
              axis_names: Sequence[str]) -> list[Collective]:
  """All non-trivial collectives of an HLO module's text (device ids = flat mesh positions)."""
  num_devices = math.prod(mesh_shape)
  out = []
  for line in hlo_text.splitlines():
    m = _LINE.search(line)
    if not m:
      continue
    op, sizes = m.group("op"), _arrays(m.group("shape"))
    if m.group("start") and op == "all-gather":
      sizes = sizes[len(sizes) // 2:]  # (operands..., results...)
    elif m.group("start") and op == "collective-permute":
      sizes = sizes[:1]  # (operand, result, contexts...)
    elif op == "reduce-scatter":
      pass  # handled below via the group size
    groups = _groups(line, num_devices)
    size = max(len(g) for g in groups)
    if size <= 1 and op != "collective-permute":
      continue
    payload = sum(sizes)
    if op == "reduce-scatter":
      payload *= size  # the result is one shard of the reduced buffer
    members = [np.unravel_index(np.asarray(g), mesh_shape) for g in groups if g]
    axes = frozenset(name for i, name in enumerate(axis_names)
                     if any(len(set(coords[i].tolist())) > 1 for coords in members))
    if not axes:
      continue
    out.append(Collective(op=op, payload_bytes=int(payload), group_size=size, axes=axes))
  return out


def collectives(compiled, mesh) -> list[Collective]:
  """Collectives of a compiled jitted function (`jax.jit(f).lower(...).compile()`)."""
  return parse_hlo(compiled.as_text(), tuple(mesh.devices.shape), tuple(mesh.axis_names))


@dataclasses.dataclass(frozen=True)
class CommStats:
  """Bytes per device of one call of a compiled function."""

  payload_bytes: int
  wire_bytes: float
  by_axis_payload: dict[str, int]  # payload of the collectives spanning each mesh axis

  @classmethod
  def of(cls, colls: Iterable[Collective]) -> "CommStats":
    colls = list(colls)
    by_axis: dict[str, int] = {}
    for c in colls:
      for a in c.axes:
        by_axis[a] = by_axis.get(a, 0) + c.payload_bytes
    return cls(payload_bytes=sum(c.payload_bytes for c in colls),
               wire_bytes=float(sum(c.wire_bytes for c in colls)), by_axis_payload=by_axis)


def measure(jitted, *args, mesh) -> CommStats:
  """Compiles `jitted` for `args` (arrays or ShapeDtypeStructs) and counts its collectives."""
  return CommStats.of(collectives(jitted.lower(*args).compile(), mesh))
