"""Reference models, each with a gauge the engine derives for it."""

from ._mlp import MLP as MLP
