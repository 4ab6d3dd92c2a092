"""The ``methods:`` section: one optional sub-config per method (each defined next to its code)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainers.methods.ant import AntConfig
from trainers.methods.curriculum import CurriculumConfig
from trainers.methods.dtr import DtrConfig

__all__ = ["MethodsConfig"]


@dataclass(frozen=True)
class MethodsConfig:
    ant: Optional[AntConfig] = None
    dtr: Optional[DtrConfig] = None
    curriculum: Optional[CurriculumConfig] = None

    def enabled(self) -> list[str]:
        return [name for name in ("dtr", "ant", "curriculum") if getattr(self, name) is not None]
