"""Bad input ends in one line naming the value and what is allowed, a non-zero exit and no
traceback, in every binary: flags, config files and keys, config values, workdirs, exported
models, the network model's and the fit's numbers (issue 14; docs/reliability.md)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import cli
from lsgd_jax import checkpoint, config as config_lib, corpora, workdir as workdir_lib
from conftest import small_config, xla_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = xla_env()


def _one_line(stderr: str) -> str:
  lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("WARNING")]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  assert "Traceback" not in stderr
  return lines[0]


def _binary(module, *args, code=None):
  out = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and (code is None or out.returncode == code), out.stderr[-2000:]
  return _one_line(out.stderr)


# --- flags and config files: parsed inside the boundary (in-process: experiments.train's flags)


def _flag_values(argv):
  """Fresh flags like experiments.train's (--config, --workdir), outside the global FLAGS."""
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                           sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  return fv, holder


@pytest.fixture()
def parse(capsys):
  def run(*args):
    with pytest.raises(SystemExit) as e:
      cli._parse_flags(["train", *args], _flag_values(["train", *args])[0])  # pylint: disable=protected-access
    assert e.value.code == 2
    return _one_line(capsys.readouterr().err)
  return run


def test_flag_and_config_file_errors_are_one_line(parse, tmp_path):
  tiny = os.path.join(ROOT, "configs", "tiny.py")
  assert parse("--config=configs/nope.py", "--workdir=w") == (
      "error: config file configs/nope.py: No such file or directory")
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  assert parse(f"--config={bad}", "--workdir=w") == f"error: {bad}:1: invalid syntax"
  assert parse(f"--config={tiny}", "--workdir=w", "--config.train.stepz=10") == (
      "error: unknown config key train.stepz (--config.train.stepz); did you mean train.steps?")
  assert "unknown config key nosuch" in parse(f"--config={tiny}", "--workdir=w",
                                               "--config.nosuch.x=1")
  assert "outer_kwargs is set whole" in parse(f"--config={tiny}", "--workdir=w",
                                               "--config.local_sgd.outer_kwargs.b1=0.9")
  assert "'abc'" in parse(f"--config={tiny}", "--workdir=w", "--config.train.steps=abc")
  assert parse(f"--config={tiny}") == "error: --workdir is required; see --help."
  # a config file's own error (a bad `:ARG`): its message alone, not ml_collections' traceback
  assert parse(f"--config={ROOT}/configs/study.py:7B", "--workdir=w") == (
      "error: Unknown size '7B'; use one of 5M, 12M, 25M, 50M, 100M, 200M, 400M, 800M or 'cpu'.")


def test_outer_kwargs_are_settable_whole_from_the_command_line():
  argv = ["train", f"--config={ROOT}/configs/tiny.py", "--workdir=w",
          "--config.local_sgd.outer_optimizer=adam",
          "--config.local_sgd.outer_kwargs={'b1': 0.5, 'eps': 1e-6}"]
  fv, holder = _flag_values(argv)
  cli._parse_flags(argv, fv)  # pylint: disable=protected-access
  c = holder.value
  assert c.local_sgd.outer_kwargs.to_dict() == {"b1": 0.5, "eps": 1e-6}
  config_lib.validate(c)


