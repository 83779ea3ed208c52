"""Input checks shared by the `stats` estimators.

Policy (applies to every public function in `stats`):

* Shape checks always run: shapes are static, even inside `jax.jit`/`jax.vmap`.
* Value checks (NaN/inf, n < 2 rows, alpha outside (0, 1), a zero standard error, a budget
  too small for one strong label) run only when the inputs are concrete arrays. Inside
  `jit`/`vmap` the inputs are tracers and these checks are skipped; degenerate inputs then
  give NaN outputs, never a silently finite wrong value: NaN/inf inputs propagate, and a
  zero standard error (constant labels and predictions) turns the interval and p-value NaN.
* A zero-variance prediction (`Var(Yhat) = 0`) is not an error for power tuning: every
  lambda gives the same estimate then, and lambda is set to 0 (the classical estimator)
  rather than 0/0.
"""
import jax
import jax.numpy as jnp

ALTERNATIVES = ('two-sided', 'larger', 'smaller')


def is_concrete(*xs):
  """True when no argument is a JAX tracer (i.e. we are not inside jit/vmap/grad)."""
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


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
  """Raises if a concrete array holds NaN or inf."""
  for name, x in arrays.items():
    if x is not None and is_concrete(x) and not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError(f'{name} contains NaN or inf.')


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
  """Sample weights normalised to sum to `n` (ppi_py's convention); ones when `w` is None."""
  if w is None:
    return jnp.ones((n,), jnp.result_type(float))
  w = as_float(w, name, ndim=(1,))
  if w.shape[0] != n:
    raise ValueError(f'{name} must have {n} entries, got {w.shape[0]}.')
  check_finite(**{name: w})
  if is_concrete(w) and bool(jnp.any(w < 0) | (jnp.sum(w) <= 0)):
    raise ValueError(f'{name} must be non-negative with a positive sum.')
  return w / jnp.sum(w) * n


def check_alpha(alpha, name='alpha'):
  if is_concrete(alpha) and not 0 < float(alpha) < 1:
    raise ValueError(f'{name} must lie in (0, 1), got {alpha}.')


def check_alternative(alternative):
  if alternative not in ALTERNATIVES:
    raise ValueError(f'alternative must be one of {ALTERNATIVES}, got {alternative!r}.')


def positive_se(se, what='the standard error'):
  """Raises on a concrete zero standard error; under jit maps it to NaN."""
  if is_concrete(se) and bool(jnp.any(se <= 0)):
    raise ValueError(f'{what} is zero: the labels and predictions are constant (zero '
                     'variance), so no confidence interval can be formed.')
  return jnp.where(se > 0, se, jnp.nan)
