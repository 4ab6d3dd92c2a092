"""The methods as slot plug-ins: a registry of descriptors, ``compose()`` binds them into a plan."""
from trainers.methods.compose import NullPacer, Plan, combination_key, compose
from trainers.methods.config import MethodsConfig
from trainers.methods.intervals import Intervals, partition_dp, resolve_intervals
from trainers.methods.protocols import BuildContext, Contribution, ParamGroup
from trainers.methods.registry import METHODS, MethodDescriptor, register, supported_combinations, unregister

__all__ = ["BuildContext", "Contribution", "Intervals", "METHODS", "MethodDescriptor", "MethodsConfig", "NullPacer",
           "ParamGroup", "Plan", "combination_key", "compose", "partition_dp", "register", "resolve_intervals",
           "supported_combinations", "unregister"]
from trainers.methods import builtin  # noqa: E402,F401 - registers the built-in methods
