"""Parameter-space gauges of the ResNet and the parametric neural ODE, as engine tables.

**ResNet (exact lattice gauge).** Sites: a stream site $s_l$ per depth $l = 0..L$ and a
hidden site $k_l$ per block. Block $l$ transforms as

$$U_l = I + hA_l \\mapsto g_{l+1} U_l g_l^{-1},\\quad
W_{2,l} \\mapsto g_{l+1} W_{2,l} k_l^{-1},\\quad W_{1,l} \\mapsto k_l W_{1,l} g_l^{-1},\\quad
b_l \\mapsto k_l b_l,\\quad c_l \\mapsto g_{l+1} c_l,$$

i.e. `A[l]` is a [`gaugejax.Link`][] from $s_l$ to $s_{l+1}$ (the affine coupling
$A_l \\mapsto g_{l+1} A_l g_l^{-1} + (g_{l+1} g_l^{-1} - I)/h$), `W2[l]` produces
$s_{l+1}$ and consumes $k_l$, `W1[l]` produces $k_l$ and consumes $s_l$, `b[l]` produces
$k_l$, `c[l]` produces $s_{l+1}$. Then $x_l \\mapsto g_l x_l$ along the stream and the
block's hidden pre-activation $\\mapsto k_l(\\cdot)$, so the model is unchanged *exactly*
(to round-off) as long as $k_l$ commutes with $\\sigma$. $s_0$ and $s_L$ are either held
at the identity or absorbed by a linear embedding ($E \\mapsto g_0 E$) and readout
($R \\mapsto R g_L^{-1}$).

**Parametric neural ODE (lattice gauge on the time grid).** For the field
$v = A(t) x + W_2(t)\\sigma(W_1(t) x + b(t)) + c(t)$ with parameters on the grid
$t_0 .. t_N$, the continuum gauge $A' = GAG^{-1} + \\dot G G^{-1}$, $W_2' = G W_2 k^{-1}$,
$W_1' = k W_1 G^{-1}$, $b' = kb$, $c' = Gc$ is expressed on the grid through the same
couplings, with $h_i = t_{i+1} - t_i$: node $i < N$ is treated as the block from $t_i$ to
$t_{i+1}$ (`A[i]` a Link $s_i \\to s_{i+1}$, `W2[i]`, `c[i]` produce $s_{i+1}$, `W1[i]`
consumes $s_i$), so $\\dot G(t_i)$ is discretised by the **forward difference**
$(g_{i+1} g_i^{-1} - I)/h_i$. The last node has no block after it; it uses the
**backward** link $s_{N-1} \\to s_N$ with $h_{N-1}$ and $W_2, c, W_1$ at $s_N$.

What is exact and what is $O(h)$: the grid gauge is *exactly* the lattice gauge of the
Euler ResNet `discretize(node, N)` on a uniform grid (that ResNet's output is invariant to
round-off). The continuous-time NODE's flow map changes by $O(h)$ (with $g_i = G(t_i)$
for a smooth $G$: $g_{i+1}(I + hA_i)g_i^{-1} - I)/h = GAG^{-1} + \\dot G G^{-1} + O(h)$,
$g_{i+1} W_{2,i} = G W_2 + O(h)$), measured in `tests/test_continuum.py`. For an exact
continuous-time symmetry use the function-space action ([`gaugejax.transform_node`][]).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax

from . import _activations
from ._coupling import Consume, Link, Produce
from ._feedforward import _make_group, derive_gauge
from ._gauge import Gauge
from ._groups import GL, AbstractGroup
from .nn._node import NeuralODE, ParametricField, is_concrete
from .nn._resnet import ResNet


def _hidden_group(activation: Any, width: int, spec: Any, unsafe: bool, site: str) -> AbstractGroup:
    group = _activations.default_group(activation, width) if spec is None else _make_group(spec, width)
    if not _activations.admits(activation, group) and not unsafe:
        family = _activations.activation_family(activation)
        raise ValueError(
            f"site {site!r}: activation {getattr(activation, '__name__', activation)!r} (family "
            f"{family!r}) does not admit {group!r}; pass unsafe=True for a negative control."
        )
    return group


def _boundary_sites(model: Any, boundary: str, what: str) -> tuple[bool, bool]:
    if boundary not in ("fixed", "absorb"):
        raise ValueError(f"`boundary` must be 'fixed' (s_0 = s_L = I) or 'absorb' (E, R absorb them); received {boundary!r}.")
    if boundary == "fixed":
        return False, False
    for name in ("embedding", "readout"):
        layer = getattr(model, name)
        if not isinstance(layer, eqx.nn.Linear):
            raise ValueError(
                f"boundary='absorb' needs the {what}'s `{name}` to be an equinox.nn.Linear (so that "
                f"it can absorb a GL element); received {type(layer).__name__}. Use boundary='fixed'."
            )
    return True, True


def _block_couplings(prefix: str, l: int, s_in: str | None, s_out: str | None, k: str, h: float) -> list:
    out: list = [Link(f"{prefix}A[{l}]", out_site=s_out, in_site=s_in, h=h)]
    out += [Produce(f"{prefix}W1[{l}]", 0, k), Produce(f"{prefix}b[{l}]", 0, k), Consume(f"{prefix}W2[{l}]", 1, k)]
    if s_in is not None:
        out.append(Consume(f"{prefix}W1[{l}]", 1, s_in))
    if s_out is not None:
        out += [Produce(f"{prefix}W2[{l}]", 0, s_out), Produce(f"{prefix}c[{l}]", 0, s_out)]
    return out


def _boundary_couplings(prefix: str, absorb_in: bool, absorb_out: bool, s0: str, sL: str, model: Any) -> list:
    out: list = []
    if absorb_in:
        out.append(Produce(f"{prefix}embedding.weight", 0, s0))
        if model.embedding.bias is not None:
            out.append(Produce(f"{prefix}embedding.bias", 0, s0))
    if absorb_out:
        out.append(Consume(f"{prefix}readout.weight", 1, sL))
    return out


def resnet_gauge(
    resnet: ResNet,
    *,
    stream_group: Any = None,
    group: Any = None,
    boundary: str = "fixed",
    unsafe: bool = False,
) -> Gauge:
    """The exact lattice gauge of a [`gaugejax.nn.ResNet`][] (MATH.md S13).

    Sites `"s1" .. "s{L-1}"` (streams; plus `"s0"`, `"s{L}"` with `boundary="absorb"`) and
    `"k0" .. "k{L-1}"` (block hidden units). See the module docstring for the table.

    **Arguments:**

    - `resnet`: the model (or its `jax.eval_shape`).
    - `stream_group`: a group class or `width -> group` for the stream sites (default
      [`gaugejax.GL`][]: the stream passes through no nonlinearity). `PositiveDiagonal`
      gives the feedforward rescaling, whose continuum limit is a diagonal $G(t)$.
    - `group`: the hidden sites' group (default: the largest the activation admits).
    - `boundary`: `"fixed"` ($g_0 = g_L = I$) or `"absorb"` (the linear embedding and
      readout absorb $g_0$, $g_L$).
    - `unsafe`: allow a hidden group the activation does not admit (negative controls).

    **Returns:** a [`gaugejax.Gauge`][] acting on the ResNet module itself.
    """
    if not isinstance(resnet, ResNet):
        raise TypeError(f"`resnet`: expected a gaugejax.nn.ResNet, received {type(resnet).__name__}.")
    absorb_in, absorb_out = _boundary_sites(resnet, boundary, "ResNet")
    L, d, m, h = resnet.depth, resnet.dim, resnet.width, resnet.h
    stream = GL if stream_group is None else stream_group
    names: list[str | None] = [f"s{l}" for l in range(L + 1)]
    if not absorb_in:
        names[0] = None
    if not absorb_out:
        names[L] = None
    sites: dict[str, AbstractGroup] = {n: _make_group(stream, d) for n in names if n is not None}
    couplings: list = []
    for l in range(L):
        k = f"k{l}"
        sites[k] = _hidden_group(resnet.activation, m, group, unsafe, k)
        couplings += _block_couplings("", l, names[l], names[l + 1], k, h)
    couplings += _boundary_couplings("", absorb_in, absorb_out, "s0", f"s{L}", resnet)
    return Gauge(_ordered(sites), couplings, resnet)


def node_gauge(
    node: NeuralODE,
    *,
    stream_group: Any = None,
    group: Any = None,
    boundary: str = "fixed",
    unsafe: bool = False,
    time_dependent: bool = True,
) -> Gauge:
    """The parameter-space gauge of a parametric neural ODE on its time grid.

    Sites `"s0" .. "s{N}"` (the stream at the grid nodes; `"s0"`, `"s{N}"` only with
    `boundary="absorb"`) and `"k0" .. "k{N}"` (hidden units at each node). The connection
    law $A' = GAG^{-1} + \\dot G G^{-1}$ is discretised as a [`gaugejax.Link`][] (a forward
    difference of $G$; backward at the last node): on a uniform grid it is exactly the
    lattice gauge of the Euler ResNet `discretize(node, N)`, and $O(h)$ for the ODE's flow
    map (module docstring). On a non-uniform grid it is not that ResNet's gauge:
    `discretize` samples the field at $lT/N$, between the nodes, where the interpolated
    parameters mix two nodes' group elements.

    With `time_dependent=False`, the subgroup with the same elements at every grid node: one
    stream site `"s"` (with `boundary="absorb"`; $G$ is then pinned to $I$ by fixed boundaries)
    acting as $A_i \\to G A_i G^{-1}$, $W_{1,i} \\to k W_{1,i} G^{-1}$, $W_{2,i} \\to G W_{2,i}
    k^{-1}$, $c_i \\to G c_i$, and one hidden site `"k"`. $\\dot G = 0$, so the connection law
    holds exactly, and since the grid values are interpolated linearly the vector field
    itself is transformed exactly at every $t$: this gauge is an exact symmetry of the ODE
    and of every fixed-step solve of it. Under an adaptive step-size controller no element
    is exact: in exact arithmetic the controller's error norm is invariant only under
    (signed) permutations of the state, and in floating point even those move the solve by
    a fraction of the solver tolerance (its steps follow rounding-level differences), so
    sweep it with `rtol` tied to that tolerance. [`gaugejax.infer_gauge`][] finds this
    group from the traced solve, with $S_d$ on the state under an adaptive controller.

    **Arguments:** as for [`gaugejax.resnet_gauge`][]; `node` must have a
    [`gaugejax.nn.ParametricField`][] (with at least two grid nodes unless
    `time_dependent=False`).

    **Returns:** a [`gaugejax.Gauge`][] acting on the NeuralODE module itself.
    """
    if not isinstance(node, NeuralODE) or not isinstance(node.field, ParametricField):
        raise TypeError("`node`: expected a gaugejax.nn.NeuralODE with a gaugejax.nn.ParametricField.")
    field = node.field
    N = field.num_nodes - 1
    if not time_dependent:
        return _constant_node_gauge(node, stream_group, group, boundary, unsafe)
    if N < 1:
        raise ValueError("`node.field` has one grid node; its gauge needs at least two (a constant field has no link).")
    if isinstance(field.ts, jax.ShapeDtypeStruct) or not is_concrete(field.ts):
        # (a model from equinox.filter_eval_shape has no grid values either)
        raise ValueError("`node.field.ts` must be concrete to build the gauge (the steps h_i are static).")
    ts = [float(t) for t in field.ts]
    absorb_in, absorb_out = _boundary_sites(node, boundary, "NeuralODE")
    stream = GL if stream_group is None else stream_group
    names: list[str | None] = [f"s{i}" for i in range(N + 1)]
    if not absorb_in:
        names[0] = None
    if not absorb_out:
        names[N] = None
    sites: dict[str, AbstractGroup] = {n: _make_group(stream, field.dim) for n in names if n is not None}
    couplings: list = []
    for i in range(N + 1):
        k = f"k{i}"
        sites[k] = _hidden_group(field.activation, field.width, group, unsafe, k)
        if i < N:
            couplings += _block_couplings("field.", i, names[i], names[i + 1], k, ts[i + 1] - ts[i])
        else:  # last node: backward link s_{N-1} -> s_N, everything else at s_N
            couplings.append(Link(f"field.A[{i}]", out_site=names[N], in_site=names[N - 1], h=ts[N] - ts[N - 1]))
            couplings += [Produce(f"field.W1[{i}]", 0, k), Produce(f"field.b[{i}]", 0, k), Consume(f"field.W2[{i}]", 1, k)]
            if names[N] is not None:
                couplings += [Consume(f"field.W1[{i}]", 1, names[N]), Produce(f"field.W2[{i}]", 0, names[N]),
                              Produce(f"field.c[{i}]", 0, names[N])]
    couplings += _boundary_couplings("", absorb_in, absorb_out, "s0", f"s{N}", node)
    return Gauge(_ordered(sites), couplings, node)


def _constant_node_gauge(node: NeuralODE, stream_group: Any, group: Any, boundary: str, unsafe: bool) -> Gauge:
    field = node.field
    absorb_in, absorb_out = _boundary_sites(node, boundary, "NeuralODE")
    stream = GL if stream_group is None else stream_group
    s = "s" if absorb_in else None
    sites: dict[str, AbstractGroup] = {"s": _make_group(stream, field.dim)} if s else {}
    sites["k"] = _hidden_group(field.activation, field.width, group, unsafe, "k")
    couplings: list = []
    for i in range(field.num_nodes):
        couplings += [Produce(f"field.W1[{i}]", 0, "k"), Produce(f"field.b[{i}]", 0, "k"),
                      Consume(f"field.W2[{i}]", 1, "k")]
        if s:
            couplings += [Produce(f"field.A[{i}]", 0, s), Consume(f"field.A[{i}]", 1, s),
                          Consume(f"field.W1[{i}]", 1, s), Produce(f"field.W2[{i}]", 0, s),
                          Produce(f"field.c[{i}]", 0, s)]
    couplings += _boundary_couplings("", absorb_in, absorb_out, "s", "s", node)
    return Gauge(sites, couplings, node)


def _ordered(sites: dict[str, AbstractGroup]) -> dict[str, AbstractGroup]:
    """Streams first (by depth), then hidden sites (by depth): stable, readable tables."""
    def key(name: str) -> tuple[int, int]:
        return (0 if name[0] == "s" else 1, int(name[1:]))

    return {n: sites[n] for n in sorted(sites, key=key)}


@derive_gauge.register
def _(model: ResNet, **kwargs: Any) -> Gauge:
    return resnet_gauge(model, **kwargs)


@derive_gauge.register
def _(model: NeuralODE, **kwargs: Any) -> Gauge:
    return node_gauge(model, **kwargs)