def test_a_real_binary_says_one_line_and_keeps_the_traceback_behind_a_flag(tmp_path):
  args = ["--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.stepz=10"]
  assert "did you mean train.steps?" in _binary("train", *args, code=2)
  out = subprocess.run([sys.executable, "-m", "experiments.train", *args, "--traceback"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" in out.stderr


# --- config values


@pytest.mark.parametrize("overrides, message", [
    ({"optim__lr": float("nan")}, "optim.lr=nan: allowed a finite learning rate > 0"),
    ({"optim__lr": -1.0}, "optim.lr=-1.0: allowed a finite learning rate > 0"),
    ({"optim__lr": float("inf")}, "optim.lr=inf"),
    ({"local_sgd__outer_lr": -1.0}, "local_sgd.outer_lr=-1.0: allowed a finite"),
    ({"local_sgd__outer_lr": float("nan")}, "local_sgd.outer_lr=nan"),
    ({"local_sgd__two_stage": "yes"}, "local_sgd.two_stage must be 'auto', True or False"),
    ({"train__global_batch": 0}, "train.global_batch=0: allowed a positive multiple"),
    ({"train__eval_batch": 0}, "train.eval_batch=0: allowed a positive multiple"),
    ({"local_sgd__outer_kwargs": {"b1": 0.9}}, "'nesterov' takes none"),
    ({"local_sgd__outer_optimizer": "lamb", "local_sgd__two_stage": "True"},
     "local_sgd.outer_optimizer='lamb' does not act element by element"),
    ({"optim__b1": 1.5}, "optim.b1=1.5: allowed a decay rate in [0, 1)"),
    ({"optim__b2": -1.0}, "optim.b2=-1.0: allowed a decay rate in [0, 1)"),
    ({"optim__weight_decay": -5.0}, "optim.weight_decay=-5.0: allowed a finite number >= 0"),
    ({"optim__grad_clip": -1.0}, "optim.grad_clip=-1.0: allowed a finite number >= 0"),
    ({"train__steps": 5, "optim__warmup_steps": 5}, "optim.warmup_steps=5: allowed 0 to "
     "train.steps - 1 = 4"),
    ({"seed": -1}, "seed=-1: allowed an integer in [0, 2**32)"),
    ({"seed": 2**70}, "seed=1180591620717411303424: allowed an integer in [0, 2**32)"),
    ({"local_sgd__num_workers": True}, "local_sgd.num_workers=True: allowed an integer"),
    ({"mesh__num_devices": -1}, "mesh.num_devices must be 0 (all visible devices) or a positive"),
    ({"model__attention_chunks": 1000}, "model.attention_chunks=1000 is more than data.seq_len"),
])
def test_bad_config_values_name_the_value_and_what_is_allowed(overrides, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    config_lib.validate(small_config(**overrides))


def test_keys_misspelt_in_python_and_configs_of_another_type_are_refused():
  c = small_config()
  c.train.stepz = 3  # a ConfigDict built in Python takes any new key ...
  c.local_sgd.sync_evry = 5
  with pytest.raises(ValueError, match=re.escape(
      "Unknown config keys: local_sgd.sync_evry (did you mean local_sgd.sync_every?); "
      "train.stepz (did you mean train.steps?).")):
    config_lib.validate(c)  # ... the schema does not
  with pytest.raises(TypeError, match="must be an ml_collections.ConfigDict .* got a dict"):
    config_lib.validate(small_config().to_dict())
  from lsgd_jax import train  # pylint: disable=import-outside-toplevel
  with pytest.raises(TypeError, match="must be an ml_collections.ConfigDict .* got a dict"):
    train.train_and_evaluate(small_config().to_dict(), "/tmp/unused-lsgd-workdir")
  assert not os.path.exists("/tmp/unused-lsgd-workdir")


def test_compare_refuses_an_empty_or_unknown_list_of_algorithms(tmp_path):
  from lsgd_jax import train  # pylint: disable=import-outside-toplevel
  for algorithms in ("", (), "ddp,d"):
    with pytest.raises(ValueError, match=r"allowed one or more of local_sgd, ddp"):
      train.compare_algorithms(small_config(), tmp_path, algorithms=algorithms)
  assert not os.listdir(tmp_path)


def test_non_elementwise_outer_optimizers_are_refused_under_the_two_stage_sync():
  c = small_config(local_sgd__outer_optimizer="adafactor")
  config_lib.validate(c)  # fine with one device per worker ...
  with pytest.raises(ValueError, match="allowed there: nesterov, sgd, average, adam"):
    config_lib.check_outer_layout(c, two_stage=True)  # ... not when a worker spans several
  config_lib.check_outer_layout(small_config(local_sgd__outer_optimizer="adam"), two_stage=True)


def test_a_binary_file_given_as_text_corpus_is_flagged(capsys):
  assert corpora._check_text("a.txt", "To be, or not to be\n" * 10)  # pylint: disable=protected-access
  assert not corpora._check_text("a.bin", bytes(range(256)).decode("utf-8", "replace") * 4)  # pylint: disable=protected-access
  assert "does not look like text" in capsys.readouterr().out


def test_a_damaged_parquet_corpus_is_named(tmp_path):
  bad = tmp_path / "corpus.parquet"
  bad.write_bytes(b"not parquet at all" * 8)
  source = corpora.Source("local-x", (str(bad),))
  with pytest.raises(ValueError, match=r"Parquet file '.*corpus.parquet' cannot be read \("):
    list(corpora._parquet_documents(str(bad), source, "d"))  # pylint: disable=protected-access
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  numbers = tmp_path / "numbers.parquet"
  pq.write_table(pa.table({"text": [1, 2, 3]}), str(numbers))
  with pytest.raises(ValueError, match=r"numbers.parquet': column 'text' holds int64, not text"):
    list(corpora._parquet_documents(str(numbers), corpora.Source("local-y", (str(numbers),)),
                                    "d"))  # pylint: disable=protected-access


# --- workdirs


def test_unusable_workdirs_are_refused_in_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  for bad, message in ((str(tmp_path / "file"), "is a file, not a directory"),
                       ("/proc/x", "cannot be created"), ("", "is empty")):
    with pytest.raises(ValueError, match=message):
      workdir_lib.check_usable(bad)


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  with workdir_lib.claim(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirBusy, match=rf"in use by another run \(pid {os.getpid()}"):
      with workdir_lib.claim(str(tmp_path)):
        pass
  with workdir_lib.claim(str(tmp_path)):  # released on exit
    pass


def test_partial_temporaries_are_removed_at_start(tmp_path):
  partial = tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (tmp_path / "export").mkdir()
  (tmp_path / "export" / "model.json.tmp").write_text("{")
  keep = tmp_path / "checkpoints" / "20"
  keep.mkdir()
  with workdir_lib.claim(str(tmp_path)):
    assert not partial.exists() and not (tmp_path / "export" / "model.json.tmp").exists()
    assert keep.exists()


# --- exported models (experiments.evaluate)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  import jax  # pylint: disable=import-outside-toplevel
  from lsgd_jax import model  # pylint: disable=import-outside-toplevel
  cfg = model.model_config("cpu-tiny", 257, 64)
  params = model.init_params(cfg, jax.random.key(0))
  d = str(tmp_path_factory.mktemp("export"))
  checkpoint.export_model(d, params, cfg, {"tokenizer": {}, "config": {}})
  return d


def test_damaged_exports_are_named_in_one_line(export, tmp_path):
  garbage = tmp_path / "garbage"
  shutil.copytree(export, garbage)
  (garbage / "model.json").write_text("{not json")
  with pytest.raises(ValueError, match=rf"{garbage}/model.json is not a valid model description"):
    checkpoint.load_model(str(garbage))
  truncated = tmp_path / "truncated"
  shutil.copytree(export, truncated)
  for root, _, files in os.walk(truncated / "params"):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(root, name)) // 3)
  with pytest.raises(ValueError, match=r"the export is incomplete or damaged"):
    checkpoint.load_model(str(truncated))
  edited = tmp_path / "edited"
  shutil.copytree(export, edited)
  info = json.load(open(edited / "model.json"))
  info["model"]["num_layers"] = 7
  json.dump(info, open(edited / "model.json", "w"))
  with pytest.raises(ValueError, match=r"cannot be read"):
    checkpoint.load_model(str(edited))


# --- the network model (no JAX: fast subprocesses) and the fit


@pytest.mark.parametrize("args, message", [
    (["--bandwidth=0"], "--bandwidth=0.0 is not allowed; give a number of Gbit/s > 0."),
    (["--workers=0"], "--workers=0 is not allowed; give an integer >= 1."),
    (["--sync_every=abc"], "--sync_every: 'abc' is not allowed; give a comma list of integers"),
    (["--targets=0.5,1.5"], "--targets: '1.5' is not allowed; give a comma list of utilisations"),
    (["--mfu=-0.4"], "--mfu=-0.4 is not allowed; give a fraction in (0, 1]"),
    (["--model_size=big"], "model_size 'big' is neither a preset"),
])
def test_bandwidth_flags_are_checked_in_one_line(args, message):
  assert message in _binary("bandwidth", *args, code=1)


def test_fit_refuses_empty_bootstraps_and_impossible_levels():
  from lsgd_jax import report  # pylint: disable=import-outside-toplevel
  cols = report.read_results(os.path.join(ROOT, "docs", "scaling_cpu", "results.csv"))
  with pytest.raises(ValueError, match=r"n_boot=0 bootstrap resamples: allowed an integer >= 2"):
    report.analyze(cols, n_boot=0)
  with pytest.raises(ValueError, match=r"level=1.5: allowed an interval level in \(0, 1\)"):
    report.analyze(cols, level=1.5)
  assert "n_boot=0" in _binary("fit", "--results=docs/scaling_cpu/results.csv", "--out=/tmp/x",
                               "--n_boot=0", code=1)


def test_fit_names_a_file_that_is_not_a_results_csv(tmp_path):
  from lsgd_jax import report  # pylint: disable=import-outside-toplevel
  results_json = tmp_path / "results.json"  # a run's results.json, given where a CSV belongs
  results_json.write_text('{\n  "algorithm": "ddp",\n  "num_workers": 8, "eval_loss": 2.0\n}\n')
  with pytest.raises(ValueError, match="results.json: missing required columns"):
    report.read_results(str(results_json))
  wide = tmp_path / "wide.csv"
  wide.write_text(",".join(report.REQUIRED_COLUMNS) + "\n" + ",".join(["1"] * 9) + "\n")
  with pytest.raises(ValueError, match=r"wide.csv: row 1 has 9 fields, the header 7"):
    report.read_results(str(wide))
  binary = tmp_path / "binary.csv"
  binary.write_bytes(bytes(range(128, 256)))
  line = _binary("fit", f"--results={binary}", f"--out={tmp_path / 'out'}", code=1)
  assert f"{binary}: not a text CSV file" in line


@pytest.mark.parametrize("module, args, message", [
    ("fit", ["--results=docs/scaling_cpu/results.csv", "--out=/tmp/unused", "--study=v2",
             "--n_boot=0"], "n_boot=0 bootstrap resamples: allowed an integer >= 2"),
    ("fit", ["--results=docs/scaling_cpu/results.csv", "--out=/tmp/unused", "--level=7"],
     "level=7.0: allowed an interval level in (0, 1)"),
    ("fit", ["--results=docs/scaling_cpu/results.csv", "--out=/tmp/unused", "--study=v2",
             "--level=0.9"], "--level applies to the plain fit"),
    ("edge", ["--scenarios=", "--workdir=/tmp/unused", "--out=/tmp/unused"],
     "--scenarios is empty; allowed a comma list of: ddp, local_sgd"),
    ("streaming", ["--runs=", "--workdir=/tmp/unused"], "--runs is empty; allowed a comma list"),
])
def test_empty_lists_and_out_of_range_report_flags_are_one_line(module, args, message):
  assert message in _binary(module, *args, code=1)


def test_cudnn_attention_without_a_gpu_is_refused():
  from lsgd_jax import train  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"model.attention='cudnn' needs a GPU .* 'cpu'"):
    train.build(small_config(model__attention="cudnn"))


def test_sweep_cost_needs_a_share_of_the_peak():
  assert "--mfu is a share of the peak: allowed (0, 1]" in _binary(
      "sweep", "--config=configs/scaling_cpu.py", "--workdir=/tmp/unused", "--dry_run",
      "--hardware=8xH100", "--mfu=0")


def test_corpus_conversion_of_a_wrong_folder_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "lsgd_jax.corpora", "to-array-record",
                        str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip() == (f"error: {tmp_path / 'nope'}/dataset_info.json not found: give "
                                "the NAME/CONFIG/VERSION folder.")


def test_sweep_without_workdir():
  assert "--workdir is required" in _binary("sweep", "--config=configs/scaling_cpu.py", code=1)


def test_orbax_error_records_are_left_to_the_one_line():
  import logging as std_logging  # pylint: disable=import-outside-toplevel
  record = lambda level, path: std_logging.LogRecord("absl", level, path, 1, "m", None, None)
  orbax = "/site-packages/orbax/checkpoint/_src/futures/future.py"
  assert not cli._no_library_error_tracebacks(record(std_logging.ERROR, orbax))
  assert cli._no_library_error_tracebacks(record(std_logging.WARNING, orbax))
  assert cli._no_library_error_tracebacks(record(std_logging.ERROR, "/work/lsgd_jax/train.py"))
