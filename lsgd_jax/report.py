"""From a results table to fitted laws, plots and a Markdown report (numpy / matplotlib only).

A Colab user runs the same steps as `experiments/fit.py`:

    cols = report.read_results("results.csv")
    analysis = report.analyze(cols, n_boot=1000)
    print(analysis.table())
    report.write_report(analysis, "out/")   # report.md and PNGs; the plot_* functions give Figures

Run selection: rows with a non-finite eval loss are dropped (failed runs); only the most common
`num_workers` is kept; local SGD uses one sync interval H (the one covering the most sizes, or the
one asked for); where a size was run with several hyper-parameter settings (columns `lr`,
`outer_optimizer`, `outer_lr`, `outer_momentum` where present) the setting with the lowest mean eval
loss is kept with all its seeds, as the study tuned the learning rate per size.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np

from lsgd_jax import scaling

if TYPE_CHECKING:  # matplotlib loads only when a plot is drawn
  from matplotlib.figure import Figure

REQUIRED_COLUMNS = ("algorithm", "num_workers", "sync_every", "non_embedding_params", "tokens",
                    "flops", "eval_loss")
HPARAM_COLUMNS = ("lr", "outer_optimizer", "outer_lr", "outer_momentum")
_COLORS = {"ddp": "C0", "local_sgd": "C1"}


def read_results(path: str) -> dict[str, np.ndarray]:
  """Columns of a CSV: numeric columns as float arrays (empty cells NaN), the others as strings."""
  try:
    with open(path, newline="") as f:
      table = [row for row in csv.reader(f) if row]
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a text CSV file ({e.reason} at byte {e.start}).") from None
  except csv.Error as e:
    raise ValueError(f"{path}: not a CSV file ({e}).") from None
  header = [h.strip() for h in table[0]] if table else []
  rows = [[v.strip() for v in r] for r in table[1:]]
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if missing:
    raise ValueError(f"{path}: missing required columns {', '.join(missing)} "
                     f"(found: {', '.join(header) or 'no header'}).")
  if not rows:
    raise ValueError(f"{path}: no data rows.")
  long = next((i for i, r in enumerate(rows) if len(r) > len(header)), None)
  if long is not None:
    raise ValueError(f"{path}: row {long + 1} has {len(rows[long])} fields, the header "
                     f"{len(header)}; not a results CSV.")
  cols = {}
  for j, name in enumerate(header):
    raw = [r[j] if j < len(r) else "" for r in rows]
    try:
      if name == "algorithm":
        raise ValueError
      cols[name] = np.array([float(v) if v else np.nan for v in raw])
    except ValueError:
      if name in REQUIRED_COLUMNS and name != "algorithm":
        bad = next(i for i, v in enumerate(raw) if not _is_float(v))
        raise ValueError(f"{path}: column {name} must be numeric; row {bad + 1} has "
                         f"{raw[bad]!r}.") from None
      cols[name] = np.array(raw, dtype=str)
  return cols


def select_grids(cols: dict[str, np.ndarray], grids) -> dict[str, np.ndarray]:
  """The rows of a sweep's results.csv (lsgd_jax.sweep) that belong to any of `grids`; its `grid`
  column names each run's grids joined by "+" (e.g. "main+H")."""
  grids = set(grids)
  if "grid" not in cols:
    raise ValueError("Selecting grids needs a `grid` column (a results.csv written by a sweep).")
  keep = np.array([bool(set(str(g).split("+")) & grids) for g in cols["grid"]])
  if not keep.any():
    present = sorted({p for g in cols["grid"] for p in str(g).split("+")})
    raise ValueError(f"No row belongs to the grids {', '.join(sorted(grids))}; present: "
                     f"{', '.join(present)}.")
  return {k: v[keep] for k, v in cols.items()}


def _is_float(v: str) -> bool:
  try:
    float(v or "nan")
    return True
  except ValueError:
    return False


def _tuned(cols: dict[str, np.ndarray], rows: np.ndarray, keys: tuple[str, ...]) -> np.ndarray:
  """Of `rows`, per value of `keys`, the rows of the hyper-parameter setting of lowest mean loss."""
  hp = [c for c in HPARAM_COLUMNS if c in cols]
  groups = collections.defaultdict(lambda: collections.defaultdict(list))
  for i in rows:
    groups[tuple(cols[k][i] for k in keys)][tuple(str(cols[c][i]) for c in hp)].append(i)
  keep = [min(g.values(), key=lambda ii: np.mean(cols["eval_loss"][ii])) for g in groups.values()]
  return np.sort(np.concatenate(keep)).astype(int) if keep else np.zeros(0, int)


