"""Merge methods: one small module per method, all behind one registry.

Importing this package registers every method. Look one up with
:func:`get_method`; list them with :func:`method_names`.
"""
from evomerge.errors import MergeError
from evomerge.methods.base import (  # noqa: F401
    MergeInputs,
    MergeMethod,
    ParamDef,
    SparsifyAux,
    register,
    registered,
)

# Each module registers its method(s) on import (task_arithmetic registers the whole
# TIES/DARE/breadcrumbs/DELLA family, built on the helper modules sparsify and consensus).
from evomerge.methods import (  # noqa: F401,E402
    linear,
    slerp,
    nuslerp,
    multislerp,
    karcher,
    task_arithmetic,
    model_stock,
    passthrough,
    nearswap,
    sce,
)


def get_method(name: str) -> MergeMethod:
    try:
        return registered()[name]
    except KeyError:
        known = ", ".join(sorted(registered()))
        raise MergeError(f"unknown merge_method {name!r}; known methods: {known}.") from None


def method_names() -> list[str]:
    return sorted(registered())
