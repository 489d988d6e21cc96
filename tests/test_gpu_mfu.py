"""benchmarks/gpu_mfu.py: the peak table, the memory fit, and a CPU smoke run of the binary."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_mfu  # noqa: E402
from conftest import xla_env  # noqa: E402


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v5 lite", 197e12), ("TPU v4", 275e12),
    ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert gpu_mfu.peak_flops(kind) == peak


def test_fit_workers_halves_until_replicas_fit():
  gib = 2**30  # 80 GiB x 0.85 = 73 GB usable
  assert gpu_mfu.fit_workers(8, 10**8, 1, None) == 8  # unknown memory: as asked
  assert gpu_mfu.fit_workers(8, 10**8, 1, 80 * gib) == 8  # 8 x 1.6 GB + 0.8 GB
  assert gpu_mfu.fit_workers(8, 10**9, 1, 80 * gib) == 4  # 8 x 16 GB: no; 4 x 16 + 8 GB: yes
  assert gpu_mfu.fit_workers(8, 10**9, 8, 80 * gib) == 8  # one replica per device
  assert gpu_mfu.fit_workers(8, 10**8, 1, 80 * gib, activations=70e9) == 1


def test_activation_estimate_of_400m():
  from lsgd_jax import model
  cfg = model.model_config("400M", 32_000, 2048, dtype="bfloat16")
  gb = gpu_mfu.activation_bytes(cfg, 16 * 2048) / 1e9
  assert 25 < gb < 45  # about 1 MB per token


def test_cpu_smoke_run_writes_json_and_table(tmp_path):
  out = tmp_path / "mfu.json"
  env = xla_env(2)
  cmd = [sys.executable, "-m", "benchmarks.gpu_mfu", "--sizes=cpu-tiny", "--dtype=float32",
         "--seq_len=32", "--batch=16", "--vocab=256", "--workers=4", "--sync_every=2",
         "--steps=2", "--reps=1", "--peak_tflops=1", f"--out={out}", "--fused_projections",
         f"--trace_dir={tmp_path}"]
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["num_devices"] == 2 and report["peak_flops_per_device"] == 1e12
  (size,) = report["sizes"]
  assert [r["variant"] for r in size["rows"]] == ["ddp", "local_sgd_inner",
                                                   "local_sgd_amortised_H2"]
  assert [r["workers"] for r in size["rows"]] == [2, 4, 4]
  assert set(size["workers"]) == {"4"}
  assert all(w["inner_over_ddp"] > 0 for w in size["workers"].values())
  for r in size["rows"]:
    assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1
  assert "| cpu-tiny | local_sgd_inner | 4 |" in res.stdout
  assert "cpu-tiny ddp K=2:" in res.stdout  # progress line per variant
  assert size["fused_projections"] and report["fused_projections"]
  for name in ("cpu-tiny_ddp", "cpu-tiny_local_sgd_K4"):  # a trace and its kernel table each
    assert (tmp_path / f"trace_{name}.json.gz").exists()
    assert f"{name}: trace in" in res.stdout
  assert res.stdout.count("kernel time") == 2


def test_ddp_alone_without_amortised_rows():
  report = gpu_mfu.run(["cpu-micro"], dtype="float32", seq_len=16, batch=8, vocab=64, workers=(),
                       steps=1, reps=1, amortised=False, log=lambda line: None)
  (size,) = report["sizes"]
  assert [r["variant"] for r in size["rows"]] == ["ddp"] and size["workers"] == {}
  assert not report["amortised"] and "| cpu-micro | ddp |" in gpu_mfu.table(report)


def test_kernel_table_of_a_trace(tmp_path):
  import jax
  import jax.numpy as jnp
  from benchmarks import common
  f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
  a = jnp.ones((64, 64))
  f(a).block_until_ready()
  path = common.trace_to(lambda n: [f(a).block_until_ready() for _ in range(n)], 2,
                         str(tmp_path / "t" / "trace.json.gz"))
  text = common.kernel_table(path, steps=2)
  assert text.startswith("kernel time") and "top 25 kernels:" in text and "timelines:" in text
  # the kernels listed are the traced program's own (its compiled HLO names them)
  listed = [line.split()[-1] for line in
            text.split("top 25 kernels:")[1].split("timelines:")[0].strip().splitlines()]
  hlo = f.lower(a).compile().as_text()
  assert listed and any(name in hlo for name in listed), listed
  assert common.kernel_kind("sm90_xmma_gemm_bf16") == "matmul"
  assert common.kernel_kind("cudnn_generated_fort_native_sdpa") == "attention"
  assert common.kernel_kind("loop_multiply_fusion") == "elementwise / other fusions"
