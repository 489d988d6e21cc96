"""Bandwidth needed for a compute utilisation, DDP vs local SGD / DiLoCo (network model only).

  python -m experiments.bandwidth --model_size=10e9 --device=h100 --tokens_per_step=16384 \
      --workers=8 --sync_every=100,300 --bandwidth=10

  python -m experiments.bandwidth --preset=diloco-scaling-laws

`--preset=diloco-scaling-laws` selects one set of assumptions, those the published DiLoCo
simulators state (bf16 gradients and pseudo-gradients, every reduction overlapped with the
backward pass = 2/3 of a step, bandwidth only), for a 10B model; see docs/bandwidth.md. Flags given
on the command line override the preset.

Prints the assumptions, then Markdown tables: the bandwidth (Gbit/s per device, on the slowest
level the syncs cross) each method needs for each target utilisation, and the H local SGD needs at
--bandwidth. Runs in well under a second; no accelerator or JAX computation is involved (a preset
--model_size imports lsgd_jax.model only to count parameters and FLOPs).
"""

from __future__ import annotations

import dataclasses
import math

from absl import flags

from experiments import cli
from lsgd_jax import clock

_SIZE = flags.DEFINE_string("model_size", "10e9", "A lsgd_jax.model preset name (e.g. 100M) or a "
                            "number of synchronized parameters (e.g. 10e9, 10B).")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Sequence length (FLOPs of a preset model).")
_VOCAB = flags.DEFINE_integer("vocab_size", 32_000, "Vocabulary (parameters of a preset model).")
_STEP = flags.DEFINE_float("step_time", None, "Compute seconds per step; if unset, derived from "
                           "--tokens_per_step and --device.")
_TOKENS = flags.DEFINE_integer("tokens_per_step", 16_384, "Tokens per device per step.")
_DEVICE = flags.DEFINE_enum("device", "h100", list(clock.DEVICES), "Device preset.")
_MFU = flags.DEFINE_float("mfu", None, "Override the preset's achieved fraction of peak FLOP/s.")
_H = flags.DEFINE_string("sync_every", "100,300", "Comma list of H for local SGD rows.")
_BW = flags.DEFINE_float("bandwidth", 10.0, "Gbit/s per device of the slow level, for the "
                         "H-needed table.")
_WORKERS = flags.DEFINE_integer("workers", 8, "Replicas (workers).")
_CLUSTERS = flags.DEFINE_integer("clusters", None, "Clusters; default: one per worker.")
_DPW = flags.DEFINE_integer("devices_per_worker", 1, "Devices per worker.")
_LAYOUT = flags.DEFINE_enum("layout", "flat", list(clock.LAYOUTS), "All-reduce layout.")
_BYTES = flags.DEFINE_float("bytes_per_element", 4.0, "Bytes per synced element (4: fp32).")
_INTER = flags.DEFINE_enum("inter_link", "wan-10g", list(clock.LINKS), "Link between clusters.")
_LATENCY = flags.DEFINE_float("latency", None, "Override the slow link's latency (s).")
_TARGETS = flags.DEFINE_string("targets", "0.5,0.8,0.9,0.95,0.99", "Target utilisations.")
_OVERLAP = flags.DEFINE_bool("overlap", False, "Overlap communication with compute.")
_COMM_OVERLAP = flags.DEFINE_float("comm_overlap", 0.0, "Share of a step's compute a collective "
                                   "issued in it hides behind (2/3: the backward pass).")
_BUCKETS = flags.DEFINE_integer("comm_buckets", 0, "With --comm_overlap: the collective leaves in "
                                "this many buckets, one per layer as the backward pass ends it "
                                "(0: infinitely fine).")
_DUPLEX = flags.DEFINE_bool("duplex", False, "Full-duplex links: every all-reduce runs two rings "
                            "in opposite directions, each direction carrying half of the bytes.")
_STREAMING = flags.DEFINE_string("streaming", "", "Extra streaming DiLoCo rows 'H:P:tau', "
                                 "comma separated (e.g. 100:4:5).")
_OUTER_DTYPES = flags.DEFINE_string("outer_dtypes", "", "Extra rows with a quantized outer wire "
                                    "for each H and streaming row: comma list of bfloat16, "
                                    "float8, int8, int4 (block 256 scales).")
_PRESET = flags.DEFINE_enum("preset", None, ["diloco-scaling-laws"], "A set of assumptions.")