@dataclasses.dataclass(eq=False)
class Analysis:
  """Everything the report shows; `rows[alg]` index the CSV rows behind each algorithm's fits."""

  cols: dict[str, np.ndarray]
  rows: dict[str, np.ndarray]
  labels: dict[str, str]
  fits_n: dict[str, scaling.PowerLawFit]
  fits_d: dict[str, scaling.PowerLawFit]
  frontiers: dict[str, scaling.Frontier]
  extrapolations: dict[str, scaling.Extrapolation]
  comparison: scaling.Comparison | None
  ablation: dict | None     # {"N", "H", "loss", "ddp_loss"} at one size, or None
  notes: list[str]
  form: str
  level: float
  n_boot: int

  def points(self, alg: str, col: str) -> np.ndarray:
    return self.cols[col][self.rows[alg]]

  def all_fits(self) -> dict[str, scaling.PowerLawFit]:
    fits = {f"{self.labels[a]} L(N)": f for a, f in self.fits_n.items()}
    fits.update({f"{self.labels[a]} L(D)": f for a, f in self.fits_d.items()})
    fits.update({f"{self.labels[a]} frontier L(C)": fr.fit for a, fr in self.frontiers.items()
                 if fr.fit is not None})
    return fits

  def table(self) -> str:
    lines = [scaling.fits_table(self.all_fits())]
    if self.comparison is not None:
      lines.append(str(self.comparison))
    lines += [f"extrapolation {self.labels[a]}: {e}" for a, e in self.extrapolations.items()]
    return "\n".join(lines + [f"note: {n}" for n in self.notes])


def check_bootstrap(n_boot, seed, level: float = 0.95) -> None:
  """The bootstrap's settings, as both reports (this and study_report) take them."""
  if not (isinstance(n_boot, int) and n_boot >= 2):
    raise ValueError(f"n_boot={n_boot!r} bootstrap resamples: allowed an integer >= 2 (e.g. 1000).")
  if not (isinstance(seed, int) and seed >= 0):
    raise ValueError(f"seed={seed!r}: allowed an integer >= 0.")
  if not 0 < level < 1:
    raise ValueError(f"level={level!r}: allowed an interval level in (0, 1), e.g. 0.95.")


