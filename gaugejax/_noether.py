"""Noether charges of gradient flow (MATH.md, S4 and "Regularization as gauge fixing").

For a loss invariant under a continuous site, the gradient is horizontal:
$V_\\theta^\\top\\nabla L = 0$. The moment map $\\mu(\\theta) = V_\\theta^\\top\\theta$ (for a
linear action it is a quadratic form in $\\theta$) therefore changes along a flow
$\\dot\\theta = u$ at the rate $\\dot\\mu = V_\\theta^\\top u + V_u^\\top\\theta$ ($2V_\\theta^\\top u$
for rescalings; for $GL$ the second term is the transpose of the first), which vanishes for
gradient flow: $\\mu$ is conserved. Per site:

- positive rescalings: per neuron $\\|\\mathrm{in}_i\\|^2 - \\|\\mathrm{out}_i\\|^2$;
- $GL(n)$: the symmetric matrix $\\sum XX^\\top - \\sum YY^\\top$ (produced minus consumed
  Gram; $W_1W_1^\\top - W_2^\\top W_2$ for a linear two-layer net);
- $O(n)$: identically zero (a rotation preserves the norm: no charge);
- translations: the translated leaf itself (an invariant loss has zero gradient there).

Because $\\mu(\\theta) = B(\\theta, \\theta)$ with $B(a, b) = V_a^\\top b$ bilinear, one discrete
step $\\theta \\to \\theta + \\Delta$ changes it by exactly
$V_\\theta^\\top\\Delta + V_\\Delta^\\top\\theta + \\mu(\\Delta)$ ([`gaugejax.charge_change`][];
$B$ is symmetric for rescalings, where this is $2V_\\theta^\\top\\Delta + \\mu(\\Delta)$, and for
$GL$ / $O(n)$ the second term is the transpose of the first): for gradient descent the
first two terms vanish and the drift is $O(\\mathrm{lr}^2)$ per step; weight
decay ($\\Delta = -\\mathrm{lr}\\,\\lambda\\theta$) contracts it, $\\mu \\to (1 - \\mathrm{lr}\\,
\\lambda)^2\\mu$ (in the flow, $\\mu(t) = e^{-2\\lambda t}\\mu(0)$: S19's balancing); Adam's
update is not horizontal and moves it at first order.

For a gauge with [`gaugejax.Link`][] couplings (ResNets, neural ODEs) the action on a link
$A$ is affine, $A \\mapsto g_{\\mathrm{out}}Ag_{\\mathrm{in}}^{-1} + (g_{\\mathrm{out}}
g_{\\mathrm{in}}^{-1} - I)/h$, and the quadratic form of $A$ itself is not conserved. In the
coordinate $U/h = A + I/h$ the action is linear, $U/h \\mapsto g_{\\mathrm{out}}(U/h)
g_{\\mathrm{in}}^{-1}$, and the gradient with respect to $U/h$ is the gradient with respect to
$A$: the charges are the moment map of that linear action at $U/h$ (the link read as a
weight produced by `out_site` and consumed by `in_site`).

References: Kunin et al., "Neural mechanics" (ICLR 2021); Zhao et al., "Symmetries, flat
minima, and the conserved quantities of gradient flow" (ICLR 2023).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._balance import moment_map
from ._coupling import Consume, Link, Produce
from ._gauge import Gauge
from ._groups import Translation
from ._horizontal import _check_tangent, _require_continuous, vertical_adjoint


def _linear(gauge: Gauge, params: PyTree) -> tuple[Gauge, PyTree]:
    """The gauge with every link read as a linear coupling of $U/h = A + I/h$, and `params`
    (completed) with each link so shifted: a linear action whose moment map is conserved.
    The gauge itself and `params` when there are no links."""
    params = gauge._complete(params, "`params`")
    if not any(isinstance(c, Link) for c in gauge.couplings):
        return gauge, params
    couplings = []
    for c in gauge.couplings:
        if isinstance(c, Link):
            couplings += [Produce(c.leaf, 0, c.out_site)] if c.out_site is not None else []
            couplings += [Consume(c.leaf, 1, c.in_site)] if c.in_site is not None else []
        else:
            couplings.append(c)
    shift = {p.index: 1 / p.links[0].h for p in gauge.plans if p.links}
    leaves = [x + jnp.eye(*x.shape, dtype=x.dtype) * jnp.asarray(shift[i], x.dtype) if i in shift else x
              for i, x in enumerate(jtu.tree_leaves(params))]
    params = jtu.tree_unflatten(gauge.treedef, leaves)
    return Gauge(dict(gauge.sites), couplings, params), params


def noether_charges(gauge: Gauge, params: PyTree) -> dict[str, Array]:
    """The Noether charge (moment map) of every continuous site at `params`:
    $\\mu = V_\\theta^\\top\\theta = \\nabla_\\xi\\,\\tfrac12\\|\\exp(\\xi)\\cdot\\theta\\|^2|_{\\xi=0}$.

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][] with a continuous site (else a `ValueError`).
    - `params`: the parameters.

    For a gauge with links the moment map is taken at $U/h = A + I/h$ (module notes): the
    quantity gradient flow conserves.

    **Returns:** `{site: array}` in the Lie-algebra layout of each site (per-neuron vectors
    for rescalings, `(n, n)` matrices for $GL$ / $O(n)$).
    """
    _require_continuous(gauge, "noether_charges")
    return _charges(gauge, params)


@eqx.filter_jit
def _charges(gauge: Gauge, params: PyTree) -> dict[str, Array]:
    # under jit the linear gauge is built and the links shifted once per trace, not on
    # every call of a training loop's monitor
    return moment_map(*_linear(gauge, params))


def charge_change(gauge: Gauge, params: PyTree, delta: PyTree) -> dict[str, Array]:
    """The exact change of the charges under the step $\\theta \\to \\theta + \\Delta$:
    $\\mu(\\theta + \\Delta) - \\mu(\\theta) = V_\\theta^\\top\\Delta + V_\\Delta^\\top\\theta +
    \\mu(\\Delta)$. The action is linear, so $\\mu(\\theta) = V_\\theta^\\top\\theta$ is a quadratic
    form; its polarisation $V_a^\\top b$ is symmetric in $(a, b)$ for rescalings (the change
    is then $2V_\\theta^\\top\\Delta + \\mu(\\Delta)$) but not for $GL$ / $O(n)$, where
    $V_\\Delta^\\top\\theta = (V_\\theta^\\top\\Delta)^\\top$. For a gauge with links the charges
    are those of [`gaugejax.noether_charges`][] (the links read as $U/h$, where the action
    is linear), so this is exact for them too. A translation site's charge is the
    translated leaf itself, linear in $\\theta$: it changes by $\\mu(\\Delta)$, the step on
    that leaf. Computed in the parameters' precision (`delta` is cast to it).

    **Arguments:**

    - `gauge`, `params`: the gauge and the point before the step.
    - `delta`: the step, a pytree like `params` (e.g. an optax update).

    **Returns:** `{site: array}`.
    """
    _require_continuous(gauge, "charge_change")
    _check_tangent(gauge, gauge._complete(params, "`params`"), delta, "delta")
    gauge, params = _linear(gauge, params)
    delta = gauge._complete(delta, "`delta`")
    # in the parameters' precision (a bfloat16 update of float32 parameters is exact in
    # float32; its products in bfloat16 are not)
    delta = jtu.tree_map(lambda d, p: d.astype(p.dtype) if eqx.is_inexact_array(d) and eqx.is_inexact_array(p)
                         else d, delta, params)
    cross = vertical_adjoint(gauge, params, delta)
    cross_t = vertical_adjoint(gauge, delta, params)
    second = moment_map(gauge, delta)
    # a translation's charge is the translated leaf, linear in theta: it changes by mu(delta)
    # alone (the polarisation terms are those of a quadratic charge)
    affine = {n for n, g in gauge.sites if isinstance(g, Translation)}
    return {n: second[n] if n in affine else cross[n] + cross_t[n] + second[n] for n in second}


class NoetherMonitor(eqx.Module):
    """Tracks the drift of the Noether charges during training.

    !!! example

        ```python
        monitor = gaugejax.NoetherMonitor(gauge, params)
        for step in range(n):
            params = train_step(params)
            drift = monitor.drift(params)  # {site: relative drift}, jit-friendly
        ```

    **Arguments:**

    - `gauge`: a [`gaugejax.Gauge`][] with a continuous site.
    - `params`: the parameters at which the reference charges are taken.
    """

    gauge: Gauge
    reference: dict[str, Array]
    scale: Array

    def __init__(self, gauge: Gauge, params: PyTree):
        self.gauge = gauge
        self.reference = noether_charges(gauge, params)
        # the charges' scale: |theta_0|^2 (links read as U/h), or 1 at theta_0 = 0
        scale = sum(jnp.sum(x**2) for x in jtu.tree_leaves(_linear(gauge, params)[1]) if eqx.is_inexact_array(x))
        self.scale = jnp.where(scale > 0, scale, 1)

    def charges(self, params: PyTree) -> dict[str, Array]:
        """The charges at `params` ([`gaugejax.noether_charges`][])."""
        return noether_charges(self.gauge, params)

    def drift(self, params: PyTree) -> dict[str, Array]:
        """Per site, $\\max|\\mu(\\theta) - \\mu(\\theta_0)| / \\|\\theta_0\\|^2$ (links read
        as $U/h$; the absolute drift when $\\theta_0 = 0$)."""
        now = self.charges(params)
        return {k: jnp.max(jnp.abs(now[k] - self.reference[k])) / self.scale for k in now}

    def max_drift(self, params: PyTree) -> Array:
        """The largest relative drift over all sites."""
        return jnp.max(jnp.stack(list(self.drift(params).values())))

