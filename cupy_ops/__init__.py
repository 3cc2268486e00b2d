"""cupy-ops: LLM-serving CUDA kernels compiled at run time with NVRTC (through CuPy), launched on torch tensors
or CuPy arrays, and registered as `torch.ops.cupy_ops.*` custom ops. No compiled extension."""

__version__ = "0.1.0"

# Importing an op module registers torch.ops.cupy_ops.<op>.
from .ops.merge_attn_states import merge_attn_states, merge_attn_states_ref  # noqa: E402

__all__ = ["__version__", "merge_attn_states", "merge_attn_states_ref"]