def analyze(cols: dict[str, np.ndarray], *, form: str = "pure", sync_every: int | None = None,
            n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Analysis:
  """Selects runs, fits L(N), L(D), the L(C) frontier per algorithm, compares the algorithms."""
  check_bootstrap(n_boot, seed, level)
  notes = []
  missing = [c for c in REQUIRED_COLUMNS if c not in cols]
  if missing:
    raise ValueError(f"Results lack required columns: {', '.join(missing)}.")
  cols = {k: np.asarray(v, dtype=str if k == "algorithm" else None) for k, v in cols.items()}
  cols.update({k: cols[k].astype(float) for k in REQUIRED_COLUMNS if k != "algorithm"})
  ok = np.isfinite(cols["eval_loss"]) & (cols["eval_loss"] > 0)
  if (~ok).any():
    notes.append(f"dropped {(~ok).sum()} rows without a finite eval loss (failed runs).")
  workers, counts = np.unique(cols["num_workers"][ok], return_counts=True)
  if not workers.size:
    raise ValueError("No row has a finite, positive eval_loss.")
  k_workers = workers[np.argmax(counts)]
  if workers.size > 1:
    notes.append(f"kept num_workers = {k_workers:g}; other values dropped.")
  ok &= cols["num_workers"] == k_workers
  algs = sorted(set(cols["algorithm"][ok]), key=lambda a: (a != "ddp", a != "local_sgd", a))
  rows, labels = {}, {}
  h_rows = ok & (cols["algorithm"] == "local_sgd")
  for alg in algs:
    sel = ok & (cols["algorithm"] == alg)
    if alg == "local_sgd":
      hs = np.unique(cols["sync_every"][sel])
      sizes_at = lambda v: np.unique(cols["non_embedding_params"][sel & (cols["sync_every"] == v)])
      h = sync_every if sync_every is not None else max(hs, key=lambda v: (sizes_at(v).size, v))
      if not (sel & (cols["sync_every"] == h)).any():
        raise ValueError(f"No local_sgd run has sync_every = {h}; present: {hs.tolist()}.")
      if hs.size > 1:
        notes.append(f"local_sgd fits use H = {h:g} (present: {', '.join(f'{v:g}' for v in hs)}).")
      sel &= cols["sync_every"] == h
      labels[alg] = f"local_sgd (H={h:g})"
    else:
      labels[alg] = alg
    rows[alg] = _tuned(cols, np.flatnonzero(sel), ("non_embedding_params",))
    if rows[alg].size < sel.sum():
      notes.append(f"{alg}: kept the best hyper-parameters at each size ({rows[alg].size} of "
                   f"{sel.sum()} rows).")
  kw = dict(n_boot=n_boot, level=level)
  fits_n, fits_d, frontiers, extrap = {}, {}, {}, {}
  for i, alg in enumerate(algs):
    n, d, c, y = (cols[k][rows[alg]] for k in ("non_embedding_params", "tokens", "flops",
                                                 "eval_loss"))
    try:
      fits_n[alg] = scaling.fit_power_law(n, y, form, seed=seed + i, x_name="N", **kw)
    except ValueError as e:
      notes.append(f"{alg}: no L(N) fit: {e}")
      continue
    try:
      fits_d[alg] = scaling.fit_power_law(d, y, form, seed=seed + i, x_name="D", **kw)
    except ValueError as e:
      notes.append(f"{alg}: no L(D) fit: {e}")
    try:
      frontiers[alg] = scaling.compute_frontier(c, y, form=form, seed=seed + i, **kw)
      if frontiers[alg].fit is None:
        notes.append(f"{alg}: too few frontier points for an L(C) fit.")
    except ValueError as e:
      notes.append(f"{alg}: no compute frontier: {e}")
    try:
      extrap[alg] = scaling.extrapolation_check(n, y, form, seed=seed + i, **kw)
    except ValueError as e:
      notes.append(f"{alg}: no extrapolation check (needs one size more than the fit): {e}")
  comparison = None
  if "ddp" in fits_n and "local_sgd" in fits_n:
    comparison = scaling.compare_fits(
        *(cols[k][rows["ddp"]] for k in ("non_embedding_params", "eval_loss")),
        *(cols[k][rows["local_sgd"]] for k in ("non_embedding_params", "eval_loss")), form,
        names=(labels["ddp"], labels["local_sgd"]), seed=seed + 100, x_name="N", **kw)
  else:
    notes.append("no DDP vs local SGD comparison: both need an L(N) fit.")
  ablation = _ablation(cols, ok, h_rows, notes)
  return Analysis(cols, rows, labels, fits_n, fits_d, frontiers, extrap, comparison, ablation,
                  notes, form, level, n_boot)


def _ablation(cols, ok, h_rows, notes) -> dict | None:
  """Loss vs H at the size with the most distinct H (ties: the largest size)."""
  n_col = cols["non_embedding_params"]
  sizes = np.unique(n_col[h_rows])
  n_h = [np.unique(cols["sync_every"][h_rows & (n_col == v)]).size for v in sizes]
  if not sizes.size or max(n_h) < 2:
    notes.append("H ablation skipped: no size has local_sgd runs with two or more sync_every.")
    return None
  size = max(zip(n_h, sizes))[1]
  rows = _tuned(cols, np.flatnonzero(h_rows & (n_col == size)), ("sync_every",))
  ddp = ok & (cols["algorithm"] == "ddp") & (n_col == size)
  ddp_rows = _tuned(cols, np.flatnonzero(ddp), ("non_embedding_params",))
  return {"N": float(size), "H": cols["sync_every"][rows], "loss": cols["eval_loss"][rows],
          "ddp_loss": cols["eval_loss"][ddp_rows]}


# ----------------------------------------------------------------------------- plots


def _band(ax, fit: scaling.PowerLawFit, xs: np.ndarray, color: str, label: str) -> None:
  pred, lo, hi = fit.predict_interval(xs)
  ax.plot(xs, pred, color=color, label=label)
  ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0)


def new_figure(figsize=(6.4, 4.6)) -> "Figure":
  """A matplotlib Figure of its own (no pyplot state, nothing to close, any backend)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(figsize=figsize)


def _log_y_labels(ax) -> None:
  """Plain numbers on a log loss axis (it spans less than a decade)."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
    axis(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))


def _span(x: np.ndarray, pad: float = 1.5) -> np.ndarray:
  return np.geomspace(np.min(x) / pad, np.max(x) * pad, 200)


def plot_loss_vs_params(a: Analysis) -> Figure:
  fig = new_figure()
  ax = fig.add_subplot()
  for alg, fit in a.fits_n.items():
    col, (lo, hi) = _COLORS.get(alg), fit.intervals["alpha"]
    ax.scatter(a.points(alg, "non_embedding_params"), a.points(alg, "eval_loss"), s=18,
               color=col, alpha=0.7)
    _band(ax, fit, _span(a.points(alg, "non_embedding_params")), col,
          f"{a.labels[alg]}: alpha = {fit.alpha:.4f} [{lo:.4f}, {hi:.4f}]")
  ax.set(xscale="log", yscale="log", xlabel="non-embedding parameters N", ylabel="eval loss",
         title=f"Loss vs N ({a.level:.0%} bootstrap bands)")
  _log_y_labels(ax)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  return fig


