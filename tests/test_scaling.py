"""Scaling-law fits, frontier, comparison and the fit.py report (numpy / scipy only; fast)."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lsgd_jax import report, scaling

SIZES = np.array([5e6, 12e6, 25e6, 50e6, 100e6, 200e6, 400e6, 800e6])  # the study's 8 sizes
DDP = (0.069, 6.06e14)        # (alpha, N_c), arXiv 2409.13198
LOCAL_SGD = (0.072, 3.15e14)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pure_law(n, alpha, n_c):
  return (n_c / np.asarray(n)) ** alpha


def noisy(n, law, sigma, seed):
  return law(n) * np.exp(sigma * np.random.default_rng(seed).standard_normal(np.size(n)))


def test_noisy_points_recover_constants_within_intervals_that_shrink_with_noise():
  n = np.repeat(SIZES, 4)  # 8 sizes x 4 seeds; the same normal draws scaled to each noise level
  widths = []
  for sigma in (0.03, 0.01, 0.003):
    fit = scaling.fit_power_law(n, noisy(n, lambda v: pure_law(v, *DDP), sigma, seed=1),
                                n_boot=300, seed=0, x_name="N")
    iv = fit.intervals
    assert iv["alpha"][0] <= DDP[0] <= iv["alpha"][1], (sigma, fit)
    assert iv["X_c"][0] <= DDP[1] <= iv["X_c"][1], (sigma, fit)
    widths.append(iv["alpha"][1] - iv["alpha"][0])
  assert widths[0] > widths[1] > widths[2] > 0, widths


def test_exact_paper_laws_give_back_their_constants():
  for alpha, n_c in (DDP, LOCAL_SGD):
    fit = scaling.fit_power_law(SIZES, pure_law(SIZES, alpha, n_c), n_boot=50, x_name="N")
    assert fit.alpha == pytest.approx(alpha, rel=1e-6)
    assert fit.params["X_c"] == pytest.approx(n_c, rel=1e-5)
    assert fit.rmse_log < 1e-9
    np.testing.assert_allclose(fit.predict(SIZES), pure_law(SIZES, alpha, n_c), rtol=1e-7)


def test_crossover_of_the_paper_laws_is_near_1e8():
  (a1, c1), (a2, c2) = DDP, LOCAL_SGD
  # (c1 / N)^a1 = (c2 / N)^a2  <=>  N^(a1 - a2) = c1^a1 / c2^a2.
  expected = (c1 ** a1 / c2 ** a2) ** (1.0 / (a1 - a2))
  assert 5e7 < expected < 2e8
  cmp = scaling.compare_fits(SIZES, pure_law(SIZES, *DDP), SIZES, pure_law(SIZES, *LOCAL_SGD),
                             names=("ddp", "local_sgd"), n_boot=50, x_name="N")
  assert cmp.paired
  assert cmp.crossover == pytest.approx(expected, rel=1e-5)
  assert cmp.d_alpha == pytest.approx(0.003, abs=1e-7)
  assert cmp.crossover_fraction == 1.0
  d, _, _ = cmp.difference([1e7, 1e9])
  assert d[0] > 0 > d[1]  # local SGD worse below the crossover, better above


def test_noisy_comparison_interval_covers_the_true_difference_and_crossover():
  n = np.repeat(SIZES, 4)
  cmp = scaling.compare_fits(n, noisy(n, lambda v: pure_law(v, *DDP), 0.002, seed=2),
                             n, noisy(n, lambda v: pure_law(v, *LOCAL_SGD), 0.002, seed=3),
                             n_boot=200, x_name="N")
  lo, hi = cmp.d_alpha_interval
  assert lo <= 0.003 <= hi and lo > 0  # the difference is resolved at this noise
  expected = (DDP[1] ** DDP[0] / LOCAL_SGD[1] ** LOCAL_SGD[0]) ** (1.0 / (DDP[0] - LOCAL_SGD[0]))
  assert cmp.crossover_interval[0] <= expected <= cmp.crossover_interval[1]
  independent = scaling.compare_fits(n, noisy(n, lambda v: pure_law(v, *DDP), 0.002, seed=2),
                                     n, noisy(n, lambda v: pure_law(v, *LOCAL_SGD), 0.002, seed=3),
                                     paired=False, n_boot=100, x_name="N")
  assert not independent.paired and np.isfinite(independent.d_alpha_interval).all()


def test_offset_form_recovers_its_constants():
  e, a, alpha = 1.8, 400.0, 0.35
  law = lambda v: e + a / np.asarray(v) ** alpha
  fit = scaling.fit_power_law(SIZES, law(SIZES), "offset", n_boot=30)
  for k, v in {"E": e, "A": a, "alpha": alpha}.items():
    assert fit.params[k] == pytest.approx(v, rel=1e-4), k
  n = np.repeat(SIZES, 3)
  fit = scaling.fit_power_law(n, noisy(n, law, 0.005, seed=4), "offset", n_boot=150)
  for k, v in {"E": e, "A": a, "alpha": alpha}.items():
    assert fit.intervals[k][0] <= v <= fit.intervals[k][1], (k, fit)


def test_robust_loss_resists_one_diverged_run():
  n = np.repeat(SIZES, 3)
  y = noisy(n, lambda v: pure_law(v, *DDP), 0.003, seed=5)
  y[10] *= 1.5
  robust = scaling.fit_power_law(n, y, n_boot=20)
  plain = scaling.fit_power_law(n, y, n_boot=20, robust_loss="linear")
  assert abs(robust.alpha - DDP[0]) < 0.002 < abs(plain.alpha - DDP[0])


@pytest.mark.parametrize("x, y, form, match", [
    ([1e6], [3.0], "pure", "needs at least 2 points"),
    ([1e6, 1e6, 1e6], [3.0, 2.9, 3.1], "pure", "2 points with distinct x"),
    ([1e6, 1e7], [3.0, 2.5], "offset", "3 parameters"),
    ([1e6, 0.0, 1e8], [3.0, 2.5, 2.0], "pure", "x must be finite and positive"),
    ([1e6, -1e7, 1e8], [3.0, 2.5, 2.0], "pure", "x must be finite and positive"),
    ([1e6, 1e7, 1e8], [3.0, 0.0, 2.0], "pure", "loss must be finite and positive"),
    ([1e6, 1e7, 1e8], [3.0, np.nan, 2.0], "pure", "loss must be finite and positive"),
    ([1e6, 1e7, 1e8], [3.0, 2.5], "pure", "mismatched lengths"),
    ([1e6, 1e7, 1e8], [3.0, 2.5, 2.0], "cubic", "Unknown form"),
])
def test_bad_input_raises_naming_the_problem(x, y, form, match):
  with pytest.raises(ValueError, match=match):
    scaling.fit_power_law(x, y, form, n_boot=5)


def test_frontier_is_the_lower_envelope_and_fits_its_law():
  # Each size's run is a curve (several evaluations); the envelope follows L = (1e30 / C)^0.05.
  comp, loss = [], []
  for i, c_end in enumerate(np.geomspace(1e16, 1e20, 6)):
    c = c_end * np.array([0.05, 0.2, 0.5, 1.0])
    comp += c.tolist()
    loss += (pure_law(c_end, 0.05, 1e30) * (1 + 0.3 * (1 - c / c_end))).tolist()
  comp, loss = np.array(comp), np.array(loss)
  fr = scaling.compute_frontier(comp, loss, n_boot=50)
  assert np.all(np.diff(fr.compute) > 0) and np.all(np.diff(fr.loss) < 0)
  for c, l in zip(comp, loss):  # every point is matched or beaten by a frontier point no dearer
    assert np.any((fr.compute <= c) & (fr.loss <= l))
  ends = np.geomspace(1e16, 1e20, 6)  # beyond the first run, only the runs' ends are on it
  np.testing.assert_allclose(fr.compute[fr.compute >= 1e16], ends, rtol=1e-12)
  # Ends on the law plus dominated points (dearer and worse): the envelope's law is the law.
  fr = scaling.compute_frontier(np.concatenate([ends, 1.5 * ends]),
                                np.concatenate([pure_law(ends, 0.05, 1e30),
                                                1.02 * pure_law(ends, 0.05, 1e30)]), n_boot=20)
  np.testing.assert_allclose(fr.compute, ends, rtol=1e-12)
  assert fr.fit.alpha == pytest.approx(0.05, rel=1e-6)
  assert fr.fit.params["X_c"] == pytest.approx(1e30, rel=1e-4)


def test_extrapolation_check_on_an_exact_law_and_predict_interval():
  n = np.repeat(SIZES, 2)
  ex = scaling.extrapolation_check(n, pure_law(n, *DDP), n_boot=30)
  assert ex.x == SIZES[-1] and ex.n_fit == 14
  assert abs(ex.rel_error) < 1e-8 and ex.inside
  fit = scaling.fit_power_law(n, noisy(n, lambda v: pure_law(v, *DDP), 0.01, seed=6), n_boot=200)
  pred, lo, hi = fit.predict_interval([1e7, 1e10])
  assert np.all(lo < pred) and np.all(pred < hi)
  assert (hi - lo)[1] / pred[1] > (hi - lo)[0] / pred[0]  # wider far outside the data


def write_csv(path, rows):
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def synthetic_rows(h_values=(10, 50, 200)):
  rng, rows = np.random.default_rng(7), []
  runs = [("ddp", 1, n, *DDP) for n in SIZES[:5]] + [("local_sgd", 50, n, *LOCAL_SGD)
                                                      for n in SIZES[:5]]
  runs += [("local_sgd", h, SIZES[2], *LOCAL_SGD) for h in h_values if h != 50]
  for alg, h, n, alpha, n_c in runs:
    for seed in range(2):
      loss = pure_law(n, alpha, n_c) * (1 + 0.01 * math.log(h / 50 if h > 1 else 1))
      rows.append({"algorithm": alg, "num_workers": 8, "sync_every": h,
                   "non_embedding_params": int(n), "tokens": int(20 * n), "flops": 120 * n * n,
                   "eval_loss": loss * math.exp(0.003 * rng.standard_normal()),
                   "model_size": f"{n / 1e6:g}M", "seed": seed, "outer_lr": 0.7})
  return rows


def test_read_results_rejects_missing_and_non_numeric_columns(tmp_path):
  rows = synthetic_rows()
  write_csv(tmp_path / "a.csv", [{k: v for k, v in r.items() if k != "eval_loss"} for r in rows])
  with pytest.raises(ValueError, match="missing required columns eval_loss"):
    report.read_results(str(tmp_path / "a.csv"))
  rows[3]["flops"] = "lots"
  write_csv(tmp_path / "b.csv", rows)
  with pytest.raises(ValueError, match="column flops must be numeric; row 4"):
    report.read_results(str(tmp_path / "b.csv"))


def test_analysis_without_h_ablation_notes_the_skip(tmp_path):
  write_csv(tmp_path / "r.csv", synthetic_rows(h_values=(50,)))
  a = report.analyze(report.read_results(str(tmp_path / "r.csv")), n_boot=20)
  assert a.ablation is None and any("H ablation skipped" in n for n in a.notes)
  files = report.write_report(a, str(tmp_path / "out"))
  assert not any(f.endswith("sync_every_ablation.png") for f in files)
  assert "Skipped" in (tmp_path / "out" / "report.md").read_text()


def test_fit_binary_end_to_end(tmp_path):
  write_csv(tmp_path / "results.csv", synthetic_rows())
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "experiments.fit",
                         f"--results={tmp_path / 'results.csv'}", f"--out={out}", "--n_boot=40"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "alpha" in proc.stdout and "crossover" in proc.stdout
  for name in ("loss_vs_params.png", "loss_vs_compute.png", "local_sgd_minus_ddp.png",
               "sync_every_ablation.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  text = (out / "report.md").read_text()
  for needle in ("exponent difference", "crossover N*", "Extrapolation check", "| 200 | 2 |",
                 "local_sgd (H=50)", "6.06e14"):
    assert needle in text, needle


def test_fit_binary_reports_bad_input_without_a_traceback(tmp_path):
  write_csv(tmp_path / "bad.csv", [{"algorithm": "ddp", "eval_loss": 3.0}])
  proc = subprocess.run([sys.executable, "-m", "experiments.fit",
                         f"--results={tmp_path / 'bad.csv'}", f"--out={tmp_path / 'out'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "error:" in proc.stderr and "missing required columns" in proc.stderr
  assert "Traceback" not in proc.stderr
