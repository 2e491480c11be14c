"""The interface every site group implements.

A *site* is a hidden vector space $V \\cong \\mathbb{R}^n$ carrying a group $G \\subset GL(V)$,
possibly batched (one copy of $G$ per head, say). The engine never needs a group as a
dense matrix: it asks each group how one of its elements acts on a single axis of a
parameter leaf, as a product of three structured factors applied in a fixed order,

$$x \\mapsto P\\,(M\\,(s \\odot x)),$$

a diagonal scaling $s$, a dense matrix $M$ and a permutation $P$ (each optional). A
*produced* axis transforms by $g$ and a *consumed* axis by $g^{-T}$ (MATH.md, "Notes for
the engine"); :meth:`AbstractGroup.factors` returns the factors of either.
"""

from __future__ import annotations

import abc
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray


Kind = Literal["produce", "consume"]


class AxisFactors(NamedTuple):
    """How a group element acts on one axis: `x -> P (M (s * x))`.

    Each field is `None` when that factor is the identity. Shapes carry the group's batch
    dimensions first: `scale` is `(*batch, n)`, `matrix` `(*batch, n, n)`, `perm`
    `(*batch, n)` with `(P x)[i] = x[perm[i]]`.
    """

    scale: Array | None = None
    matrix: Array | None = None
    perm: Array | None = None


def _describe(n: int, batch: tuple[int, ...]) -> str:
    return f"{n}" if not batch else f"{n}, batch={batch}"


