"""benchmarks/peer_workload.py (its helpers in benchmarks/common.py): the FLOP count it reports and
the kernel categories of its profile; benchmarks/trainer_ab.py and the PyTorch simulator it runs
(benchmarks/torch_diloco.py): their flags, and that the simulator's model is lsgd-jax's."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402
from lsgd_jax import model  # noqa: E402


def test_matmul_params_of_the_peer_workload():
  # By hand (issue 11): 4 layers x (4 x 256^2 + 3 x 256 x 704) + the 256 x 1024 output head.
  cfg = model.model_config("cpu-base", vocab_size=1024, max_seq_len=256)
  assert common.matmul_params(cfg) == 4 * (4 * 256**2 + 3 * 256 * 704) + 256 * 1024
  assert common.matmul_params(cfg) == 3_473_408


def test_kernel_categories():
  cat = common._category
  assert cat("ynn_fusion.3", "jit(train_step)/vmap(jvp())/dot_general").startswith("matmuls")
  assert cat("ynn_fusion.9", "jit(train_step)/vmap(transpose(jvp()))/dot_general").startswith(
      "matmuls")
  assert cat("ynn_fusion.4", "jit(train_step)/vmap(jvp(vmap(BTNH,BSNH->BNTS)))/dot_general"
             ).startswith("attention")
  assert cat("copy_select_fusion", "jit(train_step)/vmap(jvp(vmap(jit(_where))))/select_n"
             ).startswith("attention")
  assert cat("multiply_add_fusion.8", "jit(train_step)/vmap()/add").startswith("optimizer")
  assert cat("copy_bitcast_fusion.6", "jit(train_step)/vmap(transpose(jvp(jit(silu))))"
             ).startswith("copies")
  assert cat("add_bitcast_fusion", "jit(train_step)/vmap(jvp())/add").startswith("other")
  assert cat("copy_divide_fusion", "jit(train_step)/vmap(jvp(vmap()))/div").startswith("attention")
  # the block-causal attention (lsgd_jax.model.causal_attention) is named by its scope; op
  # names as its custom VJP's forward and backward passes carry them in a compiled train step
  assert cat("ynn_fusion.2", "jit(train_step)/jit(train_step)/vmap(jvp(causal_attention))/"
             "bnqk,bnkh->bnqh/dot_general").startswith("attention")
  assert cat("wrapped_reduce.3", "vmap(jvp(causal_attention))/reduce_max").startswith("attention")
  assert cat("add_dynamic-update-slice_fusion", "jit(train_step)/jit(train_step)/vmap(transpose("
             "vmap(jvp(causal_attention))))/scatter-add").startswith("attention")
  # SwiGLU's product, recomputed in the backward pass (model._swiglu): not attention
  swiglu = "jit(train_step)/vmap(transpose(jvp(vmap(jvp(swiglu)))))/checkpoint/jit(silu)"
  assert cat("copy_bitcast_fusion.20", swiglu).startswith("copies")
  assert cat("add_divide_fusion.3", swiglu + "/div").startswith("other")


def test_ab_commits_imports_the_package_at_a_revision(tmp_path):
  """common.package_at (benchmarks/ab_commits.py): lsgd_jax at a git revision, renamed, beside
  the working tree's."""
  import importlib
  if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
    pytest.skip("not a git checkout")
  pkg = common.package_at("HEAD", str(tmp_path), name="lsgd_at_head")
  old = importlib.import_module("lsgd_at_head.model")
  assert old.__file__.startswith(str(tmp_path)) and old is not model
  assert "lsgd_jax" not in (tmp_path / "lsgd_at_head" / "local_sgd.py").read_text()
  assert old.model_config("cpu-tiny", vocab_size=10).d_model == model.model_config(
      "cpu-tiny", vocab_size=10).d_model
  assert pkg.__name__ == "lsgd_at_head"


