"""Model: parameter counts against the formula, presets, causality, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lsgd_jax import model


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size", list(model.PRESETS))
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_matches_formula(size, tie):
  cfg = model.model_config(size, vocab_size=1000, tie_embeddings=tie)
  params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model.Transformer(cfg, nnx.Rngs(0))),
                                      nnx.Param))
  assert _count(params) == model.total_params(cfg)
  embed = 1000 * cfg.d_model * (1 if tie else 2)
  assert _count(params) - embed == model.non_embedding_params(cfg)


@pytest.mark.parametrize("size", model.STUDY_SIZES)
def test_study_presets_within_ten_percent_of_name(size):
  n = model.non_embedding_params(model.model_config(size, vocab_size=32000))
  assert abs(n / (float(size[:-1]) * 1e6) - 1) < 0.10


def test_flops_per_token_formula():
  cfg = model.model_config("5M", vocab_size=100)
  n = model.non_embedding_params(cfg)
  expected = 6 * n + 6 * cfg.num_layers * 512 * cfg.d_model + 6 * cfg.d_model * 100
  assert model.train_flops_per_token(cfg, 512) == expected


def test_forward_is_causal_and_float32():
  cfg = model.model_config("cpu-tiny", vocab_size=50, max_seq_len=16, dtype="bfloat16")
  params = model.init_params(cfg, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
  logits = model.apply(cfg, params, tokens)
  assert logits.shape == (1, 8, 50) and logits.dtype == jnp.float32
  changed = model.apply(cfg, params, tokens.at[0, 5].set(9))
  np.testing.assert_array_equal(logits[0, :5], changed[0, :5])  # the past ignores the future
  assert not np.allclose(logits[0, 5:], changed[0, 5:])


def test_initial_loss_is_near_log_vocab():
  cfg = model.model_config("cpu-tiny", vocab_size=256, max_seq_len=64)
  params = model.init_params(cfg, jax.random.key(1))
  batch = jax.random.randint(jax.random.key(2), (4, 33), 0, 256)
  assert abs(float(model.loss_fn(cfg, params, batch)) - np.log(256)) < 0.1


def test_tied_embeddings_share_the_table():
  cfg = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=8, tie_embeddings=True)
  params = model.init_params(cfg, jax.random.key(0))
  assert "head" not in params
  assert model.apply(cfg, params, jnp.zeros((2, 4), jnp.int32)).shape == (2, 4, 40)


def test_attention_auto_is_xla_off_gpu_and_explicit_xla_matches_it():
  auto = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=8, dtype="bfloat16")
  xla = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=8, dtype="bfloat16",
                           attention="xla")
  assert jax.default_backend() == "cpu" and model.attention_implementation(auto) == "xla"
  assert model.attention_implementation(
      model.model_config("cpu-tiny", vocab_size=40, attention="cudnn")) == "cudnn"
  params = model.init_params(auto, jax.random.key(0))
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  assert jnp.array_equal(model.apply(auto, params, tokens), model.apply(xla, params, tokens))


def test_bad_model_inputs():
  with pytest.raises(ValueError, match=r"Unknown model size '7M'.*allowed: .*5M"):
    model.model_config("7M", vocab_size=10)
  with pytest.raises(ValueError, match=r"compute dtype 'float16'"):
    model.model_config("cpu-tiny", vocab_size=10, dtype="float16")
  with pytest.raises(ValueError, match=r"Unknown attention 'flash'; allowed: 'auto', 'xla'"):
    model.model_config("cpu-tiny", vocab_size=10, attention="flash")
  cfg = model.model_config("cpu-tiny", vocab_size=10, max_seq_len=8)
  params = model.init_params(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"Sequence length 9 exceeds the model's max_seq_len 8"):
    model.apply(cfg, params, jnp.zeros((1, 9), jnp.int32))


@pytest.mark.parametrize("t, chunks", [(16, 4), (15, 4), (12, 5), (9, 1)])
def test_block_causal_attention_equals_jax_attention(t, chunks):
  """The query blocks only skip scores that the causal mask zeroes: the same outputs and
  gradients as jax.nn.dot_product_attention's XLA path (blocks that do not divide T included)."""
  q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 2, 8)) for i in range(3))
  ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                     implementation="xla")
  blocks = lambda q, k, v: model.causal_attention(q, k, v, chunks)
  np.testing.assert_allclose(jax.jit(blocks)(q, k, v), ref(q, k, v), rtol=0, atol=1e-6)
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(
      q, k, v)
  for a, b in zip(grad(blocks), grad(ref)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("t, chunks", [(16, 4), (16, 1), (1, 1)])
def test_block_causal_attention_bfloat16_and_under_vmap(t, chunks):
  """The hand-written gradient keeps the input dtype and works per worker (vmapped), as the
  trainer calls it; head_dim 12, whose scale 1/sqrt(12) bfloat16 cannot hold exactly."""
  q, k, v = (jax.random.normal(jax.random.key(i), (3, 2, t, 2, 12)) for i in range(3))
  ref = jax.vmap(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                              implementation="xla"))
  blocks = jax.vmap(lambda q, k, v: model.causal_attention(q, k, v, chunks))
  grad = lambda f, *a: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(
      *a)
  for a, b in zip(grad(blocks, q, k, v), grad(ref, q, k, v)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = jax.jit(blocks)(*low)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref(*low).astype(jnp.float32), atol=2e-2)
  for a, b in zip(grad(blocks, *low), grad(ref, *low)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=5e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projections_gradient_equals_autodiff_of_the_layers(dtype):
  """`_project`'s written-out gradient (weight gradients from one transposed input) is autodiff's
  of the nnx layers it replaces, per worker under vmap as the trainer calls it, in both compute
  dtypes; the parameters' gradients stay float32."""
  dt = jnp.dtype(dtype)
  layers = [nnx.Linear(8, n, use_bias=False, dtype=dt, param_dtype=jnp.float32,
                       rngs=nnx.Rngs(i)) for i, n in enumerate((8, 12))]
  kernels = tuple(layer.kernel[...] for layer in layers)
  h = jax.random.normal(jax.random.key(5), (3, 2, 5, 8))  # [workers, batch, time, d_in]
  weights = [jax.random.normal(jax.random.key(6 + i), (3, 2, 5, n)) for i, n in enumerate((8, 12))]

  split = [nnx.split(layer) for layer in layers]  # each state holds one leaf, the kernel

  def loss(ks, h, project):
    fresh = [nnx.merge(g, jax.tree.map(lambda _: k, s)) for (g, s), k in zip(split, ks)]
    outs = project(h, fresh)
    return sum(jnp.sum(jnp.sin(o.astype(jnp.float32)) * w[0]) for o, w in zip(outs, weights))

  ours = model._project
  theirs = lambda h, fresh: [layer(h) for layer in fresh]
  grads = lambda project: jax.vmap(jax.grad(lambda ks, h: loss(ks, h, project), argnums=(0, 1)),
                                   in_axes=(None, 0))(kernels, h)
  (dk1, dh1), (dk2, dh2) = grads(ours), grads(theirs)
  tol = 1e-5 if dtype == "float32" else 3e-2
  for a, b in zip(dk1 + (dh1,), dk2 + (dh2,)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=tol, atol=tol)
  assert all(k.dtype == jnp.float32 for k in dk1)


def test_model_equals_plain_autodiff_of_the_plain_model(monkeypatch):
  """The loss and gradients of the model with its written-out pieces (the attention's and the
  projections' gradients, the rotary tables as constants) against the same model built from the
  plain pieces and differentiated by JAX: jax's XLA attention, the nnx layers, the tables
  computed in the program. T = 20 in 4 blocks of 5 queries."""
  cfg = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=32, attention_chunks=4)
  params = model.init_params(cfg, jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (2, 21), 0, 40)
  value_and_grad = lambda: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(cfg, p, batch)))(
      params)
  loss, grads = value_and_grad()

  def rope_in_program(seq_len, head_dim, theta):
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.arange(seq_len)[:, None].astype(jnp.float32) * freqs[None, :]
    return jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]

  monkeypatch.setattr(model, "_rope_tables", rope_in_program)
  monkeypatch.setattr(model, "_project", lambda h, layers: [layer(h) for layer in layers])
  monkeypatch.setattr(model, "causal_attention", lambda q, k, v, chunks:
                      jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
  plain_loss, plain_grads = value_and_grad()
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_projections_under_shard_map_data_parallel_gradient():
  """Under `shard_map` with the batch split over a mesh axis and the parameters replicated, the
  written-out projections' gradient is summed over that axis (`_vary_alike`): the gradient of
  the mean loss equals one device's on the whole batch."""
  from jax.sharding import PartitionSpec as P
  cfg = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=16)
  params = model.init_params(cfg, jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (4, 9), 0, 40)
  mesh = jax.make_mesh((2,), ("data",))

  def per_device(p, b):
    assert model._varying_axes(b) == {"data"} and not model._varying_axes(p["embed"]["embedding"])
    return jax.grad(lambda p: jax.lax.pmean(model.loss_fn(cfg, p, b), "data"))(p)

  on = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=P()))(on(params, P()), on(batch, P("data")))
  whole = jax.jit(jax.grad(lambda p: model.loss_fn(cfg, p, batch)))(params)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_rope_tables_are_constants_with_the_in_program_values():
  """The rotary tables are evaluated when the model is traced (XLA:CPU would otherwise compute
  sin and cos again for every element of q and k), with the values the program computed."""
  t, head_dim, theta = 64, 16, 10_000.0
  sin, cos = model._rope_tables(t, head_dim, theta)

  @jax.jit
  def in_program(positions):
    freqs = theta ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) / (head_dim // 2))
    angles = positions[:, None].astype(jnp.float32) * freqs[None, :]
    return jnp.sin(angles), jnp.cos(angles)

  want_sin, want_cos = in_program(jnp.arange(t))
  np.testing.assert_array_equal(sin[:, 0], want_sin)
  np.testing.assert_array_equal(cos[:, 0], want_cos)
  cfg = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=t)
  params = model.init_params(cfg, jax.random.key(0))
  batch = jnp.zeros((2, t + 1), jnp.int32)
  hlo = jax.jit(jax.grad(lambda p: model.loss_fn(cfg, p, batch))).lower(params).as_text()
  assert "sine" not in hlo and "cosine" not in hlo


