"""Method name -> implementation: the one list of what `--method` accepts."""

from __future__ import annotations

from engine.errors import SpecError
from engine.methods.base import Method
from engine.methods.dare import DareLinear, DareTies
from engine.methods.linear import Linear
from engine.methods.task_arithmetic import TaskArithmetic

METHODS: dict[str, Method] = {m.name: m for m in (Linear(), TaskArithmetic(), DareLinear(), DareTies())}


def get_method(name: str) -> Method:
    """The method registered as `name`, or a `SpecError` listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise SpecError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None