def test_steady_tokens_per_sec_keeps_the_rounds_without_compile_or_save():
  """benchmarks/trainer_ab.py reads a run's steady tokens/s from metrics.jsonl: the log intervals
  after step 2 H and before the last step (by hand: steps 30 and 40 of 50 with H = 10)."""
  records = [{"step": 0, "eval_loss": 6.9}, {"step": 10, "tokens_per_sec": 100.0},
             {"step": 20, "tokens_per_sec": 200.0}, {"step": 30, "tokens_per_sec": 5000.0},
             {"step": 35, "eval_loss": 5.0}, {"step": 40, "tokens_per_sec": 6000.0},
             {"step": 50, "tokens_per_sec": 300.0}]
  assert common.steady_tokens_per_sec(records, steps=50, sync_every=10) == 5500.0
  assert common.steady_tokens_per_sec(records, steps=50, sync_every=5) == 5000.0  # 20, 30, 40
  with pytest.raises(ValueError, match="no log record between step 20 and step 30"):
    common.steady_tokens_per_sec(records, steps=30, sync_every=10)


def test_unpack_gives_the_tree_at_a_revision(tmp_path):
  if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode:
    pytest.skip("not a git checkout")
  common.unpack("HEAD", str(tmp_path), "configs")
  head = subprocess.run(["git", "-C", ROOT, "show", "HEAD:configs/tiny.py"], capture_output=True,
                        text=True, check=True).stdout
  assert (tmp_path / "configs" / "tiny.py").read_text() == head
  assert not (tmp_path / "lsgd_jax").exists()


@pytest.mark.slow
def test_trainer_ab_end_to_end(tmp_path):
  """The trainer at HEAD against the working tree on a tiny model, 2 workers (~30 s)."""
  import json
  out = tmp_path / "ab.json"
  cmd = [sys.executable, "-m", "benchmarks.trainer_ab", "--base=HEAD", "--reps=1", "--steps=40",
         "--workers=2", "--size=cpu-tiny", "--seq_len=64", "--tokenizer=byte", f"--out={out}"]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert set(result["tokens_per_sec"]) == {"base", "tree"}
  assert result["workers"] == 2 and set(result["ratios"]) == {"base"}
  assert (result["size"], result["seq_len"], result["tokenizer"]) == ("cpu-tiny", 64, "byte")
  for runs in result["runs"].values():
    steps = [r["step"] for r in runs[0]["records"] if "tokens_per_sec" in r]
    assert steps == [10, 20, 30, 40]
    assert runs[0]["tokens_per_sec"] == next(r["tokens_per_sec"] for r in runs[0]["records"]
                                             if r["step"] == 30)
  assert result["ratio"] > 0


