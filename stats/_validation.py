"""Input checks shared by the `stats` estimators.

Policy (applies to every public function in `stats`):

* Shape checks always run: shapes are static, even inside `jax.jit`/`jax.vmap`.
* Value checks (NaN/inf inputs, alpha or q outside (0, 1), a non-finite `lam`, negative
  weights, a rank-deficient regression design, labels outside a GLM's domain, a zero
  standard error, ...) go through `require`, which returns a flag:
  - on concrete values (Python numbers, NumPy or JAX arrays outside jit) a failed check
    raises a ValueError naming the argument, before any estimate is computed;
  - on traced values (inside `jit`/`vmap`/`grad`) nothing can raise, so the check returns a
    traced boolean flag and the estimator passes its outputs through `nan_unless`: every
    output (interval endpoints, estimates, p-values) is NaN where a check failed. Under
    `vmap` the flag is per batch element. A bad input therefore never gives a finite
    interval.
* A zero-variance prediction (`Var(Yhat) = 0`) is not an error for power tuning: every
  lambda gives the same estimate then, and lambda is set to 0 (the classical estimator)
  rather than 0/0.
"""
import jax
import jax.numpy as jnp
import numpy as np

ALTERNATIVES = ('two-sided', 'larger', 'smaller')


def is_concrete(*xs):
  """True when no argument is a JAX tracer (i.e. we are not inside jit/vmap/grad)."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _np(x):
  """NumPy for host values (Python numbers, NumPy arrays), so that checks on them stay
  concrete (and can raise) even inside jit; jnp for JAX arrays and tracers."""
  return jnp if isinstance(x, jax.Array) else np


def require(ok, message):
  """One value check: `ok` (a bool or boolean array) must be all true.

  Concrete `ok`: raises ValueError(message) if not, else returns True. Traced `ok`: returns
  the flag `jnp.all(ok)` for `nan_unless`. Flags combine with `&`. `message` may be a
  function returning the message, called only on failure.
  """
  if is_concrete(ok):
    if not bool(np.all(np.asarray(ok))):
      raise ValueError(message() if callable(message) else message)
    return True
  return jnp.all(ok)


def nan_unless(ok, outputs):
  """`outputs` (an array or a pytree of arrays) with every entry NaN where flag `ok` is False."""
  if ok is True:
    return outputs
  return jax.tree_util.tree_map(lambda x: jnp.where(ok, x, jnp.nan), outputs)


def as_float(x, name, ndim=(1, 2)):
  """Converts `x` to the default float dtype (float64 when x64 is enabled)."""
  if x is None:
    raise ValueError(f'{name} is required.')
  try:
    x = jnp.asarray(x, dtype=jnp.result_type(float))
  except (TypeError, ValueError) as e:
    raise ValueError(f'{name} must be a numeric array, got {type(x).__name__}.') from e
  if x.ndim not in ndim:
    raise ValueError(f'{name} must have {" or ".join(map(str, ndim))} dimensions, '
                     f'got shape {x.shape}.')
  return x


def check_finite(**arrays):
  """Flag: no array holds NaN or inf (None entries are skipped)."""
  ok = True
  for name, x in arrays.items():
    if x is not None:
      ok &= require(jnp.all(jnp.isfinite(x)), f'{name} contains NaN or inf.')
  return ok


def check_rows(min_rows=2, **arrays):
  """Every array has at least `min_rows` rows (a static check)."""
  for name, x in arrays.items():
    if x.shape[0] < min_rows:
      raise ValueError(f'{name} needs at least {min_rows} rows, got {x.shape[0]}.')


def check_same_shape(name_a, a, name_b, b, axis=None):
  """`a` and `b` share their shape (or only dimension `axis`)."""
  sa, sb = (a.shape, b.shape) if axis is None else (a.shape[axis], b.shape[axis])
  if sa != sb:
    what = 'shape' if axis is None else f'size along axis {axis}'
    raise ValueError(f'{name_a} and {name_b} must have the same {what}: {sa} vs {sb}.')


def weights(w, n, name):
  """Sample weights normalised to sum to `n` (ppi_py's convention), and their flag.

  Ones when `w` is None; otherwise they must be finite, non-negative, with a positive sum.
  """
  if w is None:
    return jnp.ones((n,), jnp.result_type(float)), True
  w = as_float(w, name, ndim=(1,))
  if w.shape[0] != n:
    raise ValueError(f'{name} must have {n} entries, got {w.shape[0]}.')
  ok = check_finite(**{name: w})
  ok &= require(jnp.all(w >= 0) & (jnp.sum(w) > 0),
                f'{name} must be non-negative with a positive sum.')
  return w / jnp.sum(w) * n, ok


def check_alpha(alpha, name='alpha'):
  """Flag: `alpha` (a level, or a quantile q) lies in the open interval (0, 1)."""
  return require((0 < alpha) & (alpha < 1), f'{name} must lie in (0, 1), got {alpha}.')


def check_lam(lam):
  """Flag: the power-tuning parameter is finite (None, i.e. "tune it", always passes)."""
  if lam is None:
    return True
  return require(_np(lam).all(_np(lam).isfinite(lam)), f'lam must be finite, got {lam}.')


def check_full_rank(x, w, name):
  """Flag: the design `x` (rows weighted by `w`) has full column rank, so `x^T W x` is
  invertible. The rank tolerance is NumPy's `matrix_rank` default: singular values below
  `s_max * max(n, d) * eps` count as zero."""
  n, d = x.shape
  if n < d:
    raise ValueError(f'{name} has {n} rows for {d} columns: the coefficients are not '
                     'identified.')
  s = jnp.linalg.svd(x * jnp.sqrt(w)[:, None], compute_uv=False)
  tol = s.max() * max(n, d) * jnp.finfo(x.dtype).eps
  return require(s.min() > tol, f'{name} has collinear columns (rank below {d}): X^T X is '
                 'singular, so the regression coefficients are not identified.')


def check_alternative(alternative):
  if alternative not in ALTERNATIVES:
    raise ValueError(f'alternative must be one of {ALTERNATIVES}, got {alternative!r}.')


def positive_se(se, what='the standard error'):
  """Raises on a concrete zero standard error; under jit maps it to NaN (per coordinate)."""
  require(~jnp.any(se <= 0), f'{what} is zero: the labels and predictions are constant (zero '
          'variance), so no confidence interval can be formed.')
  return jnp.where(se > 0, se, jnp.nan)
