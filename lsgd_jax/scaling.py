"""Power-law fits for scaling studies, with bootstrap uncertainty (numpy / scipy only).

Two forms of the law of the loss L in a scale variable X (non-embedding parameters N, tokens D or
training FLOPs C):

  "pure":   L(X) = (X_c / X)^alpha      Kaplan et al. 2020; the form of arXiv 2409.13198.
  "offset": L(X) = E + A / X^alpha      an irreducible loss E (Hoffmann et al. 2022 style).

Fits minimise a robust loss (`scipy.optimize.least_squares`, soft_l1 by default) of the residuals of
log L, so every point weighs by its relative error and one diverged run does not drag the law. The
robust scale is the MAD of the residuals of a plain least-squares fit of the same form. The pure
form is linear in log space (log L = alpha log X_c - alpha log X) and has one optimum; the offset
form is fitted from several starts (E from 0 to just under min L) and keeps the best. Intervals are
percentile bootstrap intervals: the points are resampled with replacement (fixed seed) and refitted.
They describe the uncertainty of the law, not the scatter of a single new run.

Reference values (all "pure" form in N, non-embedding parameters):
  arXiv 2409.13198 (He, Zhuang, Wu 2024): DDP        alpha ~ 0.069, N_c ~ 6.06e14;
                                           local SGD  alpha ~ 0.072, N_c ~ 3.15e14;
    the two laws cross near N ~ 1e8 (local SGD slightly worse below, slightly better above).
  Kaplan et al. 2020 (arXiv 2001.08361): alpha_N = 0.076, N_c = 8.8e13.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Callable, Sequence

import numpy as np
from scipy import optimize

FORMS = ("pure", "offset")
PAPER_DDP = {"alpha": 0.069, "X_c": 6.06e14}        # arXiv 2409.13198, L(N)
PAPER_LOCAL_SGD = {"alpha": 0.072, "X_c": 3.15e14}  # arXiv 2409.13198, L(N)
KAPLAN_N = {"alpha": 0.076, "X_c": 8.8e13}          # Kaplan et al. 2020, L(N)
_N_PARAMS = {"pure": 2, "offset": 3}
_MAX_REDRAWS = 100


def _as_xy(x, y, form: str) -> tuple[np.ndarray, np.ndarray]:
  """Validated 1-D float arrays; raises ValueError naming the problem."""
  if form not in FORMS:
    raise ValueError(f"Unknown form {form!r}; allowed: {', '.join(FORMS)}.")
  x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
  if x.size != y.size:
    raise ValueError(f"x and loss have mismatched lengths ({x.size} vs {y.size}).")
  for name, v in (("x", x), ("loss", y)):
    bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
    if bad.size:
      raise ValueError(f"{name} must be finite and positive; got {v[bad[0]]} at index {bad[0]}.")
  k = _N_PARAMS[form]
  if x.size < k or np.unique(x).size < k:
    raise ValueError(f"The {form} form has {k} parameters and needs at least {k} points with "
                     f"distinct x; got {x.size} points, {np.unique(x).size} distinct.")
  return x, y


def _log_model(form: str, theta: np.ndarray, logx: np.ndarray) -> np.ndarray:
  """log L at log X; theta[..., :] is (alpha, log X_c) or (E, log A, alpha); broadcasts."""
  theta = np.asarray(theta, dtype=float)
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    if form == "pure":
      return theta[..., 0, None] * (theta[..., 1, None] - logx)
    return np.log(theta[..., 0, None] + np.exp(theta[..., 1, None] - theta[..., 2, None] * logx))


def _offset_jac(u: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  def jac(p):  # d/dp of log(E + g), g = exp(p1 - p2 u)
    g = np.exp(p[1] - p[2] * u)
    w = g / (p[0] + g)
    return np.stack([1.0 / (p[0] + g), w, -u * w], 1)
  return jac


def _fit_theta(form: str, logx: np.ndarray, logy: np.ndarray, loss: str, f_scale: float,
               starts: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
  """Best robust fit over `starts` (canonical theta); the variable is centred for conditioning."""
  m = float(np.mean(logx))
  u = logx - m
  best, best_cost = None, np.inf
  for theta0 in starts:
    if form == "pure":  # p = (alpha * (log X_c - m), alpha)
      p0 = np.array([theta0[0] * (theta0[1] - m), theta0[0]])
      res = optimize.least_squares(lambda p: p[0] - p[1] * u - logy, p0, loss=loss,
                                   jac=lambda p: np.stack([np.ones_like(u), -u], 1),
                                   f_scale=f_scale, method="lm" if loss == "linear" else "trf")
    else:  # p = (E, log A - alpha m, alpha) with E >= 0, 0 <= alpha <= 10
      p0 = np.array([theta0[0], theta0[1] - theta0[2] * m, theta0[2]])
      p0 = np.clip(p0, [0.0, -np.inf, 0.0], [np.inf, np.inf, 10.0])
      res = optimize.least_squares(
          lambda p: np.log(p[0] + np.exp(p[1] - p[2] * u)) - logy, p0, jac=_offset_jac(u),
          loss=loss, f_scale=f_scale, bounds=([0.0, -np.inf, 0.0], [np.inf, np.inf, 10.0]))
    if res.cost < best_cost:
      best, best_cost = res.x, res.cost
  if form == "pure":
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.array([best[1], m + best[0] / best[1]]), best_cost
  return np.array([best[0], best[1] + best[2] * m, best[2]]), best_cost


def _starts(form: str, logx: np.ndarray, y: np.ndarray, restarts: int) -> list[np.ndarray]:
  """Initial guesses: a log-log line fit (pure); the same on L - E for E in [0, min L) (offset)."""
  if form == "pure":
    slope, icpt = np.polyfit(logx, np.log(y), 1)
    alpha = -slope if abs(slope) > 1e-12 else 1e-6
    return [np.array([alpha, icpt / alpha])]
  out = []
  for frac in np.linspace(0.0, 0.95, max(restarts, 1)):
    e0 = frac * y.min()
    slope, icpt = np.polyfit(logx, np.log(y - e0), 1)
    out.append(np.array([e0, icpt, float(np.clip(-slope, 1e-3, 5.0))]))
  return out


@dataclasses.dataclass(eq=False)
class PowerLawFit:
  """A fitted law and the bootstrap refits behind its intervals."""

  form: str                 # "pure" or "offset"
  theta: np.ndarray         # canonical: pure (alpha, log X_c); offset (E, log A, alpha)
  boot: np.ndarray          # (n_boot, len(theta)) canonical refits (NaN rows: failed draws)
  level: float              # interval level, e.g. 0.95
  n_points: int
  rmse_log: float           # root-mean-square residual of log L
  x_range: tuple[float, float]
  f_scale: float            # robust-loss scale (log units)
  x_name: str = "X"

  @property
  def params(self) -> dict[str, float]:
    return _natural(self.form, self.theta)

  @property
  def intervals(self) -> dict[str, tuple[float, float]]:
    lo, hi = _percentiles(self.boot, self.level)
    return {k: (_natural(self.form, lo)[k], _natural(self.form, hi)[k]) for k in self.params}

  @property
  def alpha(self) -> float:
    return self.params["alpha"]

  def predict(self, x) -> np.ndarray:
    return np.exp(_log_model(self.form, self.theta, np.log(np.asarray(x, dtype=float))))

  def predict_interval(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, lower, upper) at x; the band is the bootstrap spread of the law itself."""
    x = np.atleast_1d(np.asarray(x, dtype=float))
    lo, hi = _percentiles(_log_model(self.form, self.boot, np.log(x)), self.level)
    return self.predict(x), np.exp(lo), np.exp(hi)

  def formula(self) -> str:
    x = self.x_name
    return f"L({x}) = ({x}_c / {x})^alpha" if self.form == "pure" else f"L({x}) = E + A / {x}^alpha"

  def __str__(self) -> str:
    iv = self.intervals
    terms = ", ".join(f"{_label(k, self.x_name)} = {format_number(v)} {format_interval(*iv[k])}"
                      for k, v in self.params.items())
    return (f"{self.formula()}: {terms} ({self.level:.0%} bootstrap, {self.n_points} points, "
            f"rms log residual {self.rmse_log:.2g})")


