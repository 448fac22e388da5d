"""Rectified-flow maths: timestep sampling, the training objective (flow matching + REPA) and samplers.

Convention (see docs/INTERFACES.md): t = 0 is pure noise, t = 1 is data, x_t = t·x + (1 − t)·ε, v = x − ε.
"""
from .timesteps import shift_time, sample_timesteps
from .objective import FlowObjective, FlowObjectiveConfig, ConditionDropout
from .samplers import SamplerConfig, sample, time_grid, make_noise, SAMPLERS

__all__ = [
    "shift_time", "sample_timesteps", "FlowObjective", "FlowObjectiveConfig", "ConditionDropout",
    "SamplerConfig", "sample", "time_grid", "make_noise", "SAMPLERS",
]
