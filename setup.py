"""The one C extension: everything else is in pyproject.toml.

`engine.stats._fused` is optional: where it cannot be built (no C compiler), the install goes on
and the statistics take the torch path, which gives the same bytes, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "engine.stats._fused",
            ["engine/stats/_fused.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],  # no FMA: the eager ops round twice
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
