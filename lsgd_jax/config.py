"""The configuration schema: every key, its default and its meaning, in one place.

Config files in `configs/` start from `base_config()` and change what their experiment needs;
a Colab user does the same. `validate(config)` checks the values that can be checked without
devices or data and raises `ValueError` naming the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import functools
import math

import jax
import ml_collections

from lsgd_jax import clock, data, faults, local_sgd, model, optim, periodic, streaming
from lsgd_jax import rounds, tokenizers, verdict


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.algorithm = "local_sgd"  # "local_sgd" (DiLoCo-style) or "ddp" (gradients averaged every step)
  c.seed = 0                 # parameter init and data order

  c.model = ml_collections.ConfigDict()
  c.model.size = "cpu-tiny"       # a preset of lsgd_jax.model.PRESETS ("5M" ... "800M", "cpu-*")
  c.model.dtype = "float32"       # compute dtype: "float32" or "bfloat16" (parameters stay float32;
  #                                 bfloat16 is for GPUs / TPUs: 8-15% slower on a CPU, as
  #                                 measured in docs/benchmarks.md)
  c.model.tie_embeddings = False  # share the input embedding with the output head
  c.model.max_seq_len = 2048      # longest sequence the model accepts
  c.model.attention = "auto"      # "xla", "cudnn" (fused, GPU + bfloat16) or "auto" (cudnn there)
  c.model.attention_chunks = 0    # query blocks of XLA's causal attention (0: auto, 4 from T=256)

  c.data = ml_collections.ConfigDict()
  c.data.name = "shakespeare"  # "shakespeare" / "kjv" (embedded, public domain), "text"
                               # (data.path), "c4" / "tfds" (prepared tfds data in data.data_dir)
  c.data.path = ""             # "text": a .txt / .jsonl / .parquet file or a folder of them;
                               # "c4" / "tfds": "NAME/CONFIG:VERSION" ("": "c4/en:3.0.1")
  c.data.data_dir = ""         # tfds root: corpora are built and cached here, C4 is read from here
                               # ("": $TFDS_DATA_DIR or ~/tensorflow_datasets)
  c.data.tokenizer = "byte"    # "byte", "sentencepiece" (trained on the corpus, cached beside
                               # it), or the path of a SentencePiece .model file
  c.data.vocab_size = 4096     # vocabulary of a trained SentencePiece model (the model's follows)
  c.data.text_field = "text"   # JSONL / Parquet / tfds field holding a document's text
  c.data.domain_field = ""     # JSONL / Parquet field naming a document's domain ("": its file)
  c.data.non_iid = "none"      # worker split: "none" (i.i.d.), "domain" (each worker whole
                               # domains), "dirichlet" (each domain split by Dir(alpha) shares)
  c.data.dirichlet_alpha = 0.5  # concentration for non_iid="dirichlet": small is skewed
  c.data.prefetch = 2          # batches the host thread prepares ahead of the step
  c.data.seq_len = 128         # tokens per training sequence
  c.data.val_fraction = 0.05   # share of the corpus held out for evaluation

  c.train = ml_collections.ConfigDict()
  c.train.steps = 200          # inner steps (= DDP steps): the same token budget for both
  c.train.global_batch = 32    # sequences per step over all workers (same for DDP and local SGD)
  c.train.log_every = 10       # steps between metrics.jsonl lines and progress lines
  c.train.steps_per_call = 0   # inner steps run as one compiled program (a loop; calls are cut at
                               # every sync, log, eval and checkpoint step): 0 = auto (10 on a
                               # CPU, 1 elsewhere), 1 = one dispatch per step
  c.train.library_fusion = "auto"  # what XLA:CPU hands its YNNPACK library: "dot" (dot fusions
  #                                  alone; +3-5% tokens/s on the issue-11 workload), "xla" (its
  #                                  default: reductions too), "auto" ("dot" on a CPU from
  #                                  d_model 48 on, unless XLA_FLAGS sets the option or the
  #                                  jaxlib lacks it; rounds.compiler_options)
  # The C heap maps requests of this many MiB or more afresh and returns them when freed (glibc;
  # periodic.map_large_blocks): None (auto) = 16 on a CPU, where a sync's temporaries otherwise
  # stay resident through the next round (issue-11 workload: peak 1.86-1.87 -> 1.74-1.79 GiB at
  # the same tokens/s, docs/benchmarks.md), untouched elsewhere; 0 = leave the process's setting
  # as it is (glibc's own rule unless an earlier run in the process changed it); 1-32 MiB.
  c.train.mmap_threshold_mib = ml_collections.config_dict.placeholder(int)
  c.train.eval_every = 50      # steps between held-out evaluations (0: only at the end)
  c.train.eval_batches = 4     # held-out batches per evaluation
  c.train.eval_batch = 32      # sequences per held-out batch (a multiple of num_workers x data)
  c.train.profile_steps = ""   # "START,COUNT": a jax.profiler trace of the 0-based steps START ..
                               # START+COUNT-1 in workdir/profile (WORKSPACE.md); "": off

  c.optim = ml_collections.ConfigDict()  # inner optimizer (local SGD workers) = DDP optimizer
  c.optim.name = "adamw"        # "adamw" or "sgd"
  c.optim.lr = 3e-3             # peak learning rate
  c.optim.ddp_lr = 0.0          # DDP's own peak lr (0: optim.lr): each method has its own tuned lr
                                # (docs/scaling_cpu_v2), so a comparison can train each at its own
  c.optim.warmup_steps = 20     # linear warm-up from 0
  c.optim.final_lr_fraction = 0.1  # cosine decay ends at this fraction of the peak
  c.optim.b1 = 0.9              # AdamW betas: the study's 0.9 / 0.95 (arXiv 2409.13198)
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1    # decoupled weight decay on matrices
  c.optim.grad_clip = 1.0       # global-norm clipping (0: off)

  c.local_sgd = ml_collections.ConfigDict()
  c.local_sgd.num_workers = 8        # K replicas; also splits DDP's batch the same way
  c.local_sgd.sync_every = 10        # H: inner steps between outer syncs
  c.local_sgd.outer_optimizer = "nesterov"  # "nesterov", "sgd", "average", or an optax name
  c.local_sgd.outer_lr = 0.7         # DiLoCo's default (arXiv 2311.08105)
  c.local_sgd.outer_momentum = 0.9   # DiLoCo's default
  c.local_sgd.outer_kwargs = ml_collections.ConfigDict()  # extra arguments of an optax optimizer,
  #   set whole: --config.local_sgd.outer_kwargs="{'b1': 0.9}"
  c.local_sgd.exact_cosine = False   # exact pairwise cosine (costs a second parameter all-reduce)
  c.local_sgd.two_stage = "auto"     # outer sync on 1/|data| slices, outer state sharded over
                                     # 'data' (Layout.two_stage): "auto" (when a worker has several
                                     # devices), True or False; same results, 1/|data| the bytes
  c.local_sgd.shard_outer = "auto"   # outer state sharded over the workers' devices: "auto" (flat
                                     # mesh, one worker per device, elementwise outer optimizer,
                                     # plain sync), True or False; 1/|worker| of its memory per
                                     # device, the bytes of one all-reduce
  # Hierarchical local SGD (num_clusters > 1): mesh ('cluster', 'worker', 'data'); the workers of a
  # cluster sync every cluster_sync_every = H1 steps with the cluster optimizer, the clusters every
  # sync_every = H2 steps (a multiple of H1) with the outer optimizer above.
  c.local_sgd.num_clusters = 1       # C clusters of num_workers / C workers (1: flat local SGD)
  c.local_sgd.cluster_sync_every = 1  # H1: inner steps between in-cluster syncs
  c.local_sgd.cluster_outer_optimizer = "nesterov"  # as outer_optimizer, inside each cluster
  c.local_sgd.cluster_outer_lr = 0.7
  c.local_sgd.cluster_outer_momentum = 0.9
  # Communication-efficient outer syncs (lsgd_jax/streaming.py, docs/streaming.md; the defaults are
  # today's sync). Flat layout: all; two-stage: fragments and overlap in float32; hierarchical: none.
  c.local_sgd.num_fragments = 1      # P: leaves split into P near-equal fragments, fragment p sent
                                     # every H steps at offset (p + 1) H / P (Streaming DiLoCo)
  c.local_sgd.overlap_steps = 0      # tau < H / P: a fragment's global value lands tau steps after
                                     # it is sent, while the workers keep training
  c.local_sgd.merge_alpha = 0.0      # on landing: theta_k <- alpha theta_k + (1 - alpha) theta
                                     # (0: overwrite), in [0, 1]
  c.local_sgd.eager = False          # eager updates (Kale et al. 2025): apply the own outer step at
                                     # once, swap it for the global one on landing (merge_alpha 0)
  c.local_sgd.outer_dtype = "float32"  # wire type of the pseudo-gradients: "float32", "bfloat16",
                                     # "float8" (e4m3), "int8", "int4"; the mean sums in float32
  c.local_sgd.outer_block = 256      # elements per float32 scale (0: one scale per tensor)
  c.local_sgd.error_feedback = False  # add last round's quantization residual (quantized wire)

  c.train.on_nonfinite = "stop"  # divergence: "stop" (keep the last good checkpoint) or "skip"
  #                                (skip non-finite steps; skip the round and reset workers)
  c.train.on_no_learning = "error"  # a finished run that learned nothing (loss worse than uniform,
  #                                   most steps or rounds skipped; lsgd_jax/verdict.py): "error"
  #                                   (results.json says so, then exit 1) or "warn" (keep going)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 0       # save every N steps (0: off); always at the end and on signal
  c.checkpoint.every_minutes = 10.0  # and every N minutes of wall time, the first at the first
  #                                    outer sync (step local_sgd.sync_every) (0: off)
  c.checkpoint.max_to_keep = 3       # newest checkpoints kept
  # Write in the background while training goes on (True) or while it waits (False); None (auto):
  # in the background on an accelerator, waiting on a CPU, where a background write shares the
  # cores and its host copy of the state adds to the next steps' buffers (the issue-11 workload:
  # peak memory 2.60 -> 2.13 GiB at the same tokens/s, docs/benchmarks.md).
  c.checkpoint.async_save = ml_collections.config_dict.placeholder(bool)

  c.faults = ml_collections.ConfigDict()  # injected faults (reliability and edge studies)
  c.faults.fail_prob = 0.0      # chance that a worker fails in a round (left out of the mean)
  c.faults.fail_schedule = ""   # failures at given rounds: "ROUND:WORKER,..." (0-based)
  c.faults.nan_step = -1        # at this step one worker's parameters become NaN (-1: never)
  c.faults.nan_worker = 0       # ... this worker

  c.clock = ml_collections.ConfigDict()  # simulated wall clock `sim_time` (lsgd_jax/clock.py)
  c.clock.device = "h100"        # device preset of clock.DEVICES ("": no sim_time)
  c.clock.inter_link = "wan-10g"  # link between workers (flat) or clusters (hierarchical), a
                                  # clock.LINKS preset
  c.clock.cluster_link = ""      # link between the workers of one cluster ("": the device's)
  c.clock.overlap = False        # communication overlaps computation
  c.clock.comm_overlap = 0.0     # share of a step a collective issued in it hides behind (2/3:
                                 # the backward pass, the published simulators' convention)
  c.clock.comm_buckets = 0       # with comm_overlap: the collective leaves in this many buckets,
                                 # one per layer as the backward pass ends it (0: infinitely fine)
  c.clock.duplex = False         # full-duplex links: all-reduces run two counter-rotating rings
  c.clock.model_size = ""        # price the run as this model preset ("": the trained one): a
                                 # small proxy run priced as the model it stands for
  c.clock.tokens_per_step = 0    # tokens per device a step is priced at (0: the run's own; more:
                                 # a small proxy run priced at a production batch)
  c.clock.inter_bandwidth = 0.0  # Mbit/s per device on inter_link (0: the preset's), e.g. a slow
                                 # uplink sweep

  c.edge = ml_collections.ConfigDict()  # heterogeneous workers (edge and straggler studies)
  c.edge.speeds = ""             # relative speed per worker: "" (all 1), "1,1,0.5,0.25" (one per
                                 # worker), "random:0.25" (uniform in [0.25, 1], fixed by seed)
  c.edge.policy = "wait"         # local SGD rounds: "wait" (every worker does H steps, the round
                                 # waits for the slowest) or "budget" (a round lasts H steps of the
                                 # fastest; slower workers do fewer steps, the outer mean is
                                 # weighted by steps done). DDP always waits for the slowest.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.num_devices = 0  # devices to use (0: all visible)
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError for values that are wrong whatever the devices and data."""
  if not isinstance(c, ml_collections.ConfigDict):
    raise TypeError(f"The config must be an ml_collections.ConfigDict (start from "
                    f"lsgd_jax.config.base_config()), got a {type(c).__name__}.")
  _check_keys(c)
  _check_integers(c)
  if c.algorithm not in local_sgd.ALGORITHMS:
    raise ValueError(f"Unknown algorithm {c.algorithm!r}; allowed: "
                     f"{', '.join(local_sgd.ALGORITHMS)}.")
  if c.model.size not in model.PRESETS:
    raise ValueError(f"Unknown model size {c.model.size!r}; allowed: {', '.join(model.PRESETS)}.")
  if c.model.attention not in model.ATTENTION:
    raise ValueError(f"Unknown model.attention {c.model.attention!r}; allowed: "
                     f"{', '.join(model.ATTENTION)}.")
  if c.model.attention_chunks < 0:
    raise ValueError(f"model.attention_chunks must be 0 (auto) or a positive number of query "
                     f"blocks, got {c.model.attention_chunks}.")
  if c.data.name not in data.DATASETS:
    raise ValueError(f"Unknown dataset {c.data.name!r}; allowed: {', '.join(data.DATASETS)}.")
  if c.optim.name not in optim.INNER_OPTIMIZERS:
    raise ValueError(f"Unknown inner optimizer {c.optim.name!r}; allowed: "
                     f"{', '.join(optim.INNER_OPTIMIZERS)}.")
  _validate_data(c.data)
  if c.data.seq_len < 1 or c.data.seq_len > c.model.max_seq_len:
    raise ValueError(f"data.seq_len={c.data.seq_len} must be in [1, model.max_seq_len="
                     f"{c.model.max_seq_len}].")
  if c.local_sgd.sync_every < 1:
    raise ValueError(f"local_sgd.sync_every (H) must be at least 1, got {c.local_sgd.sync_every}.")
  if c.local_sgd.num_workers < 1:
    raise ValueError(f"local_sgd.num_workers must be at least 1, got {c.local_sgd.num_workers}.")
  if c.train.steps < 1:
    raise ValueError(f"train.steps must be at least 1, got {c.train.steps}.")
  if c.train.global_batch < 1:
    raise ValueError(f"train.global_batch={c.train.global_batch}: allowed a positive multiple of "
                     "num_workers x devices per worker (sequences per step over all workers).")
  if c.train.eval_batches and c.train.eval_batch < 1:
    raise ValueError(f"train.eval_batch={c.train.eval_batch}: allowed a positive multiple of "
                     "num_workers x devices per worker (or train.eval_batches=0: no evaluation).")
  if c.model.attention_chunks > c.data.seq_len:
    raise ValueError(f"model.attention_chunks={c.model.attention_chunks} is more than "
                     f"data.seq_len={c.data.seq_len}: allowed 0 (auto) or 1 to seq_len query "
                     "blocks.")
  if c.mesh.num_devices < 0:
    raise ValueError(f"mesh.num_devices must be 0 (all visible devices) or a positive count, "
                     f"got {c.mesh.num_devices}.")
  _validate_rates(c)
  if not (isinstance(c.train.steps_per_call, int) and c.train.steps_per_call >= 0):
    raise ValueError(f"train.steps_per_call must be an integer >= 0 (0: auto), got "
                     f"{c.train.steps_per_call!r}.")
  mmap_threshold_mib(c.train.mmap_threshold_mib, "cpu")
  rounds.check_library_fusion(c.train.library_fusion)
  for key in ("log_every", "eval_every", "eval_batches"):
    if c.train[key] < 0:
      raise ValueError(f"train.{key} must be non-negative, got {c.train[key]}.")
  periodic.parse_profile_steps(c.train.profile_steps, c.train.steps)
  if c.train.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {c.train.on_nonfinite!r}.")
  if c.train.on_no_learning not in verdict.ON_NO_LEARNING:
    raise ValueError(f"train.on_no_learning must be one of {', '.join(verdict.ON_NO_LEARNING)}, "
                     f"got {c.train.on_no_learning!r}.")
  if not 0.0 <= c.faults.fail_prob <= 1.0:
    raise ValueError(f"faults.fail_prob must be in [0, 1], got {c.faults.fail_prob}.")
  if c.algorithm == "ddp" and (c.faults.fail_prob or c.faults.fail_schedule or
                               c.faults.nan_step >= 0):
    raise ValueError("faults.* inject worker failures and diverged workers into local SGD; "
                     "they do not apply to algorithm='ddp'.")
  if not 0 <= c.faults.nan_worker < c.local_sgd.num_workers:
    raise ValueError(f"faults.nan_worker={c.faults.nan_worker} must be in "
                     f"[0, num_workers={c.local_sgd.num_workers}).")
  for key in ("every_steps", "every_minutes"):
    if c.checkpoint[key] < 0:
      raise ValueError(f"checkpoint.{key} must be non-negative, got {c.checkpoint[key]}.")
  if c.checkpoint.max_to_keep < 1:
    raise ValueError(f"checkpoint.max_to_keep must be at least 1, got {c.checkpoint.max_to_keep}.")
  async_save(c.checkpoint.async_save)
  _validate_hierarchy(c)
  if two_stage(c.local_sgd.two_stage) is True:
    check_outer_layout(c, True)
  if c.algorithm == "local_sgd":
    _validate_streaming(c)
  shard_outer(c)
  if c.algorithm == "local_sgd":  # builds the outer optimizer once to check its name and args
    optim.outer_optimizer(c.local_sgd.outer_optimizer, c.local_sgd.outer_lr,
                          c.local_sgd.outer_momentum, c.local_sgd.outer_kwargs.to_dict())


