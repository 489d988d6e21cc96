"""Hardware presets and limits: links (bandwidth, latency), device profiles (peak FLOP/s,
achieved fraction, memory), and whether a worker's state fits a device. No JAX. `clock` re-exports
all of it, so `clock.device("h100")` and `clock.memory_check(...)` work as before."""

from __future__ import annotations

import dataclasses
import math
import numbers


def _check(name: str, value, ok: bool, allowed: str) -> None:
  if not ok:
    raise ValueError(f"{name} = {value!r} is not allowed; {name} must be {allowed}.")


def _pos(name: str, value, allowed: str = "a finite number > 0") -> None:
  _check(name, value, isinstance(value, numbers.Real) and not isinstance(value, bool)
         and math.isfinite(value) and value > 0, allowed)


def _count(name: str, value) -> None:
  _check(name, value, isinstance(value, numbers.Integral) and not isinstance(value, bool)
         and value >= 1, "an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Link:
  """One link level: bandwidth (bytes/s per device per direction) and latency (s per hop)."""

  bandwidth: float
  latency: float = 0.0
  kind: str = ""  # "node", "cluster", "inter" or "edge": where such a link sits

  def __post_init__(self):
    _pos("bandwidth", self.bandwidth, "a finite number of bytes/s > 0")
    _check("latency", self.latency, math.isfinite(self.latency) and self.latency >= 0,
           "a finite number of seconds >= 0")


# Nominal figures from vendor specifications (peak, per direction); latencies are assumed orders of
# magnitude, not measurements. Real achieved bandwidth is lower.
LINKS = {
    # NVIDIA H100 datasheet: NVLink 900 GB/s per GPU (both directions) -> 450 GB/s each way.
    "nvlink4": Link(450e9, 2e-6, "node"),
    # Google Cloud TPU v5e docs: inter-chip interconnect 1,600 Gbps per chip -> 200 GB/s.
    "tpu-v5e-ici": Link(200e9, 2e-6, "node"),
    # PCI-SIG PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b -> 31.5 GB/s each way.
    "pcie4-x16": Link(31.5e9, 5e-6, "node"),
    # NVIDIA DGX H100 datasheet: one ConnectX-7 400 Gb/s InfiniBand port per GPU -> 50 GB/s.
    "infiniband-400g": Link(50e9, 5e-6, "cluster"),
    "ethernet-10g": Link(1.25e9, 50e-6, "cluster"),  # IEEE 802.3 10GBASE-T line rate
    "wan-100g": Link(12.5e9, 20e-3, "inter"),  # assumed leased line between datacenters
    "wan-10g": Link(1.25e9, 20e-3, "inter"),
    # Assumed mobile/home uplink of 20 Mbit/s (middle of 10-50 Mbit/s), 50 ms round trips.
    "edge-uplink": Link(20e6 / 8, 50e-3, "edge"),
}


@dataclasses.dataclass(frozen=True)
class Device:
  """A device profile: peak dense FLOP/s, achieved fraction (MFU), memory, default links."""

  name: str
  peak_flops: float
  mfu: float
  memory_bytes: float
  devices_per_node: int
  node_link: str     # a LINKS name: between the devices of one node / host
  cluster_link: str  # a LINKS name: between nodes of one cluster (or the device's uplink)

  def __post_init__(self):
    _pos("peak_flops", self.peak_flops)
    _check("mfu", self.mfu, 0 < self.mfu <= 1, "a fraction in (0, 1]")
    _pos("memory_bytes", self.memory_bytes)

  @property
  def flops(self) -> float:
    return self.peak_flops * self.mfu


# Nominal peak figures (dense, no sparsity); MFU values are assumptions typical of LLM training.
DEVICES = {
    # NVIDIA H100 SXM5 datasheet: BF16 tensor 1,979 TFLOP/s with sparsity = 989 dense; 80 GB HBM3;
    # HGX/DGX H100: 8 GPUs per node.
    "h100": Device("h100", 989e12, 0.4, 80e9, 8, "nvlink4", "infiniband-400g"),
    # Google Cloud TPU v5e docs: 197 TFLOP/s bf16 per chip, 16 GB HBM2; 8 chips per host
    # (v5litepod-8); the hosts of one pod slice are joined by ICI too.
    "tpu-v5e": Device("tpu-v5e", 197e12, 0.4, 16e9, 8, "tpu-v5e-ici", "tpu-v5e-ici"),
    # NVIDIA Ada Lovelace architecture whitepaper: RTX 4090 BF16 tensor 165.2 TFLOP/s dense (FP32
    # accumulate), 24 GB GDDR6X, PCIe 4.0 x16, no NVLink.
    "rtx4090": Device("rtx4090", 165e12, 0.35, 24e9, 1, "pcie4-x16", "ethernet-10g"),
    # Phone-class edge device: an assumed class, not a datasheet (vendor figures for phone SoCs are
    # mostly int8 "TOPS"): 4 TFLOP/s fp16 peak, 8 GB RAM, mobile uplink.
    "phone": Device("phone", 4e12, 0.25, 8e9, 1, "edge-uplink", "edge-uplink"),
}


def _lookup(table: dict, name, what: str):
  if not isinstance(name, str):
    return name
  if name not in table:
    raise ValueError(f"Unknown {what} {name!r}; allowed: {', '.join(table)}.")
  return table[name]


def device(name: str | Device) -> Device:
  return _lookup(DEVICES, name, "device preset")


def link(name: str | Link) -> Link:
  return _lookup(LINKS, name, "link preset")


def activation_bytes(num_layers: int, d_model: int, num_heads: int, seq_len: int,
                     tokens: float) -> float:
  """Activations kept for the backward pass, 16-bit, no recomputation: per layer and token
  34 d + 5 heads seq_len bytes (Korthikanti et al. 2022, arXiv 2205.05198, eq. 1). An estimate."""
  return num_layers * tokens * (34 * d_model + 5 * num_heads * seq_len)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  breakdown: dict
  total: float
  capacity: float

  @property
  def fits(self) -> bool:
    return self.total <= self.capacity

  @property
  def verdict(self) -> str:
    used = f"{self.total / 1e9:.2f} GB of {self.capacity / 1e9:.2f} GB"
    if self.fits:
      return f"fits: {used} ({100 * self.total / self.capacity:.0f}%)"
    return f"does not fit: needs {used}, short by {(self.total - self.capacity) / 1e9:.2f} GB"


def memory_check(params: float, dev: str | Device, activations: float = 0.0,
                 param_bytes: float = 4, grad_bytes: float = 4, moment_bytes: float = 4,
                 moments: int = 2, outer_state: bool = True, outer_shards: int = 1
                 ) -> MemoryReport:
  """Per-device memory: params + grads + optimizer moments (AdamW: 2 fp32) + outer state (fp32
  global params and momentum, split over `outer_shards` devices by the two-stage sync) +
  `activations` bytes, against the device's memory."""
  _pos("params", params)
  _count("outer_shards", outer_shards)
  parts = {"params": params * param_bytes, "grads": params * grad_bytes,
           "optimizer": params * moment_bytes * moments,
           "outer": 2 * params * 4 / outer_shards if outer_state else 0.0,
           "activations": float(activations)}
  return MemoryReport(parts, sum(parts.values()), device(dev).memory_bytes)
