"""notebooks/quickstart.ipynb runs top to bottom on CPU and is stored without outputs.

The code cells are joined into one script and run in a fresh Python (no Jupyter kernel needed:
the notebook has no magics), from notebooks/ as a user would open it, with the test session's
compile flags (the first cell adds 8 fake devices to them) and a fresh tfds data_dir.
"""

import json
import os
import subprocess
import sys
import time

from conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
SMALLEST = ("c.train.steps, c.train.log_every, c.train.eval_every = 4, 2, 2\n"
            "c.train.eval_batches = 1\n"
            "c.optim.warmup_steps = 1\n"
            "c.local_sgd.sync_every = 2\n")


def _code_cells():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_stored_without_outputs():
  for cell in _code_cells():
    assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"][:1]


def test_notebook_runs_on_cpu(tmp_path):
  cells = ["".join(c["source"]) for c in _code_cells()]
  assert not any(line.lstrip().startswith(("!", "%")) for c in cells for line in c.splitlines())
  assert "xla_force_host_platform_device_count=8" in cells[0]  # before jax is imported
  # The smallest settings that still run every cell: 4 steps per algorithm, one eval batch,
  # fewer bootstrap resamples (the notebook's own settings are a user's first run).
  config_cell = next(i for i, c in enumerate(cells) if "c.train.steps = 40" in c)
  cells.insert(config_cell + 1, SMALLEST)
  assert "n_boot=200" in "".join(cells)
  cells = [c.replace("n_boot=200", "n_boot=20") for c in cells]
  script = tmp_path / "quickstart.py"
  script.write_text("\n\n".join(cells) + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  # The test session's compile settings, without its device count: the first cell adds that.
  env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", TFDS_DATA_DIR=str(tmp_path / "tfds"),
             XLA_FLAGS=TEST_XLA_FLAGS)
  t0 = time.perf_counter()
  res = subprocess.run([sys.executable, str(script)], cwd=os.path.join(ROOT, "notebooks"),
                       env=env, capture_output=True, text=True, timeout=400)
  elapsed = time.perf_counter() - t0
  assert res.returncode == 0, res.stderr[-4000:]
  out = res.stdout
  assert "8 x cpu" in out  # the first cell's fake devices took effect
  assert "local_sgd" in out and "ddp" in out and "final eval loss" in out  # the comparison table
  assert "L(N) = (N_c / N)^alpha" in out and "crossover N* = " in out  # the fits
  print(f"notebook ran in {elapsed:.0f} s")
