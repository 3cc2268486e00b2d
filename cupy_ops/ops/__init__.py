"""One module per op: validation, dtype dispatch and launch configuration, plus its pure-torch reference.

Each module exposes OP, SCHEMA, the public function of the same name, `<op>_ref` and `instantiations()`.
"""

import importlib

# Every op, for warm-up, self-check, benchmarks and the compile tests.
ALL_OPS = ("merge_attn_states",)


def op_module(name: str):
    """The module `cupy_ops.ops.<name>` (the package attribute of that name is shadowed by nothing)."""
    return importlib.import_module(f"{__name__}.{name}")


__all__ = ["ALL_OPS", "op_module"]