def _natural(form: str, theta: np.ndarray) -> dict[str, float]:
  with np.errstate(over="ignore"):
    if form == "pure":
      return {"alpha": float(theta[0]), "X_c": float(np.exp(theta[1]))}
    return {"E": float(theta[0]), "A": float(np.exp(theta[1])), "alpha": float(theta[2])}


def _percentiles(v: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
  q = 50.0 * (1.0 - level)
  with np.errstate(invalid="ignore"):
    lo, hi = np.nanpercentile(v, [q, 100.0 - q], axis=0)
  return lo, hi


def _label(key: str, x_name: str) -> str:
  return f"{x_name}_c" if key == "X_c" else key


def format_number(v: float) -> str:
  return f"{v:.4g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.3e}"


def format_interval(lo: float, hi: float) -> str:
  return f"[{format_number(lo)}, {format_number(hi)}]"


def _bootstrap(draw: Callable[[np.random.Generator], np.ndarray | None], n_boot: int, seed: int,
               width: int) -> np.ndarray:
  """n_boot rows of `draw(rng)` (None = an unusable resample, redrawn up to _MAX_REDRAWS times)."""
  rng = np.random.default_rng(seed)
  out = np.full((n_boot, width), np.nan)
  for b in range(n_boot):
    for _ in range(_MAX_REDRAWS):
      row = draw(rng)
      if row is not None:
        out[b] = row
        break
  return out


def fit_power_law(x, loss, form: str = "pure", *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0, robust_loss: str = "soft_l1", f_scale: float | None = None,
                  restarts: int = 8, x_name: str = "X") -> PowerLawFit:
  """Fits `form` ("pure" or "offset") to points (x, loss) in log space.

  robust_loss: a `least_squares` loss ("soft_l1", "huber", "cauchy", "linear" = plain least
  squares); f_scale: its scale in log units (default: from the data); restarts: starts of the
  offset form; n_boot resamples with `seed` give the `level` intervals."""
  x, y = _as_xy(x, loss, form)
  if not 0.0 < level < 1.0 or n_boot < 1:
    raise ValueError(f"Need 0 < level < 1 and n_boot >= 1; got level={level}, n_boot={n_boot}.")
  logx, logy = np.log(x), np.log(y)
  starts = _starts(form, logx, y, restarts)
  theta_ls, _ = _fit_theta(form, logx, logy, "linear", 1.0, starts)
  if f_scale is None:  # robust scale: MAD of plain least-squares residuals, floored
    r = _log_model(form, theta_ls, logx) - logy
    f_scale = max(1.4826 * float(np.median(np.abs(r - np.median(r)))), 1e-4)
  theta, _ = _fit_theta(form, logx, logy, robust_loss, f_scale, [theta_ls] + starts)
  k = _N_PARAMS[form]

  def draw(rng):
    idx = rng.integers(0, x.size, x.size)
    if np.unique(x[idx]).size < k:
      return None
    return _fit_theta(form, logx[idx], logy[idx], robust_loss, f_scale, [theta])[0]

  boot = _bootstrap(draw, n_boot, seed, theta.size)
  rmse = float(np.sqrt(np.mean((_log_model(form, theta, logx) - logy) ** 2)))
  return PowerLawFit(form=form, theta=theta, boot=boot, level=level, n_points=x.size,
                     rmse_log=rmse, x_range=(float(x.min()), float(x.max())),
                     f_scale=float(f_scale), x_name=x_name)


# ----------------------------------------------------------------------------- frontier


@dataclasses.dataclass(eq=False)
class Frontier:
  """Lower envelope of loss vs compute: the points no cheaper run beats; and its law L(C)."""

  compute: np.ndarray
  loss: np.ndarray
  index: np.ndarray         # positions of the frontier points in the input
  fit: PowerLawFit | None   # None when the envelope has too few points for the form

  def __str__(self) -> str:
    law = str(self.fit) if self.fit else "too few points for a fit"
    return f"frontier of {self.compute.size} points; {law}"


def compute_frontier(compute, loss, *, form: str = "pure", n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0) -> Frontier:
  """Points (from any runs, final or intermediate evaluations) with lower loss than every
  point of no larger compute; then a power-law fit L(C) of those points."""
  c, y = _as_xy(compute, loss, "pure")
  order = np.lexsort((y, c))
  keep, best = [], np.inf
  for i in order:
    if y[i] < best:
      keep.append(i)
      best = y[i]
  idx = np.array(keep, dtype=int)
  fit = None
  if np.unique(c[idx]).size >= _N_PARAMS[form]:
    fit = fit_power_law(c[idx], y[idx], form, n_boot=n_boot, level=level, seed=seed, x_name="C")
  return Frontier(compute=c[idx], loss=y[idx], index=idx, fit=fit)


# ----------------------------------------------------------------------------- extrapolation


@dataclasses.dataclass(frozen=True)
class Extrapolation:
  """A law fitted below `x` predicting the (mean) observed loss at `x`."""

  x: float
  observed: float
  predicted: float
  lo: float
  hi: float
  n_fit: int     # points the law was fitted on
  level: float

  @property
  def rel_error(self) -> float:
    return (self.predicted - self.observed) / self.observed

  @property
  def inside(self) -> bool:
    return bool(self.lo <= self.observed <= self.hi)

  def __str__(self) -> str:
    return (f"at X = {format_number(self.x)}: predicted {self.predicted:.4f} "
            f"[{self.lo:.4f}, {self.hi:.4f}]"
            f", observed {self.observed:.4f}, error {self.rel_error:+.2%} "
            f"({'inside' if self.inside else 'outside'} the {self.level:.0%} band)")


def extrapolation_check(x, loss, form: str = "pure", **fit_kwargs) -> Extrapolation:
  """Fits on every point below the largest x and predicts the mean loss at the largest x.

  The band adds, in log space, the law's bootstrap band and the scatter of a mean of the held-out
  points (fit's rms log residual / sqrt(their number)), so that it is an interval for what is
  observed, not only for the law."""
  x, y = _as_xy(x, loss, form)
  top = x.max()
  below = x < top
  fit = fit_power_law(x[below], y[below], form, **fit_kwargs)
  pred, lo, hi = (float(np.log(v[0])) for v in fit.predict_interval(top))
  z = statistics.NormalDist().inv_cdf(0.5 + fit.level / 2)
  noise = z * fit.rmse_log / math.sqrt((~below).sum())
  lo, hi = pred - math.hypot(pred - lo, noise), pred + math.hypot(hi - pred, noise)
  return Extrapolation(x=float(top), observed=float(np.mean(y[~below])), predicted=math.exp(pred),
                       lo=math.exp(lo), hi=math.exp(hi), n_fit=int(below.sum()), level=fit.level)


# ----------------------------------------------------------------------------- comparison


def crossover(form: str, theta_a: np.ndarray, theta_b: np.ndarray,
              bracket: tuple[float, float] = (1.0, 1e30)) -> float:
  """X where the two laws give equal loss (NaN if none in `bracket`).

  Pure form in closed form: alpha_a (log X_a - log X) = alpha_b (log X_b - log X), so
  X* = (X_a^alpha_a / X_b^alpha_b)^(1 / (alpha_a - alpha_b)). Offset form: the root of
  log L_a - log L_b on a log grid (the one nearest 1e8 if several)."""
  lo, hi = math.log(bracket[0]), math.log(bracket[1])
  if form == "pure":
    da = theta_a[0] - theta_b[0]
    if not np.isfinite(da) or da == 0:
      return math.nan
    logx = (theta_a[0] * theta_a[1] - theta_b[0] * theta_b[1]) / da
    return math.exp(logx) if lo <= logx <= hi else math.nan
  grid = np.linspace(lo, hi, 600)
  diff = _log_model(form, theta_a, grid) - _log_model(form, theta_b, grid)
  sign_change = np.flatnonzero(np.sign(diff[:-1]) * np.sign(diff[1:]) < 0)
  if not sign_change.size:
    return math.nan
  gap = lambda t: float(np.subtract(*(_log_model(form, th, np.array([t]))[0]
                                      for th in (theta_a, theta_b))))
  roots = [optimize.brentq(gap, grid[i], grid[i + 1]) for i in sign_change]
  return math.exp(min(roots, key=lambda r: abs(r - math.log(1e8))))


@dataclasses.dataclass(eq=False)
class Comparison:
  """Law b against law a (e.g. local SGD against DDP): exponent difference and crossover X*."""

  name_a: str
  name_b: str
  fit_a: PowerLawFit
  fit_b: PowerLawFit
  paired: bool              # sizes resampled jointly for both laws
  boot_a: np.ndarray        # (n_boot, p) draws; row i of a goes with row i of b
  boot_b: np.ndarray
  level: float
  d_alpha: float = math.nan                     # alpha_b - alpha_a
  d_alpha_interval: tuple[float, float] = (math.nan, math.nan)
  crossover: float = math.nan                   # NaN: the laws do not cross in (1, 1e30)
  crossover_interval: tuple[float, float] = (math.nan, math.nan)  # over draws that cross
  crossover_fraction: float = math.nan          # share of the draws that cross

  def __post_init__(self):
    form = self.fit_a.form
    j = 2 if form == "offset" else 0  # column of alpha in the canonical parameters
    self.d_alpha = self.fit_b.alpha - self.fit_a.alpha
    self.d_alpha_interval = tuple(map(float, _percentiles(self.boot_b[:, j] - self.boot_a[:, j],
                                                          self.level)))
    self.crossover = crossover(form, self.fit_a.theta, self.fit_b.theta)
    xs = np.array([crossover(form, a, b) for a, b in zip(self.boot_a, self.boot_b)])
    self.crossover_fraction = float(np.mean(np.isfinite(xs)))
    if np.isfinite(xs).any():
      self.crossover_interval = tuple(float(np.exp(v)) for v in _percentiles(np.log(xs),
                                                                             self.level))

  def difference(self, x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L_b(x) - L_a(x) and its band from the joint draws."""
    logx = np.log(np.atleast_1d(np.asarray(x, dtype=float)))
    form = self.fit_a.form
    lo, hi = _percentiles(np.exp(_log_model(form, self.boot_b, logx)) -
                          np.exp(_log_model(form, self.boot_a, logx)), self.level)
    return self.fit_b.predict(np.exp(logx)) - self.fit_a.predict(np.exp(logx)), lo, hi

  def __str__(self) -> str:
    lo, hi = self.d_alpha_interval
    return (f"alpha({self.name_b}) - alpha({self.name_a}) = {self.d_alpha:+.4f} [{lo:+.4f}, "
            f"{hi:+.4f}]; crossover {self.fit_a.x_name}* = {format_number(self.crossover)} "
            f"{format_interval(*self.crossover_interval)} (found in "
            f"{self.crossover_fraction:.0%} of draws; {self.level:.0%} "
            f"{'paired' if self.paired else 'independent'} bootstrap)")


def compare_fits(x_a, loss_a, x_b, loss_b, form: str = "pure", *, names=("a", "b"),
                 paired: bool | None = None, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0, x_name: str = "X", **fit_kwargs) -> Comparison:
  """Fits both laws and bootstraps their difference.

  Paired (default when both sets have the same distinct x): each draw resamples the distinct x
  values and refits both laws on all their points at the drawn x, so shared size-to-size effects
  cancel. Independent: each law's own point bootstrap, drawn separately."""
  xa, ya = _as_xy(x_a, loss_a, form)
  xb, yb = _as_xy(x_b, loss_b, form)
  kw = dict(n_boot=n_boot, level=level, x_name=x_name, **fit_kwargs)
  fit_a = fit_power_law(xa, ya, form, seed=seed, **kw)
  fit_b = fit_power_law(xb, yb, form, seed=seed + 1, **kw)
  shared = np.unique(xa)
  same = np.array_equal(shared, np.unique(xb))
  if paired and not same:
    raise ValueError("A paired comparison needs the same distinct x values in both sets.")
  paired = same if paired is None else paired
  if not paired:
    return Comparison(names[0], names[1], fit_a, fit_b, False, fit_a.boot, fit_b.boot, level)
  k, loss = _N_PARAMS[form], fit_kwargs.get("robust_loss", "soft_l1")
  la, lya, lb, lyb = np.log(xa), np.log(ya), np.log(xb), np.log(yb)

  def draw(rng):
    pick = shared[rng.integers(0, shared.size, shared.size)]
    if np.unique(pick).size < k:
      return None
    ia = np.concatenate([np.flatnonzero(xa == v) for v in pick])
    ib = np.concatenate([np.flatnonzero(xb == v) for v in pick])
    ta = _fit_theta(form, la[ia], lya[ia], loss, fit_a.f_scale, [fit_a.theta])[0]
    tb = _fit_theta(form, lb[ib], lyb[ib], loss, fit_b.f_scale, [fit_b.theta])[0]
    return np.concatenate([ta, tb])

  joint = _bootstrap(draw, n_boot, seed + 2, 2 * fit_a.theta.size)
  p = fit_a.theta.size
  return Comparison(names[0], names[1], fit_a, fit_b, True, joint[:, :p], joint[:, p:], level)


def fits_table(fits: dict[str, PowerLawFit]) -> str:
  """A Markdown table of several fits: one row per (name, parameter)."""
  lines = ["| fit | law | parameter | value | interval | points |", "|---|---|---|---|---|---|"]
  for name, f in fits.items():
    iv = f.intervals
    for k, v in f.params.items():
      lines.append(f"| {name} | {f.formula()} | {_label(k, f.x_name)} | {format_number(v)} | "
                   f"{format_interval(*iv[k])} | {f.n_points} |")
  return "\n".join(lines)
