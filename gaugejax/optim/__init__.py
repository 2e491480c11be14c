"""optax transformations that move along, or project out, the gauge orbit."""

from ._transforms import (
    STATE_RULES as STATE_RULES,
    GaugeMoveState as GaugeMoveState,
    canonicalize_every as canonicalize_every,
    project_horizontal as project_horizontal,
    teleport_every as teleport_every,
    transport_state as transport_state,
)
