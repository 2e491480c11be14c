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
import numpy as np
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

    def __check_init__(self):
        def positive(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

        if not positive(self.n):
            raise ValueError(f"{type(self).__name__}: `n` must be a positive integer, got {self.n!r}.")
        if not (isinstance(self.batch, tuple) and all(positive(b) for b in self.batch)):
            raise ValueError(
                f"{type(self).__name__}: `batch` must be a tuple of positive integers, got {self.batch!r}."
            )

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

    # -- sampling from shared random draws (optional) -------------------------------------
    def sample_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int] | None:
        """`(words, normals)`: how many i.i.d. uniform uint32 words and standard normals
        `sample_from_draws` consumes, or `None` when the group samples from a key only.

        Groups that implement it let [`gaugejax.Gauge.sample`][] draw the randomness of all
        their sites at once: one `jax.random.bits` and one `jax.random.normal` call per
        element instead of one of each per site. Under `vmap` every `jax.random` call has a
        fixed cost above that of a small site's bits, and every Gaussian transform inlines
        an `erfinv` polynomial into the program (compile time)."""
        del scale, dtype
        return None

    def sample_from_draws(self, words: Array, normals: Array, scale: float | None, dtype: Any = None) -> Any:
        """A random element from the draws counted by `sample_draws` (flat arrays), with
        the same distribution as `sample`."""
        raise NotImplementedError(f"{type(self).__name__} samples from a key only")

    def shared_draws(self, scale: float | None, dtype: Any = None) -> tuple[int, int] | None:
        """`sample_draws`, or `None` when a subclass overrides `sample` without
        overriding `sample_draws` (its own sampler then stays in charge)."""
        mro = type(self).__mro__
        owner = lambda name: next(c for c in mro if name in c.__dict__)  # noqa: E731
        if owner("sample") is not owner("sample_draws") or owner("sample_from_draws") is AbstractGroup:
            return None
        return self.sample_draws(scale, dtype)

    def _sample_via_draws(self, key: PRNGKeyArray, scale: float | None, dtype: Any) -> Any:
        """`sample` for groups that implement `sample_draws`: one bits call."""
        nw, nn = self.sample_draws(scale, dtype)
        words, normals = split_draws(key, nw, nn, dtype)
        return self.sample_from_draws(words, normals, scale, dtype)

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
#: up to this size the ranks are summed as n unrolled elementwise terms (vectorised);
#: above, as one (n, n) compare-and-reduce (smaller program, slower)
RANK_UNROLL_MAX_N = 64
_RANK_PARTS = 4


def _size(batch: tuple[int, ...]) -> int:
    size = 1
    for b in batch:
        size *= b
    return size


def permutation_words(n: int, batch: tuple[int, ...]) -> int | None:
    """Random words `permutations_from_bits` needs (`None` above `RANK_SAMPLER_MAX_N`)."""
    return _size(batch) * n if n <= RANK_SAMPLER_MAX_N else None


def permutations_from_bits(bits: Array, n: int, batch: tuple[int, ...]) -> Array:
    """Uniform random permutations of `n <= RANK_SAMPLER_MAX_N` from `prod(batch) * n`
    i.i.d. uint32 words: each is the rank vector of its `n` words (ties broken by index),
    the same distribution as one round of `jax.random.permutation`'s sort-based shuffle
    (which is what it uses for every n below about 1600), without a sort."""
    # Signed compares (an order-preserving flip of the top bit: x86 has no unsigned
    # vector compare). Key j ranks before key i iff u_j <= u_i (j < i) or u_j < u_i (j > i).
    u = jax.lax.bitcast_convert_type(bits.reshape(_size(batch), n) ^ jnp.uint32(0x80000000), jnp.int32)
    i = jnp.arange(n, dtype=jnp.int32)
    if n <= RANK_UNROLL_MAX_N:
        # Keys j = m k + r: elementwise partial sums over m (unrolled, vectorised over i;
        # 3x faster on XLA:CPU than the (n, n) compare-and-reduce below, whose reduction
        # is scalar), then a reduction over r. XLA fuses a reduction only as a root, so
        # the ranks are materialised once: a purely elementwise sum would be fused into
        # every consumer (a gather reading perm[i] recomputes it per element read: 40x
        # slower sweeps), and an optimization barrier does not survive XLA:CPU's pipeline.
        k = _RANK_PARTS
        m_max = -(-n // k)
        pad = m_max * k - n  # padded keys never rank before a real one
        up = jnp.pad(u, ((0, 0), (0, pad)), constant_values=np.iinfo(np.int32).max) if pad else u
        ip = jnp.arange(m_max * k, dtype=jnp.int32)
        acc = jnp.zeros((u.shape[0], k, n), jnp.int32)
        for m in range(m_max):
            uj = up[:, m * k : (m + 1) * k, None]  # (size, k, 1)
            jj = ip[m * k : (m + 1) * k, None]
            lower = (jj < i[None, :])[None]  # (1, k, n): j < i
            real = (jj < n)[None]  # (1, k, 1)
            ui = u[:, None, :]
            term = jnp.where(lower, uj <= ui, uj < ui) & real
            acc = acc + term.astype(jnp.int32)
        perms = jnp.sum(acc, axis=1, dtype=jnp.int32)
    else:  # before[b, j, i] summed over j (a major axis: vectorised over i)
        uj, ui = u[:, :, None], u[:, None, :]
        before = jnp.where((i[:, None] < i[None, :])[None], uj <= ui, uj < ui)
        perms = jnp.sum(before, axis=-2, dtype=jnp.int32)
    return perms.reshape(*batch, n)


def split_draws(key: PRNGKeyArray, words: int, normals: int, dtype: Any) -> tuple[Array, Array]:
    """`words` uniform uint32 words and `normals` standard normals (in `dtype`): one
    `jax.random.bits` and one `jax.random.normal` call for everything a group element
    needs, however many sites it has."""
    dtype = default_float(dtype)
    if not normals:
        return jax.random.bits(key, (words,), jnp.uint32), jnp.zeros((0,), dtype)
    if not words:
        return jnp.zeros((0,), jnp.uint32), jax.random.normal(key, (normals,), dtype)
    kb, kn = jax.random.split(key)
    return jax.random.bits(kb, (words,), jnp.uint32), jax.random.normal(kn, (normals,), dtype)


def random_permutations(key: PRNGKeyArray, n: int, batch: tuple[int, ...]) -> Array:
    """Uniform random permutations of `n`, one per batch entry, as int32.

    Above [`RANK_SAMPLER_MAX_N`] this is `jax.random.permutation`. Up to it, each
    permutation is the rank vector of `n` i.i.d. 32-bit keys (ties broken by index; see
    `permutations_from_bits`).
    """
    size = _size(batch)
    if n <= RANK_SAMPLER_MAX_N:
        return permutations_from_bits(jax.random.bits(key, (size * n,), jnp.uint32), n, batch)
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
