"""One module per op, each declaring one `cupy_ops._runtime.Op` (top_k_per_row declares prefill and decode), and
modules of what ops share (topk_rows: the top-k ops' row plans; selective_scan_ref: the scan's reference): importing
this package imports every module in it, which registers every op (`torch.ops.cupy_ops.<name>`, `cupy_ops.<name>`,
warm-up, check, benchmarks and tests all read `ops()`)."""

from __future__ import annotations

import importlib
import pkgutil

from .._runtime import Op, registry

NAMESPACE = "cupy_ops"

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def ops() -> dict[str, Op]:
    """Every op of this package, by name, in name order."""
    found = {op.name: op for op in registry.values() if op.namespace == NAMESPACE}
    return dict(sorted(found.items()))


def kernels(names=None) -> list:
    """Every kernel the ops list (all of them, or those `names` give), once each: top_k_per_row_prefill and
    top_k_per_row_decode share theirs."""
    every = ops()
    selected = every.values() if names is None else (every[name] for name in names)
    return list(dict.fromkeys(k for op in selected for k in op.kernels))


def reference(name: str):
    """The pure-torch reference of op `name`: `<name>_ref` in its module."""
    return ops()[name].reference


__all__ = ["NAMESPACE", "kernels", "ops", "reference"]
