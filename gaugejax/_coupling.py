"""Couplings: which leaf axis of a parameter pytree produces or consumes which site.

Three kinds cover every architecture in MATH.md:

- *linear* ([`gaugejax.Produce`][], [`gaugejax.Consume`][]): the axis transforms by $g$
  (a layer writes the site) or by $g^{-T}$ (a layer reads it), so that a weight between
  sites $g'$ and $g$ transforms as $W \\mapsto g W g'^{-1}$;
- *link* ([`gaugejax.Link`][]): a matrix $A$ entering the model as $U = I + hA$ between two
  sites transforms affinely, $U \\mapsto g_{\\mathrm{out}} U g_{\\mathrm{in}}^{-1}$, i.e.
  $A \\mapsto g_{\\mathrm{out}} A g_{\\mathrm{in}}^{-1} + (g_{\\mathrm{out}} g_{\\mathrm{in}}^{-1} - I)/h$
  (the lattice gauge field of a ResNet);
- *translation* ([`gaugejax.Translate`][]): the leaf is shifted, $b \\mapsto b + t$, after its
  linear couplings (the key-bias shift of attention).

Leaves are named by their path in the pytree, as `jax.tree_util.keystr` writes it
(`"layers[0].weight"`, `"[0][1]"`, `"['params']['Dense_0']['kernel']"`) or in the simple
form `"layers/0/weight"`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Produce:
    """Axis `axis` of leaf `leaf` is written by site `site`: it transforms by $g$.

    **Arguments:**

    - `leaf`: the leaf's path, e.g. `"layers[0].weight"` (a key path from
      `jax.tree_util.tree_flatten_with_path` is accepted too; the gauge stores the string).
    - `axis`: the axis indexed by the site (negative values count from the end).
    - `site`: the site's name.
    - `batch_axes`: for a batched site (e.g. one $GL(d_k)$ per head), the leaf axes that
      carry the site's batch dimensions, in order.
    - `view`: act on the leaf reshaped to this shape, a refinement of its own (each leaf axis
      split into consecutive axes): a $(H d_k, d)$ query projection viewed as $(H, d_k, d)$
      carries one $GL(d_k)$ per head on axis 1, batched over axis 0. `axis` and
      `batch_axes` then count the view's axes. Every linear coupling of a leaf uses the
      same view.
    """

    leaf: str
    axis: int
    site: str
    batch_axes: tuple[int, ...] = ()
    view: tuple[int, ...] | None = None

    kind = "produce"


@dataclasses.dataclass(frozen=True)
class Consume:
    """Axis `axis` of leaf `leaf` is read from site `site`: it transforms by $g^{-T}$, so
    that `W -> W g^{-1}` for a weight whose input axis is `axis`.

    **Arguments:** as for [`gaugejax.Produce`][].
    """

    leaf: str
    axis: int
    site: str
    batch_axes: tuple[int, ...] = ()
    view: tuple[int, ...] | None = None

    kind = "consume"


@dataclasses.dataclass(frozen=True)
class Link:
    """A 2-D leaf $A$ that enters the model as $U = I + hA$, linking site `in_site` to
    site `out_site`: $U \\mapsto g_{\\mathrm{out}} U g_{\\mathrm{in}}^{-1}$.

    Either site may be `None`, meaning it is held at the identity (e.g. the first stream
    site of a ResNet whose embedding is not part of the parameters).

    **Arguments:**

    - `leaf`: the path of the 2-D leaf $A$, laid out `(out, in)`.
    - `out_site`, `in_site`: site names or `None`.
    - `h`: the step size in $U = I + hA$.
    """

    leaf: str
    out_site: str | None
    in_site: str | None
    h: float

    kind = "link"


@dataclasses.dataclass(frozen=True)
class Translate:
    """Leaf `leaf` is shifted by the element of translation site `site` (a
    [`gaugejax.Translation`][] of the leaf's shape), after its linear couplings.

    **Arguments:**

    - `leaf`: the leaf's path.
    - `site`: the name of a translation site.
    """

    leaf: str
    site: str

    kind = "translate"


Coupling = Produce | Consume | Link | Translate
