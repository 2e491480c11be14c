"""Reference models, each with a gauge the engine derives for it."""

from ._mlp import MLP as MLP
from ._node import NeuralODE as NeuralODE, ParametricField as ParametricField
from ._resnet import ResNet as ResNet, continuum_limit as continuum_limit, discretize as discretize
from ._transformer import Transformer as Transformer
