"""cupy-ops: LLM-serving CUDA kernels compiled at run time with NVRTC (through CuPy), launched on torch tensors
or CuPy arrays, and registered as `torch.ops.cupy_ops.*` custom ops. No compiled extension.

Every op of `cupy_ops.ops` is exported here under its name (the eager entry point, vLLM's schema and argument
order) with its pure-torch reference under the reference's own name (`<name>_ref`)."""

__version__ = "0.1.0"

from .ops import ops as _ops  # noqa: E402 - importing the package registers every op

__all__ = ["__version__"]
for _name, _op in _ops().items():
    globals()[_name] = _op.public
    globals()[_op.reference.__name__] = _op.reference
    __all__ += [_name, _op.reference.__name__]
del _name, _op

from .ops.selective_scan_ref import selective_scan_fn  # noqa: E402 - mamba_ssm's functional form, on our kernel

__all__ += ["selective_scan_fn"]
