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

from . import nn as nn, optim as optim
from ._activations import (
    activation_family as activation_family,
    admits as admits,
    default_group as default_group,
    identity as identity,
    register_activation as register_activation,
)
from ._align import (
    align as align,
    interpolate as interpolate,
    loss_barrier as loss_barrier,
    repair as repair,
)
from ._balance import (
    balance as balance,
    balance_residual as balance_residual,
    degenerate_units as degenerate_units,
    moment_map as moment_map,
)
from ._canonical import canonicalize as canonicalize, gauge_distance as gauge_distance
from ._continuum import (
    continuum_report_rows as continuum_report_rows,
    continuum_tables as continuum_tables,
)
from ._diffeo import (
    AbstractDiffeo as AbstractDiffeo,
    AbstractTimeReparam as AbstractTimeReparam,
    Diffeo as Diffeo,
    IdentityTime as IdentityTime,
    LinearDiffeo as LinearDiffeo,
    NearIdentityDiffeo as NearIdentityDiffeo,
    PiecewiseLinearLiePath as PiecewiseLinearLiePath,
    SineWarp as SineWarp,
    SmoothLiePath as SmoothLiePath,
    TimeReparam as TimeReparam,
    TimeScale as TimeScale,
    TransformedField as TransformedField,
    connection_transform as connection_transform,
    transform_node as transform_node,
    validate_diffeo as validate_diffeo,
)
from ._eqx_attention import multihead_attention_gauge as multihead_attention_gauge
from ._feedforward import derive_gauge as derive_gauge, feedforward_gauge as feedforward_gauge
from ._functional import (
    FunctionalDimension as FunctionalDimension,
    functional_dimension as functional_dimension,
    probe_inputs as probe_inputs,
)
from ._horizontal import (
    HorizontalConvergenceWarning as HorizontalConvergenceWarning,
    horizontal as horizontal,
    vertical_adjoint as vertical_adjoint,
    vertical_coordinates as vertical_coordinates,
)
from ._infer import (
    GaugeCertificationError as GaugeCertificationError,
    GaugeDifference as GaugeDifference,
    InferenceError as InferenceError,
    InferredGauge as InferredGauge,
    Restriction as Restriction,
    infer_gauge as infer_gauge,
    same_gauge as same_gauge,
)
from ._lattice import node_gauge as node_gauge, resnet_gauge as resnet_gauge
from ._minilm import MiniLM as MiniLM, load_minilm as load_minilm
from ._noether import (
    NoetherMonitor as NoetherMonitor,
    charge_change as charge_change,
    noether_charges as noether_charges,
)
from ._observables import (
    FactoredMatrix as FactoredMatrix,
    attention_orbit_dim as attention_orbit_dim,
    ov_circuit as ov_circuit,
    qk_circuit as qk_circuit,
    transformer_orbit_dim as transformer_orbit_dim,
)
from ._particles import (
    particle_coefficients as particle_coefficients,
    particle_flow as particle_flow,
    particle_gauge_transform as particle_gauge_transform,
    particle_residual_stack as particle_residual_stack,
    particle_velocity as particle_velocity,
)
from ._processing import (
    ProcessingReport as ProcessingReport,
    balance_attention as balance_attention,
    balanced_factors as balanced_factors,
    center_writing_weights as center_writing_weights,
    fold_norm_gains as fold_norm_gains,
    fold_value_biases as fold_value_biases,
    head_order as head_order,
    layernorm_to_rmsnorm as layernorm_to_rmsnorm,
    process_weights as process_weights,
)
from ._sweep import (
    InvarianceError as InvarianceError,
    InvarianceReport as InvarianceReport,
    check_invariance as check_invariance,
    choose_chunk_size as choose_chunk_size,
)
from ._teleport import grad_norm_squared as grad_norm_squared, teleport as teleport
from ._transformer_gauge import transformer_gauge as transformer_gauge
