"""The five methods as slot plug-ins; ``compose()`` binds them into a plan."""
from trainers.methods.compose import TESTED_COMBINATIONS, Plan, compose
from trainers.methods.config import MethodsConfig
from trainers.methods.intervals import Intervals, partition_dp, resolve_intervals
from trainers.methods.protocols import BuildContext

__all__ = ["BuildContext", "Intervals", "MethodsConfig", "Plan", "TESTED_COMBINATIONS", "compose",
           "partition_dp", "resolve_intervals"]
