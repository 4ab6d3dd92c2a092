"""Registers the built-in methods (importing a method module registers its descriptor).

The order is the registry's order, which is the order model transforms are applied: the first
registered transform sits innermost, next to the block (DTR masks the block input; DMP's prompt
is added outside it, before the routed block).
"""
from trainers.methods import dtr  # noqa: F401
from trainers.methods import ant  # noqa: F401
from trainers.methods import curriculum  # noqa: F401
from trainers.methods import dmp  # noqa: F401
from trainers.methods import meme  # noqa: F401