@pytest.mark.parametrize("flag, message", [
    ("--compile_options=xla_cpu_scheduler_type", "'xla_cpu_scheduler_type' is not KEY=VALUE"),
    ("--dtypes=float32,float16", "Unknown compute dtype 'float16'; allowed: 'float32', 'bfloat16'"),
])
def test_peer_workload_rejects_bad_flags(flag, message):
  done = subprocess.run([sys.executable, "-m", "benchmarks.peer_workload", "--devices=8", flag,
                         "--out=/dev/null"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert message in done.stderr + done.stdout
  assert "Traceback" not in done.stderr


_TORCH_CHECK = r"""
import sys
import jax, jax.numpy as jnp, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from benchmarks import torch_diloco
from lsgd_jax import model
cfg = model.model_config("cpu-tiny", vocab_size=97, max_seq_len=32)  # 2 layers, width 64, 4 heads
params = model.init_params(cfg, jax.random.key(0))
tokens = np.random.default_rng(0).integers(0, 97, (2, 33))
loss, grads = jax.value_and_grad(lambda p: model.loss_fn(cfg, p, jnp.asarray(tokens)))(params)
net = torch_diloco.build_model(torch_diloco.parse_args(
    ["--layers=2", "--width=64", "--heads=4", "--d_ff=192", "--vocab=97", "--seq_len=32"]))
pairs = [(net.embed.weight, ("embed", "embedding"), False), (net.norm.scale, ("final_norm", "scale"), False),
         (net.head.weight, ("head", "kernel"), True)]
for i, blk in enumerate(net.blocks):
  pairs += [(blk.norm1.scale, ("blocks", i, "attn_norm", "scale"), False),
            (blk.norm2.scale, ("blocks", i, "mlp_norm", "scale"), False)]
  pairs += [(getattr(blk, n).weight, ("blocks", i, n, "kernel"), True)
            for n in ("q", "k", "v", "o", "gate", "up", "down")]
def at(tree, path):
  for k in path:
    tree = tree[k]
  return np.asarray(tree)
with torch.no_grad():
  for p, path, linear in pairs:  # nnx.Linear's kernel is [d_in, d_out], torch's weight its transpose
    p.copy_(torch.from_numpy(at(params, path).T.copy() if linear else at(params, path)))
got = net(torch.from_numpy(tokens))
got.backward()
np.testing.assert_allclose(float(got), float(loss), rtol=1e-5)
for p, path, linear in pairs:
  g = at(grads, path)
  np.testing.assert_allclose(p.grad.numpy(), g.T if linear else g, rtol=2e-3, atol=2e-6)
print("same loss", float(got), float(loss), "and gradients on", len(pairs), "leaves")
"""


@pytest.mark.skipif(not os.environ.get("LSGD_TORCH_PYTHON"),
                    reason="LSGD_TORCH_PYTHON (an interpreter with torch) not set")
def test_torch_simulator_is_the_same_model():
  """benchmarks/torch_diloco.py's PyTorch model computes lsgd-jax's loss and gradients from the
  same weights (so the comparison in trainer_ab is between equal workloads). Needs torch, which
  the project does not depend on: run with LSGD_TORCH_PYTHON=/path/to/python."""
  done = subprocess.run([os.environ["LSGD_TORCH_PYTHON"], "-c", _TORCH_CHECK, ROOT],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "same loss" in done.stdout


@pytest.mark.skipif(not os.environ.get("LSGD_TORCH_PYTHON"),
                    reason="LSGD_TORCH_PYTHON (an interpreter with torch) not set")
def test_torch_simulator_runs_rounds_and_logs_them(tmp_path):
  """Two worker processes, two rounds on a one-layer model: a record per round, in
  metrics.jsonl's fields, and the loss of random tokens near log(vocab)."""
  import json
  import math
  out = tmp_path / "torch.jsonl"
  done = subprocess.run([os.environ["LSGD_TORCH_PYTHON"], "benchmarks/torch_diloco.py",
                         "--workers=2", "--steps=4", "--sync_every=2", "--layers=1", "--width=32",
                         "--heads=2", "--d_ff=64", "--vocab=97", "--seq_len=16", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["step"] for r in records] == [2, 4]
  assert all(r["tokens_per_sec"] > 0 and r["sync_s"] >= 0 for r in records)
  assert all(abs(r["loss"] - math.log(97)) < 0.5 for r in records)


def test_torch_simulator_rejects_bad_arguments(capsys):
  """Its flags are read without torch (imported only to run), and bad values are named."""
  from benchmarks import torch_diloco
  for argv, message in ((["--steps=45"], "--steps=45 is not a multiple of --sync_every=10"),
                        (["--workers=0"], "--workers=0: give a positive number"),
                        (["--width=250", "--heads=4"], "--width=250 must split into")):
    with pytest.raises(SystemExit):
      torch_diloco.parse_args(argv)
    assert message in capsys.readouterr().err
  assert torch_diloco.parse_args([]).workers == 8


@pytest.mark.parametrize("flag, message", [
    ("--devices=3", "--devices=3: give 0 (one per worker) or a divisor of --workers=8"),
    ("--torch_python=/nonexistent/python", "--torch_python=/nonexistent/python: cannot import "
     "torch there ([Errno 2] No such file or directory"),
])
def test_trainer_ab_rejects_bad_flags_with_a_message(flag, message):
  done = subprocess.run([sys.executable, "-m", "benchmarks.trainer_ab", "--base=", flag,
                         "--out=/dev/null"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert message in done.stderr
  assert "Traceback" not in done.stderr