def plot_frontier(a: Analysis) -> Figure:
  fig = new_figure()
  ax = fig.add_subplot()
  for alg, fr in a.frontiers.items():
    col = _COLORS.get(alg)
    ax.scatter(a.points(alg, "flops"), a.points(alg, "eval_loss"), s=14, color=col, alpha=0.35)
    ax.plot(fr.compute, fr.loss, "o", color=col, ms=5, mfc="none")
    if fr.fit is not None:
      _band(ax, fr.fit, _span(fr.compute), col,
            f"{a.labels[alg]} frontier: alpha_C = {fr.fit.alpha:.4f}")
  ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="eval loss",
         title="Loss vs compute: runs (dots) and frontier (rings)")
  _log_y_labels(ax)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  return fig


def plot_difference(a: Analysis) -> Figure:
  """Local SGD minus DDP per size (mean over seeds, standard error) and from the fitted laws."""
  fig = new_figure()
  ax = fig.add_subplot()
  cmp = a.comparison
  n_d, y_d = a.points("ddp", "non_embedding_params"), a.points("ddp", "eval_loss")
  n_l, y_l = a.points("local_sgd", "non_embedding_params"), a.points("local_sgd", "eval_loss")
  shared = np.intersect1d(n_d, n_l)
  diff = [np.mean(y_l[n_l == v]) - np.mean(y_d[n_d == v]) for v in shared]
  err = [np.sqrt(np.var(y_l[n_l == v], ddof=1) / (n_l == v).sum() +
                 np.var(y_d[n_d == v], ddof=1) / (n_d == v).sum())
         if min((n_l == v).sum(), (n_d == v).sum()) > 1 else 0.0 for v in shared]
  ax.errorbar(shared, diff, yerr=err, fmt="o", color="k", capsize=3, label="measured (mean, s.e.)")
  xs = _span(np.concatenate([n_d, n_l]), 3.0)
  d, lo, hi = cmp.difference(xs)
  ax.plot(xs, d, color="C3", label="fitted laws")
  ax.fill_between(xs, lo, hi, color="C3", alpha=0.2, lw=0)
  ax.axhline(0.0, color="0.4", lw=0.8)
  x_star = cmp.crossover
  if np.isfinite(x_star) and xs[0] <= x_star <= xs[-1]:
    ax.axvline(x_star, color="C3", ls="--", lw=0.8, label=f"crossover N* = {x_star:.3g}")
    lo, hi = cmp.crossover_interval
    if np.isfinite(lo) and np.isfinite(hi):
      ax.axvspan(max(lo, xs[0]), min(hi, xs[-1]), color="C3", alpha=0.07, lw=0)
  ax.set(xscale="log", xlabel="non-embedding parameters N",
         ylabel=f"loss({cmp.name_b}) - loss({cmp.name_a})", title="Local SGD minus DDP")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  return fig


def plot_ablation(a: Analysis) -> Figure:
  fig = new_figure()
  ax = fig.add_subplot()
  ab = a.ablation
  hs = np.unique(ab["H"])
  ax.scatter(ab["H"], ab["loss"], color="C1", s=18, alpha=0.6)
  ax.plot(hs, [np.mean(ab["loss"][ab["H"] == h]) for h in hs], "-o", color="C1",
          label="local_sgd (mean over seeds)")
  if ab["ddp_loss"].size:
    ax.axhline(np.mean(ab["ddp_loss"]), color="C0", ls="--", label="ddp")
  ax.set(xscale="log", xlabel="sync interval H (inner steps)", ylabel="eval loss",
         title=f"H ablation at N = {ab['N']:.3g}")
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  return fig


# ----------------------------------------------------------------------------- report


