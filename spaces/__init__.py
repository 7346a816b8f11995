"""Search-space files (the shipped *.yaml beside this module) and their loader."""

from spaces.space import (
    DefineByRun,
    Param,
    Scheduler,
    SearchSpace,
    fits,
    load_space,
    parse_space,
)

__all__ = ["DefineByRun", "Param", "Scheduler", "SearchSpace", "fits", "load_space", "parse_space"]
