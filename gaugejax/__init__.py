import importlib.metadata

from ._coupling import Consume as Consume, Link as Link, Produce as Produce, Translate as Translate
from ._gauge import Gauge as Gauge
from ._groups import (
    GL as GL,
    AbstractGroup as AbstractGroup,
    AxisFactors as AxisFactors,
    Monomial as Monomial,
    Orthogonal as Orthogonal,
    Permutation as Permutation,
    PositiveDiagonal as PositiveDiagonal,
    PositiveMonomial as PositiveMonomial,
    SignedPermutation as SignedPermutation,
    SignFlip as SignFlip,
    Translation as Translation,
)


try:
    __version__ = importlib.metadata.version("gaugejax")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover
    __version__ = "0.0.0"

from . import nn as nn
from ._activations import (
    activation_family as activation_family,
    admits as admits,
    default_group as default_group,
    identity as identity,
    register_activation as register_activation,
)
from ._balance import (
    balance as balance,
    balance_residual as balance_residual,
    moment_map as moment_map,
)
from ._feedforward import derive_gauge as derive_gauge, feedforward_gauge as feedforward_gauge
from ._functional import (
    FunctionalDimension as FunctionalDimension,
    functional_dimension as functional_dimension,
    probe_inputs as probe_inputs,
)
from ._sweep import (
    InvarianceError as InvarianceError,
    InvarianceReport as InvarianceReport,
    check_invariance as check_invariance,
    choose_chunk_size as choose_chunk_size,
)