def markdown(a: Analysis, plots: list[str], source: str = "") -> str:
  """The report: exponents, their difference, the crossover, the extrapolation check, H ablation."""
  ref_x = scaling.crossover("pure", *(np.array([p["alpha"], np.log(p["X_c"])])
                                      for p in (scaling.PAPER_DDP, scaling.PAPER_LOCAL_SGD)))
  out = ["# Scaling-law fits", "",
         f"Source: `{source or 'results'}`, {a.cols['eval_loss'].size} rows. Form: "
         f"`{'L(X) = (X_c / X)^alpha' if a.form == 'pure' else 'L(X) = E + A / X^alpha'}`, "
         f"robust (soft_l1) fit of log L; intervals: {a.level:.0%} percentile bootstrap, "
         f"{a.n_boot} resamples.", "", "## Fitted laws", ""]
  out.append(scaling.fits_table(a.all_fits()))
  out += ["", "Reference, L(N) = (N_c / N)^alpha in non-embedding parameters: arXiv 2409.13198 DDP "
          "alpha 0.069, N_c 6.06e14; local SGD alpha 0.072, N_c 3.15e14 (these cross at N* = "
          f"{ref_x:.3g}); Kaplan et al. 2020 alpha_N 0.076, N_c 8.8e13.", "",
          "## Local SGD vs DDP", ""]
  c = a.comparison
  if c is None:
    out.append("Not available (needs L(N) fits of both `ddp` and `local_sgd`).")
  else:
    d_lo, d_hi = c.d_alpha_interval
    out += [f"- exponent difference alpha(local SGD) - alpha(DDP): **{c.d_alpha:+.4f}** "
            f"[{d_lo:+.4f}, {d_hi:+.4f}] ({'paired' if c.paired else 'independent'} "
            "bootstrap; paper: +0.003)",
            "- crossover N* where the laws give equal loss: "
            f"**{scaling.format_number(c.crossover)}** "
            f"{scaling.format_interval(*c.crossover_interval)}, "
            f"found in {c.crossover_fraction:.0%} of the draws "
            f"(paper's laws: {ref_x:.3g})", "",
            "| N | DDP loss | local SGD loss | difference | law difference [interval] |",
            "|---|---|---|---|---|"]
    n_d, n_l = a.points("ddp", "non_embedding_params"), a.points("local_sgd",
                                                                 "non_embedding_params")
    y_d, y_l = a.points("ddp", "eval_loss"), a.points("local_sgd", "eval_loss")
    for v in np.intersect1d(n_d, n_l):
      md, ml = np.mean(y_d[n_d == v]), np.mean(y_l[n_l == v])
      d, lo, hi = c.difference(v)
      out.append(f"| {v:.4g} | {md:.4f} | {ml:.4f} | {ml - md:+.4f} | {d[0]:+.4f} "
                 f"[{lo[0]:+.4f}, {hi[0]:+.4f}] |")
  out += ["", "## Extrapolation check", "",
          "Fit L(N) on every size but the largest, predict the largest (band: law + run scatter).",
          ""]
  if a.extrapolations:
    out += ["| algorithm | fit points | N | predicted [interval] | observed | error | inside |",
            "|---|---|---|---|---|---|---|"]
    for k, e in a.extrapolations.items():
      out.append(f"| {a.labels[k]} | {e.n_fit} | {e.x:.4g} | {e.predicted:.4f} "
                 f"[{e.lo:.4f}, {e.hi:.4f}] | {e.observed:.4f} | {e.rel_error:+.2%} | "
                 f"{'yes' if e.inside else 'no'} |")
  else:
    out.append("Not available (too few sizes).")
  out += ["", "## H ablation", ""]
  ab = a.ablation
  if ab is None:
    out.append("Skipped: no size has local SGD runs at two or more sync intervals H.")
  else:
    out += [f"At N = {ab['N']:.4g}" + (f"; DDP: {np.mean(ab['ddp_loss']):.4f}."
                                       if ab["ddp_loss"].size else "."), "",
            "| H | runs | mean loss |", "|---|---|---|"]
    for h in np.unique(ab["H"]):
      sel = ab["H"] == h
      out.append(f"| {h:g} | {sel.sum()} | {np.mean(ab['loss'][sel]):.4f} |")
  out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
  if a.notes:
    out += ["", "## Notes", ""] + [f"- {n}" for n in a.notes]
  return "\n".join(out) + "\n"


def write_report(a: Analysis, out_dir: str, source: str = "") -> list[str]:
  """Writes the PNGs and `report.md` into out_dir; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  figures = {"loss_vs_params.png": plot_loss_vs_params(a) if a.fits_n else None,
             "loss_vs_compute.png": plot_frontier(a) if a.frontiers else None,
             "local_sgd_minus_ddp.png": plot_difference(a) if a.comparison else None,
             "sync_every_ablation.png": plot_ablation(a) if a.ablation else None}
  written = []
  for name, fig in figures.items():
    if fig is not None:
      fig.tight_layout()
      fig.savefig(os.path.join(out_dir, name), dpi=120)
      written.append(name)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown(a, written, source))
  return [os.path.join(out_dir, p) for p in written + ["report.md"]]
