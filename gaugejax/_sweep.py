"""Invariance sweeps: vmapped over sampled group elements, chunked, sharded.

`check_invariance` measures $\\max_x |f(g\\cdot\\theta, x) - f(\\theta, x)| / \\max_x |f(\\theta, x)|$
for many sampled $g$ in one compiled program: keys are split up front, each chunk of keys
is turned into group elements *inside* the program (so memory is bounded by the chunk,
not by `num_samples`), and `jax.lax.map(..., batch_size=chunk)` vmaps within a chunk.
With several devices the keys are sharded across `jax.devices()` with `jax.shard_map`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import PRNGKeyArray, PyTree

from ._gauge import Gauge, params_float_dtype


#: default tolerances on the relative error, per dtype (continuous symmetries
#: near the identity at 1e-5 in float32 and 1e-10 in float64; the half-precision ones are
#: 13 and 20 of their machine epsilons: a dense GL transform of a bfloat16 MLP errs by 4)
DEFAULT_RTOL = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 1e-1, "float16": 2e-2}

#: a negative control (a group the model does not admit) "breaks as predicted" when its
#: median relative output change is at least this large: O(1), far above any tolerance
CONTROL_MIN_ERROR = 1e-2

#: bytes of transformed parameters a chunk may hold on a CPU; past it the chunk shrinks (a
#: vmap over many copies of large weights is slower than a sequential map on CPU caches)
CHUNK_BYTES = 8 * 2**20

#: the same on an accelerator, where wide chunks pay (a 3 x 1024 MLP on an H200: 19 us per
#: element at chunk 64, 71 us at chunk 1), capped at 1/16 of the device's memory
ACCELERATOR_CHUNK_BYTES = 2**30


class InvarianceError(AssertionError):
    """Raised by [`gaugejax.check_invariance`][] with `raise_on_failure=True`."""


@dataclasses.dataclass(frozen=True)
class InvarianceReport:
    """The result of an invariance sweep.

    **Fields:**

    - `dtype`: the parameters' dtype.
    - `num_samples`: how many group elements were sampled.
    - `max_rel_error`, `median_rel_error`: of the per-element relative output error
      $\\max|f(g\\theta) - f(\\theta)| / \\max|f(\\theta)|$, taken per output leaf
      (each relative to its own scale) and maximised over the leaves. A leaf that is
      zero up to rounding (a constraint residual such as `sum(softmax(y)) - 1`) has no
      scale to be relative to, and its rounding reads as an O(1) error: leave such leaves
      out of `fn`.
    - `eps`: the dtype's machine epsilon; `max_eps` / `median_eps` are the errors in units
      of it.
    - `rtol`: the tolerance `passed` was judged against.
    - `passed`: `max_rel_error <= rtol` (and finite).
    - `errors`: the per-element errors (a NumPy array), in sample order.
    - `per_site`: `{site: InvarianceReport}` for sweeps of each site alone, when asked.
    - `devices`: how many devices the sweep was sharded across.
    """

    dtype: str
    num_samples: int
    max_rel_error: float
    median_rel_error: float
    eps: float
    rtol: float
    passed: bool
    errors: np.ndarray = dataclasses.field(repr=False)
    per_site: dict[str, InvarianceReport] | None = None
    devices: int = 1

    @property
    def max_eps(self) -> float:
        """`max_rel_error` in units of the dtype's machine epsilon."""
        return self.max_rel_error / self.eps

    @property
    def median_eps(self) -> float:
        """`median_rel_error` in units of the dtype's machine epsilon."""
        return self.median_rel_error / self.eps

    def __str__(self) -> str:
        status = "ok" if self.passed else "FAILED"
        head = (
            f"{status}: {self.num_samples} samples ({self.dtype}), max rel. error "
            f"{self.max_rel_error:.2e} ({self.max_eps:.1f} eps), median "
            f"{self.median_rel_error:.2e}, tolerance {self.rtol:.0e}"
        )
        if self.per_site:
            head += "".join(f"\n  {k}: {v}" for k, v in self.per_site.items())
        return head


def _max_abs(x: jax.Array) -> jax.Array:
    # max via argmax: on XLA:CPU a plain max-reduction of a model's output gets fused with
    # the whole forward pass into one slow kernel (8-10x slower); argmax is not, and it
    # still propagates NaN (argmax returns the first NaN).
    d = jnp.abs(x).ravel()
    return d[jnp.argmax(d)]