PRESETS = {
    # Charles et al. 2025 (arXiv 2503.09799), Table 6, 10B Chinchilla row: step time 0.8 s (6N
    # FLOPs per token at 60% of peak, as the paper states), bf16 on the wire, every reduction
    # overlapped with the backward pass (2/3 of a step) as the simulator of Douillard et al. 2025
    # does, bucketed per layer (48 layers, the paper's Table 3), 8 replicas on full-duplex links,
    # bandwidth only (no latency). docs/bandwidth.md compares every cell.
    "diloco-scaling-laws": dict(model_size="10e9", bytes_per_element=2.0, comm_overlap=2 / 3,
                                comm_buckets=48, duplex=True, step_time=0.8, workers=8,
                                latency=0.0, sync_every="100,300", streaming="100:4:5",
                                outer_dtypes="int4"),
}

# The published cells (Gbit/s for 50/80/90/95/99% compute utilisation), Charles et al. 2025,
# arXiv 2503.09799, Table 6, "Chinchilla 10B, step time 0.8s". The paper reads them off a
# simulator run on a grid of bandwidths (the values are points of logspace(-1, 3, 50) Gbit/s, the
# smallest one that reaches the utilisation), so each cell is the true need rounded up by at most
# one grid step (x1.21).
PUBLISHED = {
    "diloco-scaling-laws": {
        "DDP": [104.8, 184.2, 222.3, 222.3, 390.7],
        "local SGD H=100": [1.4, 6.2, 13.3, 23.3, 86.8],
        "local SGD H=300": [0.5, 2.0, 4.3, 9.1, 41.0],
    },
}
PUBLISHED_TARGETS = [0.5, 0.8, 0.9, 0.95, 0.99]

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def model_cost(size: str, seq_len: int, vocab_size: int) -> tuple[float, float, str]:
  """(synced parameters, training FLOPs per token, description) of a preset or a number."""
  from lsgd_jax import model  # imported only here: the rest needs no JAX
  if size in model.PRESETS:
    cfg = model.model_config(size, vocab_size)
    return (float(model.total_params(cfg)), model.train_flops_per_token(cfg, seq_len),
            f"preset {size}: {model.total_params(cfg):,} parameters (all synced), "
            f"{model.non_embedding_params(cfg):,} non-embedding")
  text = size.strip().lower()
  scale = _SUFFIX.get(text[-1:], 1.0)
  try:
    n = float(text[:-1] if text[-1:] in _SUFFIX else text) * scale
  except ValueError:
    raise ValueError(f"model_size {size!r} is neither a preset ({', '.join(model.PRESETS)}) nor "
                     "a number of parameters such as 10e9 or 10B.") from None
  if not (math.isfinite(n) and n > 0):
    raise ValueError(f"model_size {size!r} must be a number of parameters > 0.")
  return n, 6.0 * n, f"{n:.3g} parameters, 6N FLOPs per token (attention ignored)"


def _numbers(flag, text: str, kind, allowed: str, ok) -> list:
  """The comma list of --flag as `kind`s, each passing `ok`; ValueError naming the bad item."""
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise ValueError(f"--{flag.name}={text!r} is empty; allowed: a comma list of {allowed}.")
  out = []
  for t in items:
    try:
      v = kind(t)
    except ValueError:
      v = None
    if v is None or not ok(v):
      raise ValueError(f"--{flag.name}: {t!r} is not allowed; give a comma list of {allowed}.")
    out.append(v)
  return out


def check_flags() -> tuple[list[float], list[int]]:
  """Checks every number flag; returns (targets, H list). One ValueError line per bad value."""
  finite_pos = lambda v: v is not None and math.isfinite(v) and v > 0
  for flag, what in ((_SEQ, "an integer >= 1"), (_VOCAB, "an integer >= 1"),
                     (_TOKENS, "an integer >= 1 tokens per device and step"),
                     (_WORKERS, "an integer >= 1"), (_DPW, "an integer >= 1"),
                     (_CLUSTERS, "an integer >= 1 (or unset: one per worker)"),
                     (_BW, "a number of Gbit/s > 0"), (_BYTES, "a number of bytes > 0"),
                     (_STEP, "a number of seconds > 0 (or unset)"),
                     (_MFU, "a fraction in (0, 1] (or unset: the device preset's)")):
    v = flag.value
    if v is None and flag.default is None:
      continue
    if not finite_pos(v) or flag is _MFU and v > 1:
      raise ValueError(f"--{flag.name}={v} is not allowed; give {what}.")
  if _CLUSTERS.value and _WORKERS.value % _CLUSTERS.value:
    raise ValueError(f"--clusters={_CLUSTERS.value} must divide --workers={_WORKERS.value}.")
  if _LATENCY.value is not None and not (math.isfinite(_LATENCY.value) and _LATENCY.value >= 0):
    raise ValueError(f"--latency={_LATENCY.value} is not allowed; give seconds >= 0.")
  targets = _numbers(_TARGETS, _TARGETS.value, float, "utilisations in (0, 1), e.g. 0.5,0.9",
                     lambda u: 0 < u < 1)
  hs = _numbers(_H, _H.value, int, "integers >= 1, e.g. 100,300", lambda h: h >= 1)
  return targets, hs