class AbstractGroup(eqx.Module):
    """A matrix group acting on $\\mathbb{R}^n$, optionally batched over `batch`.

    Group elements are pytrees of arrays whose leading dimensions are `batch`. Every
    method is pure and traceable: elements can be `jit`-ed, `vmap`-ped and
    differentiated.
    """

    n: eqx.AbstractVar[int]
    batch: eqx.AbstractVar[tuple[int, ...]]

    # -- group structure ---------------------------------------------------------------
    @abc.abstractmethod
    def identity(self, dtype: Any = None) -> Any:
        """The identity element."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, scale: float | None, dtype: Any = None) -> Any:
        """A random element; `scale` sets the distance from the identity of the
        continuous part (discrete parts are uniform)."""

    @abc.abstractmethod
    def compose(self, g: Any, h: Any) -> Any:
        """The product `g h` (act by `h` first)."""

    @abc.abstractmethod
    def inverse(self, g: Any) -> Any:
        """The inverse element."""

    @abc.abstractmethod
    def factors(self, g: Any, kind: Kind) -> AxisFactors:
        """The structured factors of `g` (`kind="produce"`) or `g^{-T}` (`"consume"`)."""

    @abc.abstractmethod
    def as_matrix(self, g: Any) -> Array:
        """`g` as a dense `(*batch, n, n)` matrix (for links and tests, never the hot path)."""

    def check(self, g: Any) -> list[tuple[Array, str]]:
        """Run-time validity checks: a list of `(is_bad, reason)` pairs."""
        del g
        return []

    # -- Lie algebra ---------------------------------------------------------------------
    @property
    def algebra_dim(self) -> int:
        """Dimension of the Lie algebra (0 for discrete groups), batch included."""
        return 0

    def algebra_zeros(self, dtype: Any = None) -> Array | None:
        """The zero of the Lie algebra, or `None` for a discrete group."""
        return None

    def sample_algebra(self, key: PRNGKeyArray, scale: float, dtype: Any = None) -> Array | None:
        """A Gaussian Lie-algebra element of size `scale`, or `None` if discrete."""
        del key, scale, dtype
        return None

    def exp(self, xi: Array | None, dtype: Any = None) -> Any:
        """The exponential map into the identity component (identity if discrete)."""
        del xi
        return self.identity(dtype)

    def exp_tangent(self, xi: Array, dtype: Any = None) -> Any:
        """$\\frac{d}{d\\epsilon}\\exp(\\epsilon\\xi)|_{\\epsilon=0}$ as a tangent to the element
        pytree at the identity (what [`gaugejax.Gauge.vertical`][] pushes through the action).

        The default differentiates `exp` (a JVP); groups whose exponential has a known
        derivative at 0 (every group gaugejax ships: $\\xi$ itself, the skew part for
        $O(n)$) override it, so no matrix exponential is ever differentiated."""
        dtype = default_float(dtype)
        _, t = eqx.filter_jvp(lambda e: self.exp(e * xi, dtype), (jnp.zeros((), dtype),),
                              (jnp.ones((), dtype),))
        return t

    # -- helpers -------------------------------------------------------------------------
    @property
    def is_permutation(self) -> bool:
        """Whether elements are plain permutations (usable as the outer factor of a
        semidirect product over another site's batch axis)."""
        return False

    def permutation(self, g: Any) -> Array:
        """The int32 index array of a permutation element (only for permutation groups)."""
        raise TypeError(f"{self} is not a permutation group")

    def batch_size(self) -> int:
        """How many copies of the group the batch holds: the product of `batch`."""
        size = 1
        for b in self.batch:
            size *= b
        return size

    def __repr__(self) -> str:  # short, for tables and error messages
        return f"{type(self).__name__}({_describe(self.n, self.batch)})"

    def __str__(self) -> str:
        return repr(self)


def default_float(dtype: Any) -> Any:
    """`dtype`, or JAX's default float dtype."""
    if dtype is None:
        return jnp.zeros(()).dtype
    return jnp.dtype(dtype)


#: up to this size `random_permutations` ranks random keys by pairwise comparison (n^2
#: compares that vectorize, 4x faster under vmap than a sort at n = 64); above, it sorts
RANK_SAMPLER_MAX_N = 128


def random_permutations(key: PRNGKeyArray, n: int, batch: tuple[int, ...]) -> Array:
    """Uniform random permutations of `n`, one per batch entry, as int32.

    Above [`RANK_SAMPLER_MAX_N`] this is `jax.random.permutation`. Up to it, each
    permutation is the rank vector of `n` i.i.d. 32-bit keys (ties broken by index): the
    same distribution as one round of `jax.random.permutation`'s sort-based shuffle (which
    is what it uses for every n below about 1600), without a sort.
    """
    size = 1
    for b in batch:
        size *= b
    if n <= RANK_SAMPLER_MAX_N:
        u = jax.random.bits(key, (size, n), jnp.uint32)
        i = jnp.arange(n, dtype=jnp.int32)
        before = (u[:, None, :] < u[:, :, None]) | (
            (u[:, None, :] == u[:, :, None]) & (i[None, None, :] < i[None, :, None])
        )
        perms = jnp.sum(before, axis=-1, dtype=jnp.int32)
        return perms.reshape(*batch, n)
    keys = jax.random.split(key, size)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(keys)
    return perms.reshape(*batch, n).astype(jnp.int32)


def invert_permutation(perm: Array) -> Array:
    """The inverse permutation (batched over leading dimensions)."""
    n = perm.shape[-1]
    arange = jnp.broadcast_to(jnp.arange(n, dtype=perm.dtype), perm.shape)
    inv = jnp.zeros_like(perm)
    return jnp.put_along_axis(inv, perm, arange, axis=-1, inplace=False)


def compose_permutations(p: Array, q: Array) -> Array:
    """The permutation `P Q` (apply `Q` first) with `(P x)[i] = x[p[i]]`:
    `(P Q x)[i] = (Q x)[p[i]] = x[q[p[i]]]`."""
    return jnp.take_along_axis(q, p, axis=-1)


def permutation_matrix(perm: Array, dtype: Any) -> Array:
    """Dense `(*batch, n, n)` matrix with `(P x)[i] = x[perm[i]]`."""
    n = perm.shape[-1]
    return jax.nn.one_hot(perm, n, dtype=dtype)