def _rel_error(y: PyTree, y0: PyTree) -> jax.Array:
    """The largest over output leaves of max|y - y0| / max|y0|, each leaf relative to its
    own scale: with one normaliser for all leaves, a large leaf (a loss of 1e6 next to
    logits of 1) would hide a broken symmetry in the others."""
    errs = []
    for a, b in zip(jtu.tree_leaves(y), jtu.tree_leaves(y0)):
        den = _max_abs(b)
        errs.append(_max_abs(a - b) / jnp.maximum(den, jnp.finfo(den.dtype).tiny))
    return errs[0] if len(errs) == 1 else jnp.max(jnp.stack(errs))


def _chunk_budget(device: jax.Device | None = None) -> int:
    """The default byte budget of a chunk on `device` (default `jax.devices()[0]`):
    `CHUNK_BYTES` (8 MiB) on a CPU; on an accelerator `ACCELERATOR_CHUNK_BYTES` (1 GiB) or
    1/16 of its memory, whichever is smaller."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return CHUNK_BYTES
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # not every backend reports its memory
        limit = None
    return int(min(ACCELERATOR_CHUNK_BYTES, limit // 16)) if limit else ACCELERATOR_CHUNK_BYTES


def choose_chunk_size(params: PyTree, num_samples: int, budget: int | None = None, *,
                      device: jax.Device | None = None) -> int:
    """How many group elements one vmapped chunk handles: as many as fit `budget` bytes of
    transformed parameters, at least 1 and at most `num_samples` (and 256). The default
    budget depends on the device the sweep runs on (default `jax.devices()[0]`): 8 MiB on a
    CPU, where a sequential map over large weights beats a wide vmap; on an accelerator
    1 GiB or 1/16 of its memory, whichever is smaller."""
    budget = _chunk_budget(device) if budget is None else budget
    nbytes = sum(x.size * x.dtype.itemsize for x in jtu.tree_leaves(params) if eqx.is_array(x))
    return int(max(1, min(num_samples, 256, budget // max(nbytes, 1))))


def _finite(tree: PyTree) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jtu.tree_leaves(tree) if eqx.is_inexact_array(x)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


@eqx.filter_jit
def _sweep_block(fn, gauge, params, args, key, block, per_block, total, scale, sites, chunk, dtype, mesh):
    """One compiled program per sweep: the reference output, the finiteness flags of the
    inputs, and the errors of block `block` (a traced index, so every block shares the
    program) of the `total` keys split from `key`."""
    y0 = fn(params, *args)
    outputs = jtu.tree_flatten_with_path(y0)[0]
    if not outputs:
        raise ValueError(f"fn returned no arrays ({y0!r}): there is nothing to compare.")
    for path, y in outputs:
        if not eqx.is_inexact_array(y):
            what = (f"a Python {type(y).__name__}, not an array" if not hasattr(y, "dtype")
                    else f"of dtype {y.dtype}")
            raise TypeError(
                f"fn's output{jtu.keystr(path)} is {what}; an invariance check compares "
                "floating-point JAX arrays computed from the parameters (return those)."
            )
        if y.size == 0:
            raise ValueError(f"fn's output{jtu.keystr(path)} has shape {y.shape}, with no entries to compare.")
    flags = (
        [jnp.all(jnp.isfinite(x)) if eqx.is_inexact_array(x) else None for x in jtu.tree_leaves(params)],
        [_finite(a) for a in args],
        _finite(y0),
    )
    keys = jax.lax.dynamic_slice_in_dim(jax.random.split(key, total), block * per_block, per_block)
    # chunk 1: a plain sequential map (a vmap over a batch of one turns matmuls into slow
    # batched matmuls on CPU)
    batch = None if chunk == 1 else chunk

    def errors(p, a, y, ks):
        def one(k):
            g = gauge.sample(k, scale=scale, dtype=dtype, sites=sites)
            return _rel_error(fn(gauge.act(g, p, check=False), *a), y)

        return jax.lax.map(one, ks, batch_size=batch)

    if mesh is None:
        return errors(params, args, y0, keys), flags
    dynamic, static = eqx.partition((params, args, y0), eqx.is_array)

    def local(dyn, ks):
        return errors(*eqx.combine(dyn, static), ks)

    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("devices")), out_specs=P("devices"))
    return sharded(dynamic, keys), flags


def _raise_if_not_finite(paths, leaf_ok, args_ok, y_ok) -> None:
    for path, ok in zip(paths, leaf_ok):
        if ok is not None and not bool(ok):
            raise ValueError(f"leaf {path!r} contains NaN or inf.")
    for i, ok in enumerate(args_ok):
        if not bool(ok):
            raise ValueError(f"input argument {i} contains NaN or inf.")
    if not bool(y_ok):
        raise ValueError("fn(params, *args) is not finite; an invariance check needs finite outputs.")


def _params_dtype(params: PyTree) -> Any:
    if not any(eqx.is_inexact_array(x) for x in jtu.tree_leaves(params)):
        raise ValueError("the parameters have no floating-point leaves: there is nothing to transform.")
    return params_float_dtype(params)  # mixed dtypes: an error naming a leaf of each


def check_invariance(
    fn: Callable[..., Any],
    gauge: Gauge,
    params: PyTree,
    *args: Any,
    key: PRNGKeyArray,
    num_samples: int = 1024,
    scale: float | None = 0.5,
    sites: Sequence[str] | None = None,
    per_site: bool = False,
    rtol: float | None = None,
    raise_on_failure: bool = False,
    chunk_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
    blocks: int | None = None,
    precision: str | None = "highest",
) -> InvarianceReport:
    """Check that `fn(act(g, params), *args) == fn(params, *args)` for many sampled `g`.

    **Arguments:**

    - `fn`: the model, `fn(params, *args) -> outputs` (any pytree of arrays).
    - `gauge`: a [`gaugejax.Gauge`][] for `params`.
    - `params`, `*args`: the parameters and the model's other inputs.
    - `key`: a JAX PRNG key (keyword-only).
    - `num_samples`: how many group elements to sample (10^5 is fine: memory is bounded by
      the chunk).
    - `scale`: passed to [`gaugejax.Gauge.sample`][]: `None` or a number > 0 (0 would
      sample only the identity, and pass whatever the model does: refused, as are an empty
      `sites` and a gauge without sites).
    - `sites`: sample only these sites (others at the identity); a name or a non-empty
      sequence of names.
    - `per_site`: also sweep every site (every site of `sites`, when given) alone and
      report each.
    - `rtol`: the tolerance on the max relative error; default per dtype
      (`1e-5` float32, `1e-10` float64, `2e-2` float16, `1e-1` bfloat16). The
      half-precision ones are set by rounding (a dense $GL$ transform of a bfloat16 MLP
      errs by 3e-2), so a broken symmetry sampled near the identity (`scale=0.1`) can pass
      them: verify symmetries in float32 or float64.
    - `raise_on_failure`: raise [`gaugejax.InvarianceError`][] instead of returning a
      failing report.
    - `chunk_size`: group elements per vmapped chunk (default: adaptive, see
      [`gaugejax.choose_chunk_size`][]).
    - `devices`: devices to shard across; default all of `jax.devices()` when there are
      several.
    - `progress`: show a progress bar (the sweep then runs in `blocks` pieces of one
      compiled program).
    - `blocks`: how many pieces to run the sweep in (default 8 with `progress`, else 1).
      Every block is the same program with a different block index, so this costs no
      extra compilation; results do not depend on it.
    - `precision`: the default matmul precision the sweep is traced under
      (`jax.default_matmul_precision`). The default, `"highest"`, computes float32 products
      exactly on accelerators too: by default GPUs round float32 matmul operands to TF32
      and TPUs to bfloat16 passes, a relative error of about $10^{-3}$ that would hide a
      broken symmetry or fail a true one. `None` keeps the process's setting (check the
      model as it runs in production). No effect on CPUs.

    **Returns:** an [`gaugejax.InvarianceReport`][].
    """
    for name, value in (("num_samples", num_samples), ("chunk_size", chunk_size), ("blocks", blocks)):
        if value is None and name != "num_samples":
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    # Python ints: NumPy integers would reach the compiled sweep as (traced) arrays
    num_samples = int(num_samples)
    chunk_size = None if chunk_size is None else int(chunk_size)
    blocks = None if blocks is None else int(blocks)
    if rtol is not None and not (np.ndim(rtol) == 0 and float(rtol) >= 0):
        raise ValueError(f"rtol must be a non-negative number, got {rtol!r}.")
    if not isinstance(gauge, Gauge):
        raise TypeError(f"`gauge` must be a gaugejax.Gauge, got {type(gauge).__name__}.")
    gauge._check_params(params)
    dtype = _params_dtype(params)
    dtype_name = jnp.dtype(dtype).name
    # a complex dtype is judged by its real part's precision (complex128 as float64)
    real_name = jnp.dtype(jnp.finfo(dtype).dtype).name
    tol = DEFAULT_RTOL.get(real_name, 1e-5) if rtol is None else float(rtol)
    if isinstance(sites, str):  # one site's name, not its letters
        sites = (sites,)
    sites = tuple(sites) if sites is not None else None
    # each of these would sample the identity alone, and pass whatever the model does
    if not gauge.sites:
        raise ValueError("the gauge has no sites: there is nothing to sweep.")
    if sites == ():
        raise ValueError("`sites` is empty: the sweep would sample only the identity; pass None for all sites.")
    if scale is not None and not (np.ndim(scale) == 0 and np.isfinite(float(scale)) and float(scale) > 0):
        raise ValueError(f"`scale` must be None or a finite number > 0 (0 samples only the identity), got {scale!r}.")

    if isinstance(devices, jax.Device):
        devices = [devices]
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("`devices` is empty; pass None for jax.devices(), or at least one device.")
    if not all(isinstance(d, jax.Device) for d in devices) or len(set(devices)) != len(devices):
        raise ValueError(f"`devices` must be distinct jax.Device objects (e.g. jax.devices()[:2]), got {devices}.")
    n_dev = len(devices)
    mesh = Mesh(np.array(devices), ("devices",)) if n_dev > 1 else None
    # one device: the sweep runs there (a device other than the default one was ignored)
    on_device = jax.default_device(devices[0]) if n_dev == 1 else contextlib.nullcontext()
    chunk = chunk_size or choose_chunk_size(params, math.ceil(num_samples / n_dev), device=devices[0])
    n_blocks = blocks or (8 if progress else 1)
    n_blocks = max(1, min(n_blocks, num_samples))
    # Pad so every block has the same shape (one compilation) and divides across devices.
    per_block = math.ceil(num_samples / n_blocks / n_dev) * n_dev
    total = per_block * n_blocks

    errors = []
    bar = _progress(progress, n_blocks, f"sweep {dtype_name}")
    matmuls = contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)
    with bar as advance, matmuls, on_device:
        for b in range(n_blocks):
            errs, flags = _sweep_block(
                fn, gauge, params, args, key, np.int32(b), per_block, total, scale, sites, chunk, dtype, mesh
            )
            # One transfer for the errors and every finiteness flag; the flags are checked
            # before any error is used.
            errs, (leaf_ok, args_ok, y_ok) = jax.device_get((errs, flags))
            if b == 0:
                _raise_if_not_finite(gauge.paths, leaf_ok, args_ok, y_ok)
            errors.append(np.asarray(errs))
            advance()
    errors_np = np.concatenate(errors)[:num_samples]
    max_err = float(np.max(errors_np))
    swept = gauge.continuous_sites if sites is None else [n for n in gauge.continuous_sites if n in sites]
    if max_err == 0.0 and swept:
        # a continuous group element is never exact in floating point: an output that does
        # not change at all is an output that does not read the parameters
        warnings.warn(
            f"check_invariance: every output error is exactly 0 under the continuous sites {list(swept)}; "
            "does `fn` read its first argument (the parameters), or does it close over a model?",
            stacklevel=2,
        )
    report = InvarianceReport(
        dtype=dtype_name,
        num_samples=int(num_samples),
        max_rel_error=max_err,
        median_rel_error=float(np.median(errors_np)),
        eps=float(jnp.finfo(dtype).eps),
        rtol=tol,
        passed=bool(np.isfinite(max_err) and max_err <= tol),
        errors=errors_np,
        devices=n_dev,
    )
    if per_site:
        subs = {}
        for i, name in enumerate(gauge.site_groups):
            if sites is not None and name not in sites:
                continue
            subs[name] = check_invariance(
                fn, gauge, params, *args, key=jax.random.fold_in(key, i + 1),
                num_samples=num_samples, scale=scale, sites=(name,), rtol=tol,
                chunk_size=chunk_size, devices=devices, precision=precision,
            )
        report = dataclasses.replace(report, per_site=subs)
    if raise_on_failure and not report.passed:
        worst = ""
        if report.per_site:
            bad = [k for k, v in report.per_site.items() if not v.passed]
            worst = f" Failing sites: {bad}." if bad else ""
        raise InvarianceError(f"the model is not invariant under this gauge: {report}.{worst}")
    return report


class _progress:
    """A rich progress bar, or nothing."""

    def __init__(self, enabled: bool, total: int, description: str):
        self.enabled, self.total, self.description = enabled, total, description

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True)
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.__exit__(*exc)
        return False
