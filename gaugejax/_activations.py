"""Which groups an elementwise activation admits: $\\sigma(g z) = g\\,\\sigma(z)$.

MATH.md, "Conventions": a positively homogeneous $\\sigma$ (ReLU, leaky ReLU) commutes with
positive monomial matrices; an odd $\\sigma$ (tanh, sin) with signed permutations; any
elementwise $\\sigma$ (GELU, SiLU, sigmoid) with permutations; the identity with all of
$GL(n)$. Each activation is filed under the largest of these *families*, and a site may
carry any group of its family or of a family below it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jax.scipy.special
import numpy as np

from ._groups import (
    GL,
    AbstractGroup,
    Orthogonal,
    Permutation,
    PositiveDiagonal,
    PositiveMonomial,
    SignedPermutation,
    SignFlip,
)


Family = Literal["linear", "positive_homogeneous", "odd", "elementwise"]

#: the group classes each family admits, largest first
ADMITS: dict[str, tuple[type[AbstractGroup], ...]] = {
    "linear": (GL, Orthogonal, PositiveMonomial, SignedPermutation, PositiveDiagonal, SignFlip, Permutation),
    "positive_homogeneous": (PositiveMonomial, PositiveDiagonal, Permutation),
    "odd": (SignedPermutation, SignFlip, Permutation),
    "elementwise": (Permutation,),
}

_REGISTRY: list[tuple[Callable, str]] = []


def identity(x):
    """The identity activation (a linear layer): its sites carry all of $GL(n)$."""
    return x


def register_activation(fn: Callable, family: Family) -> None:
    """Declare which symmetry family an activation belongs to.

    An activation gaugejax does not know gets `"elementwise"` (permutations only), which
    is safe for a function applied entry by entry, the same function on every unit (one
    holding per-unit parameters, such as a PReLU's slopes, raises instead). Declare more
    only when it is true for every input:

    - `"positive_homogeneous"`: $\\sigma(c z) = c\\,\\sigma(z)$ for all $c > 0$ (positive
      monomial matrices);
    - `"odd"`: $\\sigma(-z) = -\\sigma(z)$ (signed permutations);
    - `"linear"`: $\\sigma$ is linear (all of $GL(n)$);
    - `"elementwise"`: applied entry by entry (permutations).

    !!! example

        ```python
        def asymmetric_leaky(x):  # positively homogeneous, not odd
            return jnp.where(x > 0, 2 * x, 0.5 * x)
        gaugejax.register_activation(asymmetric_leaky, "positive_homogeneous")
        ```
    """
    if family not in ADMITS:
        raise ValueError(f"family must be one of {sorted(ADMITS)}, got {family!r}.")
    if not callable(fn):
        raise TypeError(f"expected a callable activation, got {fn!r}.")
    _REGISTRY.insert(0, (fn, family))


def _unwrap(fn: Callable) -> Callable:
    while isinstance(fn, (functools.partial, jax.tree_util.Partial)):
        fn = fn.func
    return fn


#: bound keyword arguments that keep a function's family, whatever their (scalar) value
_FAMILY_KEEPING = {"negative_slope"}  # leaky_relu: positively homogeneous for every slope


def _bound(fn: Callable) -> tuple[list, dict]:
    """The arguments the partials around `fn` bind."""
    args, kwargs = [], {}
    while isinstance(fn, (functools.partial, jax.tree_util.Partial)):
        args += list(fn.args)
        kwargs = {**fn.keywords, **kwargs}
        fn = fn.func
    return args, kwargs


def _lookup(fn: Callable) -> str | None:
    for registered, family in _REGISTRY:
        if fn is registered:
            return family
    return None


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) and np.size(x) > 1


def _held_array(fn: Callable) -> tuple[str, Any] | None:
    """An array of more than one entry that `fn` carries, and where: a pytree leaf (an
    equinox Module's field, a `jax.tree_util.Partial`'s argument), a closure cell or a
    default argument. A bound method is judged by its function (its instance, say a model
    whose method is the activation, holds the model's weights, not the activation's)."""
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        return _held_array(fn.__func__)
    for path, leaf in jax.tree_util.tree_flatten_with_path(fn)[0]:
        if leaf is not fn and _is_array(leaf):
            return f"as its field {jax.tree_util.keystr(path)!r}", leaf
    code = getattr(fn, "__code__", None)
    for name, cell in zip(getattr(code, "co_freevars", ()), getattr(fn, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if _is_array(value):
            return f"in its closure as {name!r}", value
    defaults = [*(getattr(fn, "__defaults__", None) or ()), *(getattr(fn, "__kwdefaults__", None) or {}).values()]
    for value in defaults:
        if _is_array(value):
            return "as a default argument", value
    return None


def activation_family(fn: Callable, n: int | None = None) -> str:
    """The symmetry family of `fn` (see [`gaugejax.register_activation`][]).

    A `functools.partial` of a registered function keeps its family only where the bound
    arguments cannot break it: none bound, an `"elementwise"` function (still the same on
    every unit), or a scalar `negative_slope` (leaky ReLU). Other scalar arguments make it
    `"elementwise"` (binding `shift=0.7` into a registered odd function makes it not odd),
    and an array argument (per-unit parameters, e.g. a PReLU's slopes) raises: the units
    are no longer interchangeable, and those parameters would have to transform too. So
    does an unregistered callable holding an array (an `equinox.nn.PReLU` with one slope
    per unit, an equinox Module with array fields, a function closing over an array).

    An unregistered callable is `"elementwise"` only once it is seen to commute with
    permutations: it is evaluated on a random vector of `n` entries (the layer's width;
    default 8) and on two of its permutations. A function that mixes its units (MaxMin /
    GroupSort, a sort, a cumulative sum) or reads per-unit parameters from anywhere (a
    global array, an instance's field through a bound method) fails this and raises; so
    does one that cannot be evaluated on a vector of `n` entries.
    [`gaugejax.register_activation`][] declares a family without the probe."""
    if not callable(fn):
        raise TypeError(
            f"an activation must be a callable (e.g. jax.nn.relu or an equinox Module), got "
            f"{fn!r} of type {type(fn).__name__}."
        )
    family = _lookup(fn)
    if family is not None:
        return family
    inner = _unwrap(fn)
    if inner is fn:
        held = _held_array(fn)
        if held is not None:
            where, value = held
            name = getattr(fn, "__name__", type(fn).__name__)
            raise ValueError(
                f"activation {name!r} holds an array of shape {tuple(np.shape(value))} {where} "
                "(per-unit parameters, e.g. a PReLU's slopes): its units are not "
                "interchangeable and those parameters must transform too, so no gauge is "
                "derived from it; declare the gauge with gaugejax.Gauge (or, if the array is "
                "the same for every unit, register_activation() the activation)."
            )
        _check_permutation_equivariant(fn, n)
        return "elementwise"
    args, kwargs = _bound(fn)
    arrays = [k for k, v in [*enumerate(args), *kwargs.items()] if np.ndim(v) > 0]
    if arrays:
        name = getattr(inner, "__name__", repr(inner))
        raise ValueError(
            f"activation partial({name}, ...) binds an array as argument {arrays[0]!r} (per-unit "
            "parameters): its units are not interchangeable and those parameters must transform "
            "too, so no gauge is derived from it; declare the gauge with gaugejax.Gauge."
        )
    family = _lookup(inner)
    if family is None:
        activation_family(inner, n)  # an unregistered inner function: its arrays, as above
        _check_permutation_equivariant(fn, n)  # with the bound arguments
        return "elementwise"
    if family == "elementwise" or (not args and set(kwargs) <= _FAMILY_KEEPING):
        return family
    return "elementwise"


#: the width an unregistered activation is probed at when the layer's is not known
PROBE_WIDTH = 8


def _check_permutation_equivariant(fn: Callable, n: int | None) -> None:
    """Raise unless `fn` (unregistered) maps a random vector of `n` entries to one of the
    same shape and commutes with two random permutations of it, to a few ulps: the one
    property a permutation site needs. A function applied entry by entry, the same on every
    unit, commutes exactly; one that mixes units or reads per-unit parameters does not."""
    n = PROBE_WIDTH if n is None else int(n)
    name = getattr(fn, "__name__", type(fn).__name__)
    rng = np.random.default_rng(0)
    z64 = rng.normal(size=n) * 2.0
    perms = [rng.permutation(n) for _ in range(2)]
    how = (f"register_activation({name}, family) declares its family if it is in fact applied "
           "entry by entry, the same function on every unit")
    # float32 first; then the default float dtype (float64 with x64: an activation holding a
    # float64 scalar may refuse float32 under strict dtype promotion)
    first = None
    for dtype in dict.fromkeys([jnp.float32, jnp.result_type(float)]):
        z = jnp.asarray(z64, dtype)
        try:
            y = jnp.asarray(fn(z))
            ys = [jnp.asarray(fn(z[p])) for p in perms]
            break
        except Exception as e:  # noqa: BLE001 -- any failure means it cannot be checked
            first = first or e
    else:
        raise ValueError(
            f"activation {name!r} is not registered, and evaluating it on a vector of {n} entries "
            f"(to check that it commutes with permutations of the units) raised "
            f"{type(first).__name__}: {first}; {how}."
        ) from first
    if y.shape != z.shape:
        raise ValueError(
            f"activation {name!r} maps a vector of shape {z.shape} to shape {y.shape}: it is not "
            f"applied entry by entry, so no permutation of the units is known to be a symmetry; {how}."
        )
    if not jnp.issubdtype(y.dtype, jnp.inexact):
        return  # an integer-valued output compares exactly below
    tol = 8 * float(jnp.finfo(y.dtype).eps) * float(jnp.max(jnp.abs(y)) + 1)
    for p, yp in zip(perms, ys):
        err = float(jnp.max(jnp.abs(yp - y[p]))) if yp.shape == y.shape else np.inf
        if not err <= tol:
            raise ValueError(
                f"activation {name!r} is not registered and does not commute with permutations "
                f"of the units (|sigma(P z) - P sigma(z)| = {err:.2g} on a random z of {n} entries): "
                "it mixes units (MaxMin / GroupSort, a sort) or holds per-unit parameters (a "
                "PReLU's slopes read from a global or an instance), so no gauge is derived "
                f"from it; declare the gauge with gaugejax.Gauge, or {how}."
            )


def default_group(fn: Callable, n: int) -> AbstractGroup:
    """The largest site group on $\\mathbb{R}^n$ that the activation `fn` admits."""
    return ADMITS[activation_family(fn, n)][0](n)


def admits(fn: Callable, group: AbstractGroup) -> bool:
    """Whether a hidden layer with activation `fn` is invariant under `group`."""
    return isinstance(group, ADMITS[activation_family(fn, group.n)])


register_activation(jax.nn.relu, "positive_homogeneous")
register_activation(jax.nn.leaky_relu, "positive_homogeneous")
for _fn in (jnp.tanh, jax.nn.tanh, jnp.sin, jnp.arctan, jnp.sinh, jax.nn.soft_sign, jax.nn.hard_tanh,
            jax.scipy.special.erf, jax.lax.erf):
    register_activation(_fn, "odd")
register_activation(identity, "linear")
for _fn in (jax.nn.gelu, jax.nn.silu, jax.nn.swish, jax.nn.sigmoid, jax.nn.softplus, jax.nn.elu,
            jax.nn.selu, jax.nn.celu, jax.nn.relu6):
    register_activation(_fn, "elementwise")
