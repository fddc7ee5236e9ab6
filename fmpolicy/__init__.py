"""fmpolicy: a flow-matching action expert for VLA-style robot policies.

Time convention everywhere: t = 0 is noise, t = 1 is the action; x_t = t * action + (1 - t) * noise.
"""

from fmpolicy.config import (
    ExpertConfig,
    FlowConfig,
    NormalizationConfig,
    PolicyConfig,
    SamplerConfig,
    config_from_dict,
    config_to_dict,
    make_expert_config,
)
from fmpolicy.errors import CheckpointError, ConfigError, FmPolicyError, InputError
from fmpolicy.policy import FlowPolicy

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ExpertConfig",
    "FlowConfig",
    "FlowPolicy",
    "FmPolicyError",
    "InputError",
    "NormalizationConfig",
    "PolicyConfig",
    "SamplerConfig",
    "config_from_dict",
    "config_to_dict",
    "make_expert_config",
]
