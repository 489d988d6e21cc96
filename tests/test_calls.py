"""Several inner steps per compiled call (`train.steps_per_call`): where calls are cut, and that a
run cut into scanned calls gives the numbers of a run dispatched step by step, bit for bit."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from lsgd_jax import checkpoint, config as config_lib, train


def _ends(calls, start, total):
  out, step = [], start
  while step < total:
    step = calls.end(step)
    out.append(step)
  return out


def test_calls_are_cut_at_every_period_and_the_fault_step():
  # Periods by hand: H = 10, log every 4, at most 6 steps per call, 25 steps.
  calls = train.Calls(6, 25, cuts=(10, 0, 4, 0, 0))
  assert _ends(calls, 0, 25) == [4, 8, 10, 12, 16, 20, 24, 25]
  assert _ends(train.Calls(6, 25, cuts=(10,)), 3, 25) == [9, 10, 16, 20, 25]  # resumed at 3
  assert _ends(train.Calls(10, 20, cuts=(10,), at=(7, -1)), 0, 20) == [7, 10, 20]
  assert _ends(train.Calls(1, 4, cuts=(10,)), 0, 4) == [1, 2, 3, 4]


def test_steps_per_call_auto_and_budget():
  assert train.steps_per_call(0, per_step=False) == (10 if jax.default_backend() == "cpu" else 1)
  assert train.steps_per_call(7, per_step=False) == 7
  assert train.steps_per_call(7, per_step=True) == 1  # budget masks, streaming fragments


@pytest.mark.parametrize("bad", [-1, -7])
def test_bad_steps_per_call_is_refused(bad):
  c = small_config()
  c.train.steps_per_call = bad
  with pytest.raises(ValueError, match="train.steps_per_call"):
    config_lib.validate(c)


def _run(tmp_path, name, per_call, algorithm):
  c = small_config(steps=23, algorithm=algorithm, train__steps_per_call=per_call,
                   train__log_every=3)
  res = train.train_and_evaluate(c, str(tmp_path / name))
  records = [json.loads(l) for l in open(tmp_path / name / "metrics.jsonl")]
  for r in records:
    r.pop("tokens_per_sec", None)
  params = checkpoint.load_model(str(tmp_path / name / "export"))[1]
  return res, records, params


@pytest.mark.xla_default
@pytest.mark.parametrize("algorithm", ["local_sgd", "ddp"])
def test_scanned_calls_equal_step_by_step(tmp_path, algorithm, monkeypatch):
  # 23 steps, H = 10, log every 3, eval every 10: calls of 3, 3, 3, 1, 2, 3, 3, 2, ... steps.
  from lsgd_jax import rounds  # pylint: disable=import-outside-toplevel
  given, compile_ = [], jax.stages.Lowered.compile
  def spy(self, compiler_options=None, **kwargs):  # the options each program is compiled with
    given.append(compiler_options)
    return compile_(self, compiler_options, **kwargs)
  monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
  res1, rec1, p1 = _run(tmp_path, "one", 1, algorithm)
  step_options = list(given)
  res7, rec7, p7 = _run(tmp_path, "seven", 7, algorithm)
  dot = rounds.compiler_options("auto", "cpu", 64)  # the trainer's step and loop (width 64)
  # width 64: the one-step program keeps the loop's options (the scheduler from width 128 on)
  assert rounds.step_options(dot, "cpu", 64) == dot
  assert dot in step_options and dot in given[len(step_options):]
  assert rec1 == rec7
  assert res1["eval_loss"] == res7["eval_loss"] and res1["comm_bytes"] == res7["comm_bytes"]
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p7)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_library_fusion_options(monkeypatch):
  from lsgd_jax import rounds  # pylint: disable=import-outside-toplevel
  dot = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  if not rounds._known(tuple(dot.items())):  # pylint: disable=protected-access
    pytest.skip("this jaxlib has no xla_cpu_experimental_ynn_fusion_type")
  assert rounds.compiler_options("auto", "cpu") == dot
  assert rounds.compiler_options("dot", "cpu") == dot
  assert rounds.compiler_options("xla", "cpu") == {}
  assert rounds.compiler_options("auto", "gpu") == rounds.compiler_options("dot", "tpu") == {}
  # by width: the study's two smallest models (16, 32) keep XLA's default under "auto"
  assert rounds.compiler_options("auto", "cpu", 32) == {} and rounds.compiler_options(
      "auto", "cpu", 48) == rounds.compiler_options("dot", "cpu", 16) == dot
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
  assert rounds.compiler_options("auto", "cpu") == {}  # the user's flag stands
  assert rounds.compiler_options("dot", "cpu") == dot
  with pytest.raises(ValueError, match=r"train.library_fusion='dots': allowed 'auto', 'dot', "
                     r"'xla'"):
    rounds.compiler_options("dots", "cpu")
  memory = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  if rounds._known(tuple(memory.items())):  # pylint: disable=protected-access
    assert rounds.step_options(dot, "cpu") == rounds.step_options(dot, "cpu", 128) == {
        **dot, **memory}
    assert rounds.step_options(None, "cpu", 256) == memory
  assert rounds.step_options(dot, "cpu", 64) == dot  # small widths: no pages to save
  assert rounds.step_options(dot, "gpu") == dot and rounds.step_options(None, "tpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT")
  assert rounds.step_options(dot, "cpu") == dot  # the user's flag stands
  monkeypatch.setattr(rounds, "_known", lambda options: False)  # a jaxlib without the option
  assert rounds.step_options(dot, "cpu") == dot
  assert rounds.compiler_options("auto", "cpu") == {}
  with pytest.raises(ValueError, match=r"train.library_fusion='dot': this jaxlib .* has no XLA "
                     r"option xla_cpu_experimental_ynn_fusion_type; use 'auto' or 'xla'"):
    rounds.compiler_options("dot", "cpu")
  c = small_config()
  c.train.library_fusion = "none"
  with pytest.raises(ValueError, match="train.library_fusion='none'"):
    config_lib.validate(c)


def _library_fusions(compiled) -> list[set[str]]:
  """The ops of each computation XLA:CPU hands YNNPACK in `compiled`."""
  text = compiled.as_text()
  ops = {block.split(" ", 1)[0]: set(re.findall(r"= \S+ (\w+)\(", block))
         for block in text.split("\n\n")}
  return [ops[name] for name in re.findall(r"calls=(%[\w.]+)[^\n]*__ynn_fusion", text)]


def test_dot_only_library_fusion_keeps_reductions_in_xla():
  # An RMSNorm-scaled projection and its gradient (the scale's gradient is a reduction): by
  # default XLA:CPU hands YNNPACK reductions of their own too; with "dot" every library fusion
  # holds a dot, and the numbers stay the default's.
  from lsgd_jax import rounds  # pylint: disable=import-outside-toplevel
  def loss(x, scale, w):
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
    return jnp.sum(jnp.tanh(y @ w))
  args = (jax.random.normal(jax.random.key(0), (2, 256, 256)), jnp.linspace(0.5, 1.5, 256),
          jax.random.normal(jax.random.key(1), (256, 704)) / 16)
  lowered = jax.jit(jax.grad(loss, argnums=(1, 2))).lower(*args)
  default, dot = lowered.compile(), lowered.compile(rounds.compiler_options("dot", "cpu"))
  if not any("dot" not in ops for ops in _library_fusions(default)):
    pytest.skip("this jaxlib hands YNNPACK no reduction of its own here")
  assert _library_fusions(dot) and all("dot" in ops for ops in _library_fusions(dot))
  for a, b in zip(default(*args), dot(*args)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4)  # 512 O(1) terms summed in another order


def test_memory_optimised_scheduler_gives_the_same_numbers():
  """rounds.step_options adds XLA:CPU's memory-optimised scheduler to the one-step program (from
  width 128; here forced at the tests' width with d_model=None): 3 local SGD steps equal the
  default's up to float rounding (not bit for bit: values 1 ulp apart after one step, which
  AdamW's normalisation spreads to about half of them by the third)."""
  import functools  # pylint: disable=import-outside-toplevel
  from lsgd_jax import local_sgd, mesh, model, optim, rounds  # pylint: disable=import-outside-toplevel
  memory = (("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"),)
  if jax.default_backend() != "cpu" or not rounds._known(memory):  # pylint: disable=protected-access
    pytest.skip("XLA:CPU with the scheduler option only")
  cfg = model.model_config("cpu-micro", vocab_size=64, max_seq_len=16)
  tx = optim.inner_optimizer("adamw", learning_rate=1e-2, total_steps=10)
  layout = mesh.make_layout(4, 4)
  tokens = np.random.default_rng(0).integers(0, 64, (4, 2, 17)).astype(np.int32)
  inner = local_sgd.make_train_step(layout, "local_sgd", functools.partial(model.loss_fn, cfg), tx)
  batch = mesh.put_global(tokens, layout.batch)
  default = rounds.compiler_options("dot", "cpu")
  chosen = rounds.step_options(default, "cpu")
  assert chosen == {**default, **dict(memory)}
  finals = []
  for options in (default, chosen):
    state = local_sgd.init_state(layout, "local_sgd", functools.partial(model.init_params, cfg),
                                 tx, optim.outer_optimizer("nesterov"), jax.random.key(0))
    step = jax.jit(inner, donate_argnums=0, compiler_options=options)
    for _ in range(3):
      state, _ = step(state, batch)
    finals.append(jax.tree.leaves(state))
  for a, b in zip(*finals):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