def _gbit(bytes_per_s: float) -> str:
  if math.isinf(bytes_per_s):
    return "unreachable"
  g = bytes_per_s * 8 / 1e9
  return f"{g:,.0f}" if g >= 100 else f"{g:.3g}" if g >= 0.01 else f"{g:.2e}"


def _apply_preset(name: str) -> None:
  """Sets the preset's flags that the command line did not give."""
  for key, value in PRESETS[name].items():
    if not flags.FLAGS[key].present:
      flags.FLAGS[key].value = value


def main(argv):
  del argv  # cli.run refuses positional arguments
  if _PRESET.value:
    _apply_preset(_PRESET.value)
  targets, hs = check_flags()
  params, fpt, desc = model_cost(_SIZE.value, _SEQ.value, _VOCAB.value)
  dev = clock.device(_DEVICE.value)
  if _MFU.value is not None:
    dev = dataclasses.replace(dev, mfu=_MFU.value)
  tokens = _TOKENS.value
  compute = (f"{dev.name}, {dev.peak_flops / 1e12:.4g} TFLOP/s peak x MFU {dev.mfu:.2f}; "
             f"{tokens:,} tokens per device per step")
  if _STEP.value is not None:  # a device that computes one step in exactly --step_time
    dev = dataclasses.replace(dev, mfu=1.0, peak_flops=tokens * fpt / _STEP.value)
    compute = f"{dev.name} memory; step time given by --step_time"
  inter = clock.link(_INTER.value)
  if _LATENCY.value is not None:
    inter = dataclasses.replace(inter, latency=_LATENCY.value)
  net = clock.Network.for_device(dev, inter=inter)
  workers, dpw = _WORKERS.value, _DPW.value
  clusters = _CLUSTERS.value or workers
  common = dict(params=params, flops_per_token=fpt, tokens_per_step=tokens,
                bytes_per_element=_BYTES.value, devices_per_worker=dpw, workers=workers,
                clusters=clusters, layout=_LAYOUT.value, comm_overlap=_COMM_OVERLAP.value,
                comm_buckets=_BUCKETS.value, duplex=_DUPLEX.value)
  rows = table_rows(common, hs, _STREAMING.value, _OUTER_DTYPES.value)
  t_c = clock.compute_time(tokens, fpt, dev)
  probe = clock.Run("local_sgd", sync_every=1, **common)
  level = "inter" if clusters > 1 else "cluster" if workers > 1 else "worker"
  slow = getattr(net, level)
  mem = clock.memory_check(params, dev, outer_shards=dpw if _LAYOUT.value == "two_stage" else 1)
  print("Assumptions (nominal figures; see lsgd_jax/clock.py):")
  print(f"- model: {desc}; {fpt:.3e} training FLOPs per token")
  print(f"- device: {compute} -> compute {t_c:.4g} s per step")
  print(f"- {workers} workers x {dpw} devices in {clusters} clusters; layout {_LAYOUT.value}; "
        f"{_BYTES.value:g} bytes per element; overlap {_OVERLAP.value}; a collective hides "
        f"behind {_COMM_OVERLAP.value:.3g} of the step it is issued in"
        + (f", leaving in {_BUCKETS.value} buckets (one per layer)" if _BUCKETS.value else "")
        + ("; full-duplex links (two counter-rotating rings)" if _DUPLEX.value else ""))
  print(f"- solved level: {level} (latency {slow.latency * 1e3:.3g} ms); other links: worker "
        f"{net.worker.bandwidth * 8 / 1e9:.4g} Gbit/s, cluster "
        f"{net.cluster.bandwidth * 8 / 1e9:.4g} Gbit/s")
  print(f"- per-device bytes on {level}: DDP step "
        f"{clock.step_comm(rows[0][1], net).bytes.get(level, 0.0):.4g}, outer sync "
        f"{clock.sync_comm(probe, net).bytes.get(level, 0.0):.4g}")
  print(f"- memory per device (no model sharding, AdamW + outer state, activations not counted): "
        f"{mem.verdict}\n")
  print(f"Bandwidth (Gbit/s per device) needed on the {level} level for compute utilisation:\n")
  print("| method | " + " | ".join(f"{100 * u:g}%" for u in targets) + " |")
  print("|---|" + "---|" * len(targets))
  needs = {}
  for name, run in rows:
    needs[name] = [clock.bandwidth_needed(u, run, dev, net, level, _OVERLAP.value)
                   for u in targets]
    print(f"| {name} | " + " | ".join(_gbit(w) for w in needs[name]) + " |")
  if _PRESET.value in PUBLISHED and targets == PUBLISHED_TARGETS:
    print_comparison(PUBLISHED[_PRESET.value], needs, targets)
  at = net.with_bandwidth(level, _BW.value * 1e9 / 8)
  print(f"\nAt {_BW.value:g} Gbit/s: utilisation " + ", ".join(
      f"{name} {100 * clock.utilisation(run, dev, at, _OVERLAP.value):.1f}%" for name, run in rows)
        + "; H local SGD needs for each target (no overlap, closed form):\n")
  print("| " + " | ".join(f"{100 * u:g}%" for u in targets) + " |")
  print("|" + "---|" * len(targets))
  needed = [clock.sync_every_needed(u, probe, dev, at) for u in targets]
  print("| " + " | ".join("unreachable" if math.isinf(h) else str(max(1, math.ceil(h)))
                          for h in needed) + " |")