# Sections whose keys are free-form (passed on as keyword arguments) or belong to a wrapper.
_FREE_FORM = ("local_sgd.outer_kwargs.", "sweep.")


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key in c.keys():
    value = c[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += _flat_keys(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


@functools.lru_cache(maxsize=1)
def _known_keys() -> tuple[str, ...]:
  return tuple(_flat_keys(base_config()))


def _check_keys(c: ml_collections.ConfigDict) -> None:
  """Refuses keys the schema does not have (a misspelt key set in Python would otherwise be
  ignored and the run would train on the default): each named, with the nearest known key."""
  known = _known_keys()
  unknown = [k for k in _flat_keys(c) if k not in known and not
             any(k.startswith(f) for f in _FREE_FORM)]
  if unknown:
    lines = []
    for key in unknown:
      near = difflib.get_close_matches(key, known, n=1)
      lines.append(f"{key}" + (f" (did you mean {near[0]}?)" if near else ""))
    raise ValueError(f"Unknown config key{'s' * (len(unknown) > 1)}: {'; '.join(lines)}. "
                     "Every key and its meaning: lsgd_jax/config.py.")


# Keys that count something: integers (True / False, numpy or float values are refused).
_INTEGER_KEYS = ("seed", "local_sgd.num_workers", "local_sgd.sync_every", "train.steps",
                 "train.global_batch", "train.eval_batch", "train.eval_batches",
                 "train.eval_every", "train.log_every", "optim.warmup_steps",
                 "model.attention_chunks", "model.max_seq_len", "data.seq_len",
                 "mesh.num_devices")


def _check_integers(c: ml_collections.ConfigDict) -> None:
  for key in _INTEGER_KEYS:
    section, _, name = key.rpartition(".")
    value = c[section][name] if section else c[name]
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{key}={value!r}: allowed an integer.")
  if not 0 <= c.seed < 2**32:
    raise ValueError(f"seed={c.seed}: allowed an integer in [0, 2**32).")


def _positive_finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _validate_rates(c: ml_collections.ConfigDict) -> None:
  """Learning rates are finite and positive; outer_kwargs only go to optax optimizers."""
  if not _positive_finite(c.optim.lr):
    raise ValueError(f"optim.lr={c.optim.lr}: allowed a finite learning rate > 0 (e.g. 3e-3).")
  if c.optim.ddp_lr != 0 and not _positive_finite(c.optim.ddp_lr):
    raise ValueError(f"optim.ddp_lr={c.optim.ddp_lr}: allowed 0 (DDP uses optim.lr) or a finite "
                     "learning rate > 0.")
  o = c.optim
  for key in ("b1", "b2"):
    if not (isinstance(o[key], (int, float)) and 0 <= o[key] < 1):
      raise ValueError(f"optim.{key}={o[key]!r}: allowed a decay rate in [0, 1) (AdamW's "
                       "defaults: b1 0.9, b2 0.95).")
  for key, meaning in (("weight_decay", "0: none"), ("grad_clip", "0: no clipping")):
    if not (isinstance(o[key], (int, float)) and 0 <= o[key] < math.inf):
      raise ValueError(f"optim.{key}={o[key]!r}: allowed a finite number >= 0 ({meaning}).")
  if not 0 <= o.warmup_steps < c.train.steps:
    raise ValueError(f"optim.warmup_steps={o.warmup_steps}: allowed 0 to train.steps - 1 = "
                     f"{c.train.steps - 1} (the warm-up must end before the run does).")
  s = c.local_sgd
  if c.algorithm == "local_sgd" and s.outer_optimizer != "average":
    if not _positive_finite(s.outer_lr):
      raise ValueError(f"local_sgd.outer_lr={s.outer_lr}: allowed a finite learning rate > 0 "
                       "(DiLoCo: 0.7; 1.0 with momentum 0 is plain averaging).")
  if s.num_clusters > 1 and s.cluster_outer_optimizer != "average":
    if not _positive_finite(s.cluster_outer_lr):
      raise ValueError(f"local_sgd.cluster_outer_lr={s.cluster_outer_lr}: allowed a finite "
                       "learning rate > 0.")
  kwargs = s.outer_kwargs.to_dict() if hasattr(s.outer_kwargs, "to_dict") else s.outer_kwargs
  if not isinstance(kwargs, dict):
    raise ValueError(f"local_sgd.outer_kwargs={kwargs!r}: allowed a dict of the optax "
                     "optimizer's arguments, e.g. --config.local_sgd.outer_kwargs=\"{'b1': 0.9}\".")
  if kwargs and s.outer_optimizer in ("nesterov", "sgd", "average"):
    raise ValueError(f"local_sgd.outer_kwargs={kwargs} is for optax optimizers (e.g. "
                     f"outer_optimizer='adam'); '{s.outer_optimizer}' takes none: use outer_lr "
                     "and outer_momentum.")


def mmap_threshold_mib(value, backend: str) -> int:
  """train.mmap_threshold_mib as periodic.map_large_blocks takes it on `backend`: None (auto) is
  16 on a CPU and 0 (leave the C library's setting) elsewhere."""
  if value is None:
    return 16 if backend == "cpu" else 0
  top = periodic.MMAP_THRESHOLD_MAX_MIB
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
    raise ValueError(f"train.mmap_threshold_mib={value!r}: allowed None (auto: 16 on a CPU), 0 "
                     f"(leave the C library's setting) or a whole number of MiB from 1 to {top}.")
  return value


def _auto_bool(key: str, value) -> str | bool:
  """'auto', True or False: a key that holds "auto" or a bool; the command line gives 'True' /
  'False' (any case) for the string-typed key two_stage."""
  if isinstance(value, bool) or value == "auto":
    return value
  if isinstance(value, str) and value.lower() in ("true", "false"):
    return value.lower() == "true"
  raise ValueError(f"{key} must be 'auto', True or False, got {value!r}.")


def async_save(value) -> str | bool:
  """checkpoint.async_save as checkpoint.Checkpointer takes it: 'auto' (the key's None), True or
  False."""
  return _auto_bool("checkpoint.async_save", "auto" if value is None else value)


def two_stage(value) -> str | bool:
  """local_sgd.two_stage as make_layout takes it: 'auto', True or False."""
  return _auto_bool("local_sgd.two_stage", value)


def shard_outer(c: ml_collections.ConfigDict) -> str | bool:
  """local_sgd.shard_outer as make_layout takes it: 'auto' is narrowed to False where the sharded
  outer state does not apply whatever the mesh (DDP, hierarchical runs, streaming syncs, outer
  optimizers that are not elementwise); an explicit True there is refused."""
  s = c.local_sgd
  value = _auto_bool("local_sgd.shard_outer", s.shard_outer)
  if c.algorithm != "local_sgd":
    return False  # DDP has no outer state (the comparison binary runs it with the same config)
  reason = None
  if s.num_clusters > 1:
    reason = "the hierarchical layout (num_clusters > 1) keeps its outer state per cluster"
  elif not streaming.Streaming.of(s).plain:
    reason = ("streaming syncs (num_fragments, overlap_steps, eager, outer_dtype, "
              "error_feedback) keep the replicated or two-stage outer state")
  elif s.outer_optimizer not in optim.ELEMENTWISE_OUTER:
    reason = (f"outer_optimizer={s.outer_optimizer!r} does not act element by element (allowed: "
              f"{', '.join(optim.ELEMENTWISE_OUTER)})")
  if reason and value is True:
    raise ValueError(f"local_sgd.shard_outer=True cannot apply: {reason}; use 'auto' or False.")
  return False if reason else value


def check_outer_layout(c: ml_collections.ConfigDict, two_stage: bool) -> None:
  """The two-stage outer sync (local_sgd.py, Layout.two_stage) updates each device's slice of a
  flattened leaf on its own: only optimizers that act element by element give the same result
  there."""
  s = c.local_sgd
  if c.algorithm != "local_sgd" or not two_stage:
    return
  for key in ("outer_optimizer", "cluster_outer_optimizer"):
    if key == "cluster_outer_optimizer" and s.num_clusters <= 1:
      continue
    if s[key] not in optim.ELEMENTWISE_OUTER:
      raise ValueError(f"local_sgd.{key}={s[key]!r} does not act element by element, so the "
                       "two-stage outer sync (on when a worker has several devices) would change "
                       "its result; allowed there: "
                       f"{', '.join(optim.ELEMENTWISE_OUTER)}; or set local_sgd.two_stage=False.")


def _validate_hierarchy(c: ml_collections.ConfigDict) -> None:
  s = c.local_sgd
  two_stage(s.two_stage)
  if s.num_clusters < 1 or s.num_workers % s.num_clusters:
    raise ValueError(f"local_sgd.num_clusters={s.num_clusters} must divide local_sgd.num_workers="
                     f"{s.num_workers} (each cluster gets an equal share of workers).")
  if s.num_clusters > 1:
    if c.algorithm != "local_sgd":
      raise ValueError("local_sgd.num_clusters > 1 (hierarchical local SGD) needs "
                       "algorithm='local_sgd'.")
    h1, h2 = s.cluster_sync_every, s.sync_every
    if h1 < 1 or h2 % h1:
      raise ValueError(f"local_sgd.sync_every (H2) = {h2} must be a multiple of "
                       f"local_sgd.cluster_sync_every (H1) = {h1} >= 1: every global sync is also "
                       f"a cluster sync; e.g. H1 in "
                       f"{[d for d in range(1, h2 + 1) if h2 % d == 0]}.")
    optim.outer_optimizer(s.cluster_outer_optimizer, s.cluster_outer_lr,
                          s.cluster_outer_momentum)
  if c.edge.policy not in faults.STRAGGLER_POLICIES:
    raise ValueError(f"Unknown edge.policy {c.edge.policy!r}; allowed: "
                     f"{', '.join(faults.STRAGGLER_POLICIES)}.")
  faults.parse_speeds(c.edge.speeds, c.local_sgd.num_workers, c.seed)
  if c.clock.model_size and c.clock.model_size not in model.PRESETS:
    raise ValueError(f"Unknown clock.model_size {c.clock.model_size!r}; allowed: '' (the trained "
                     f"model) or {', '.join(model.PRESETS)}.")
  if not (isinstance(c.clock.tokens_per_step, int) and c.clock.tokens_per_step >= 0):
    raise ValueError(f"clock.tokens_per_step must be an integer >= 0 (0: the run's own tokens per "
                     f"device and step), got {c.clock.tokens_per_step!r}.")
  if not (c.clock.inter_bandwidth >= 0 and c.clock.inter_bandwidth < float("inf")):
    raise ValueError(f"clock.inter_bandwidth must be a finite number of Mbit/s >= 0 (0: the "
                     f"link preset's), got {c.clock.inter_bandwidth}.")
  if not 0.0 <= c.clock.comm_overlap <= 1.0:
    raise ValueError(f"clock.comm_overlap must be a share in [0, 1], got {c.clock.comm_overlap}.")
  if not (isinstance(c.clock.comm_buckets, int) and c.clock.comm_buckets >= 0):
    raise ValueError(f"clock.comm_buckets must be an integer >= 0 (0: infinitely fine buckets), "
                     f"got {c.clock.comm_buckets!r}.")
  if c.clock.device:
    clock.device(c.clock.device)
    clock.link(c.clock.inter_link)
    if c.clock.cluster_link:
      clock.link(c.clock.cluster_link)


def _validate_streaming(c: ml_collections.ConfigDict) -> None:
  def num_leaves() -> int:
    cfg = model.model_config(c.model.size, 256, c.model.max_seq_len, c.model.tie_embeddings)
    shapes = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    return len(jax.tree.leaves(shapes))

  streaming.validate(c.local_sgd, num_leaves)
  s = streaming.Streaming.of(c.local_sgd)
  if s.plain:
    return
  if c.local_sgd.num_clusters > 1:
    raise ValueError("local_sgd.num_fragments, overlap_steps, eager, outer_dtype and "
                     "error_feedback need the flat layout; they do not apply with num_clusters > 1.")
  if _budget(c):
    raise ValueError("Streaming outer syncs do not support edge.policy='budget' with unequal "
                     "edge.speeds (rounds of H steps per worker); use edge.policy='wait'.")


def _budget(c: ml_collections.ConfigDict) -> bool:
  v = faults.parse_speeds(c.edge.speeds, c.local_sgd.num_workers, c.seed)
  return c.edge.policy == "budget" and v.min() < v.max()


def _validate_data(d: ml_collections.ConfigDict) -> None:
  if d.name == "text" and not d.path:
    raise ValueError("data.name='text' needs data.path: a .txt / .jsonl / .parquet file or a "
                     "folder of them.")
  if d.name == "tfds" and not d.path:
    raise ValueError("data.name='tfds' needs data.path='NAME/CONFIG:VERSION'.")
  if d.tokenizer not in tokenizers.TOKENIZERS and not d.tokenizer.endswith(".model"):
    raise ValueError(f"Unknown data.tokenizer {d.tokenizer!r}; allowed: 'byte', 'sentencepiece', "
                     "or the path of a SentencePiece .model file.")
  if d.tokenizer == "sentencepiece" and d.vocab_size < 300:
    raise ValueError(f"data.vocab_size={d.vocab_size} is too small for a SentencePiece model "
                     "with byte fallback; use at least 300.")
  if d.non_iid not in data.NON_IID:
    raise ValueError(f"Unknown data.non_iid {d.non_iid!r}; allowed: {', '.join(data.NON_IID)}.")
  if not d.dirichlet_alpha > 0:
    raise ValueError(f"data.dirichlet_alpha must be positive, got {d.dirichlet_alpha}.")
  if not 0 < d.val_fraction < 1:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
  if d.prefetch < 1:
    raise ValueError(f"data.prefetch must be at least 1, got {d.prefetch}.")
