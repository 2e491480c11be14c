"""Deprecated module: [`gaugejax.GL`][] itself is now LAPACK-free on small matrices
(`gaugejax/_groups/_linalg.py`). Kept only until the last imports move."""

from ._groups import GL as PureGL
from ._groups._linalg import expm as expm, inv as inv


__all__ = ["PureGL", "expm", "inv"]
