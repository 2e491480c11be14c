from .base import AbstractGroup as AbstractGroup, AxisFactors as AxisFactors
from .diagonal import PositiveDiagonal as PositiveDiagonal, SignFlip as SignFlip
from .linear import GL as GL, Orthogonal as Orthogonal
from .monomial import (
    Monomial as Monomial,
    PositiveMonomial as PositiveMonomial,
    SignedPermutation as SignedPermutation,
)
from .permutation import Permutation as Permutation
from .translation import Translation as Translation