def test_attention_chunks_auto_rule_and_model_equivalence():
  cfg = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=512)
  assert [model.attention_chunks(cfg, t) for t in (64, 255, 256, 512)] == [1, 1, 4, 4]
  two = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=512, attention_chunks=2)
  assert model.attention_chunks(two, 64) == 2 and model.attention_chunks(two, 1) == 1
  params = model.init_params(cfg, jax.random.key(0))
  batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 40)
  loss = lambda c: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(c, p, batch)))(params)
  (l1, g1), (l2, g2) = loss(cfg), loss(two)  # T = 16: auto is 1 block, `two` is 2
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r"attention_chunks must be 0 \(auto\).*got -1"):
    model.model_config("cpu-tiny", vocab_size=40, attention_chunks=-1)


def test_fused_projections_keep_the_parameters_and_the_function():
  import dataclasses
  cfg = model.model_config("cpu-tiny", vocab_size=40, max_seq_len=16)
  fused = dataclasses.replace(cfg, fused_projections=True)
  params = model.init_params(cfg, jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(model.init_params(fused,
                                                                            jax.random.key(0)))
  batch = jax.random.randint(jax.random.key(1), (2, 17), 0, 40)
  loss = lambda c: jax.jit(jax.value_and_grad(lambda p: model.loss_fn(c, p, batch)))(params)
  (l1, g1), (l2, g2) = loss(cfg), loss(fused)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_swiglu_keeps_only_its_inputs_for_the_backward_pass():
  gate, up = jax.random.normal(jax.random.key(0), (2, 3, 8)), jnp.linspace(-2.0, 2.0, 48)
  up = up.reshape(2, 3, 8)
  plain = lambda g, u: jax.nn.silu(g) * u
  _, vjp = jax.vjp(model._swiglu, gate, up)  # pylint: disable=protected-access
  _, vjp_plain = jax.vjp(plain, gate, up)
  assert len(jax.tree.leaves(vjp)) == 2  # gate and up: the rest is recomputed
  assert len(jax.tree.leaves(vjp_plain)) > 2  # what it saves (the sigmoid and products)
  np.testing.assert_array_equal(model._swiglu(gate, up),  # pylint: disable=protected-access
                                plain(gate, up))
  cot = jnp.cos(gate)
  for a, b in zip(vjp(cot), vjp_plain(cot)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
