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
from typing import Literal

import jax
import jax.numpy as jnp

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
    is always safe. Declare more only when it is true for every input:

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


def activation_family(fn: Callable) -> str:
    """The symmetry family of `fn` (see [`gaugejax.register_activation`][])."""
    for candidate in (fn, _unwrap(fn)):
        for registered, family in _REGISTRY:
            if candidate is registered:
                return family
    return "elementwise"


def default_group(fn: Callable, n: int) -> AbstractGroup:
    """The largest site group on $\\mathbb{R}^n$ that the activation `fn` admits."""
    return ADMITS[activation_family(fn)][0](n)


def admits(fn: Callable, group: AbstractGroup) -> bool:
    """Whether a hidden layer with activation `fn` is invariant under `group`."""
    return isinstance(group, ADMITS[activation_family(fn)])


register_activation(jax.nn.relu, "positive_homogeneous")
register_activation(jax.nn.leaky_relu, "positive_homogeneous")
for _fn in (jnp.tanh, jax.nn.tanh, jnp.sin, jnp.arctan, jnp.sinh, jax.nn.soft_sign, jax.nn.hard_tanh):
    register_activation(_fn, "odd")
register_activation(identity, "linear")
for _fn in (jax.nn.gelu, jax.nn.silu, jax.nn.swish, jax.nn.sigmoid, jax.nn.softplus, jax.nn.elu,
            jax.nn.selu, jax.nn.celu, jax.nn.relu6):
    register_activation(_fn, "elementwise")
