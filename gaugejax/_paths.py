"""Leaf paths: how a coupling names a leaf of a parameter pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np


def canonical(path: tuple[Any, ...]) -> str:
    """The canonical string of a key path: `keystr` without a leading dot."""
    return jtu.keystr(path).lstrip(".")


def simple(path: tuple[Any, ...]) -> str:
    return jtu.keystr(path, simple=True, separator="/")


def flatten(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """`[(canonical path, leaf)]` and the treedef."""
    with_path, treedef = jtu.tree_flatten_with_path(tree)
    return [(canonical(p), leaf) for p, leaf in with_path], treedef


def lookup_table(tree: Any) -> dict[str, int]:
    """Map every accepted spelling of each leaf's path to the leaf's index."""
    with_path, _ = jtu.tree_flatten_with_path(tree)
    table: dict[str, int] = {}
    for i, (p, _) in enumerate(with_path):
        table[canonical(p)] = i
        table.setdefault(simple(p), i)
    return table


_KEY_TYPES = (jtu.SequenceKey, jtu.DictKey, jtu.GetAttrKey, jtu.FlattenedIndexKey)


def normalise(path: Any) -> str:
    """A leaf path as a string without a leading dot: a string as given, or a key path
    (as `jax.tree_util.tree_flatten_with_path` yields) written canonically."""
    if isinstance(path, tuple) and all(isinstance(k, _KEY_TYPES) for k in path):
        return canonical(path)
    if not isinstance(path, str):
        raise TypeError(
            "a leaf path must be a string such as 'layers[0].weight' (or a key path from "
            f"jax.tree_util.tree_flatten_with_path), got {path!r} of type {type(path).__name__}."
        )
    return path.lstrip(".")


def is_arraylike(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct, np.generic))


def close_matches(path: str, options: list[str], n: int = 3) -> str:
    import difflib

    found = difflib.get_close_matches(path, options, n=n)
    return f" Did you mean {', '.join(repr(f) for f in found)}?" if found else ""
