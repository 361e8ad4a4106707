"""Method name -> implementation: the one list of what `--method` accepts."""

from __future__ import annotations

from engine.errors import SpecError
from engine.methods.base import Method
from engine.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from engine.methods.dare import DareLinear, DareTies
from engine.methods.della import Della, DellaLinear
from engine.methods.linear import Linear
from engine.methods.model_stock import ModelStock
from engine.methods.passthrough import Passthrough
from engine.methods.ram import Ram, RamPlusTl
from engine.methods.sce import Sce
from engine.methods.slerp import Slerp
from engine.methods.task_arithmetic import TaskArithmetic
from engine.methods.ties import Ties

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Linear(),
        TaskArithmetic(),
        DareLinear(),
        DareTies(),
        Ties(),
        Breadcrumbs(),
        BreadcrumbsTies(),
        Della(),
        DellaLinear(),
        Slerp(),
        ModelStock(),
        Passthrough(),
        Sce(),
        Ram(),
        RamPlusTl(),
    )
}


def get_method(name: str) -> Method:
    """The method registered as `name`, or a `SpecError` listing the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise SpecError(f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}") from None