def comparison(published: dict, needs: dict) -> dict[str, list[tuple[float, float, float]]]:
  """{method: [(published, ours, ours / published) per target]} for the published methods."""
  return {name: [(p, w * 8 / 1e9, w * 8 / 1e9 / p) for p, w in zip(cells, needs[name])]
          for name, cells in published.items()}


def print_comparison(published: dict, needs: dict, targets: list[float]) -> None:
  cmp = comparison(published, needs)
  print("\nAgainst the published table (Charles et al. 2025, arXiv 2503.09799, Table 6): "
        "published / ours (ratio ours / published):\n")
  print("| method | " + " | ".join(f"{100 * u:g}%" for u in targets) + " |")
  print("|---|" + "---|" * len(targets))
  for name, cells in cmp.items():
    print(f"| {name} | " + " | ".join(f"{p:g} / {_gbit(o * 1e9 / 8)} ({r:.2f})"
                                      for p, o, r in cells) + " |")
  worst = max(max(r, 1 / r) for cells in cmp.values() for _, _, r in cells)
  order = all(cmp["DDP"][i][1] > cmp["local SGD H=100"][i][1] > cmp["local SGD H=300"][i][1]
              for i in range(len(targets)))
  print(f"\nWorst cell: a factor {worst:.2f} from the published value; order DDP > H=100 > "
        f"H=300 at every utilisation: {'kept' if order else 'NOT kept'}.")


def table_rows(common: dict, hs: list[int], streaming: str, outer_dtypes: str):
  """(name, clock.Run) of the table: DDP, local SGD per H, streaming rows 'H:P:tau', and the
  quantized variants of each local SGD and streaming row."""
  from lsgd_jax import quantize  # JAX only for the format table
  rows = [("DDP", clock.Run("ddp", **common))]
  base = [(f"local SGD H={h}", dict(sync_every=h)) for h in hs]
  for spec in (x for x in streaming.split(",") if x):
    try:
      h, p, tau = (int(v) for v in spec.split(":"))
    except ValueError:
      raise ValueError(f"--streaming entry {spec!r} must be H:P:tau, e.g. 100:4:5.") from None
    base.append((f"streaming H={h} P={p} tau={tau}",
                 dict(sync_every=h, fragments=p, overlap_steps=tau)))
  rows += [(name, clock.Run("local_sgd", **kw, **common)) for name, kw in base]
  for dtype in (x for x in outer_dtypes.split(",") if x):
    quantize.check_dtype(dtype)
    wire = quantize.bytes_per_element(dtype, 256)
    rows += [(f"{name} {dtype}", clock.Run("local_sgd", outer_bytes_per_element=wire, **kw,
                                          **common)) for name, kw in base]
  return rows


if __name__ == "__main__":
  cli.run(main)
