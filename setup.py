"""The one C extension: everything else is in pyproject.toml.

`engine.stats._fused` is optional: where it cannot be built (no C compiler), the install goes on
and the statistics take the torch path, which gives the same bytes, only slower.
"""

from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("engine/stats/csrc")

setup(
    ext_modules=[
        Extension(
            "engine.stats._fused",
            sorted(str(p) for p in CSRC.glob("*.c")),  # one file per part: csrc/fused.h lists them
            depends=[str(CSRC / "fused.h")],
            extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],  # no FMA: the eager ops round twice
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
