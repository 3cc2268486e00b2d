"""Ops: an op file declares what is particular to it; `Op` does the rest, once for every op.

An op declares its schema (vLLM's), its tensor arguments (`TensorArg`: accepted dtypes, symbolic shape), its
params struct(s) (`params.CStruct`), its kernels, a `check` for rules across arguments, a `plan` that turns a
validated call into launch steps (`Launch`, `Memset`, `Scratch`), and a pure-torch `reference`. From that
`Op` builds the public function and registers `torch.ops.<namespace>.<name>`; every call is then:

- **routed**: inside torch.compile, or on fake/functional tensors, to the registered op (its fake kernel is a
  no-op: ops mutate their outputs and return nothing); CPU tensors to the reference; CuPy arrays to a launch on
  CuPy's current stream; meta tensors to validation only; CUDA tensors to a launch on torch's current stream.
- **validated** before anything is launched or written: kinds, devices, dtypes, shapes, strides, scalar
  types, the op's own rules, and memory overlap of written tensors; errors are ValueError/TypeError naming the
  op and the argument.
- **cached**: a CUDA call whose layout (every tensor's type, dtype, device, shape and strides, the scalar
  arguments and the 16-byte alignment of pointers the plan reads) passed validation before skips validation
  and planning. A call like one of the two most recent such ones runs `fastpath.recent_call`, straight-line code
  written for that layout around dynamo's C++ metadata guard (`arrays.metadata_guard`); other calls build a dict
  key. Pointers are read and overlap is checked on every call.

Scalar arguments are part of the layout, so a plan (grid, params) may depend on them; a plan never depends on
the data (lengths read on the device): a CUDA graph replays it with new data.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence

import torch

from . import arrays, fastpath, launcher, validation
from .launcher import Kernel, LaunchConfig
from .params import CStruct
from .records import Call, Launch, Memset, Scratch, TensorArg, TensorInfo

__all__ = ["Call", "Launch", "LaunchConfig", "Memset", "Op", "Scratch", "TensorArg", "TensorInfo", "registry"]

_MAX_CACHED_LAYOUTS = 4096
_current_device = getattr(torch._C, "_cuda_getDevice", None)  # absent from CPU-only torch builds
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
_is_compiling = torch.compiler.is_compiling
# A constant True while dynamo traces, else False: one Python call, where is_compiling() makes two.
_is_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", _is_compiling)


_MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's grid limits in blocks (x, y, z)
# Tensor types the eager path validates and launches itself; other subclasses (fake, functional) go through the
# dispatcher. An nn.Parameter is a plain tensor with a flag: through the dispatcher a Parameter mixed with meta
# tensors would reach the no-op fake kernel and write nothing.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


# ---- the runtime's form of a plan ------------------------------------------------------------------------------


class _LaunchStep:
    __slots__ = ("launcher", "indices", "pointers", "tail", "pack_into")

    def __init__(self, step: Launch, device: int, pointer_index: Callable[[str], int]):
        self.tail = step.params.pack(step.values)  # first: a value past its field fails before the driver is asked
        self.launcher = launcher.Launcher(step.kernel, device, step.config)
        self.indices = [pointer_index(f.source) for f in step.params.pointers]  # None: a null pointer
        self.pointers = _picker(self.indices)
        self.pack_into = step.params.pack_into

    def run(self, pointers: list, stream: int) -> None:
        self.launcher.launch(stream, self.pack_into, (*self.pointers(pointers), self.tail))


class _MemsetStep:
    __slots__ = ("index", "nbytes", "value", "device")

    def __init__(self, step: Memset, device: int, pointer_index: Callable[[str], int]):
        self.index, self.nbytes, self.value, self.device = pointer_index(step.target), step.nbytes, step.value, device

    def run(self, pointers: list, stream: int) -> None:
        launcher.memset_async(pointers[self.index], self.value, self.nbytes, stream, self.device)


class _Layout:
    """A validated CUDA layout: its launch steps, and what each call with it still checks."""

    __slots__ = ("match", "scalars", "scalar_types", "align", "device", "given", "sized", "scratch", "steps",
                 "overlaps", "recent_call")

    def __init__(self, scalars, align, device, given, sized, scratch, steps, overlaps, match=None):
        self.scalars, self.scalar_types = scalars, tuple(map(type, scalars))
        self.align, self.device = align, device
        self.given = given          # per tensor argument (schema order): given, or an absent optional one
        self.sized = sized          # indices of the given tensors with elements: a null pointer there is a freed
                                    # storage (FSDP's resize_(0)), left to the full check
        self.recent_call = None     # fastpath.recent_call, written when the layout first becomes the recent one
        self.scratch = scratch      # bytes per scratch buffer, in the order of their pointer slots
        self.steps = steps
        # (i, j, extent i, extent j, same-view allowed, disjoint offset) for each pair to check; disjoint offset:
        # pointer j - pointer i where the two layouts' spans overlap but no element is shared (proven by the full
        # check: views of one buffer, e.g. the halves of xz.chunk(2, dim=1)), else None
        self.overlaps = overlaps
        self.match = match          # metadata guard of the tensors that made it, or None


def _layout_key(tensors: list, scalars: tuple, align: tuple) -> tuple:
    """The dict key of a CUDA call's layout. `is_contiguous() or stride()`: True, or the strides (contiguity
    ignores the stride of a size-1 dim, which only ever multiplies index 0); requires_grad and the negative bit,
    which validation refuses on some tensors. Scalars carry their types: 1, 1.0 and True are equal in Python but
    not to validation."""
    return (tuple(None if type(t) is arrays._Absent else
                  (type(t), t.shape, t.dtype, t.get_device(), t.is_contiguous() or t.stride(), t.requires_grad,
                   t.is_neg()) for t in tensors),
            tuple((type(v), v) for v in scalars), align)


# ---- the op --------------------------------------------------------------------------------------------------

_LIBRARIES: dict[str, torch.library.Library] = {}
registry: dict[str, Op] = {}  # qualified name ("cupy_ops::merge_attn_states") -> Op


class Op:
    """One op: `Op(schema, tensors=..., kernels=..., params=..., check=..., plan=..., reference=...)`.

    check(call): raise (`call.reject`) on what the declarations cannot say; may be None.
    plan(call) -> list of steps (`Launch`, `Memset`, `Scratch`) for a validated CUDA call; [] launches nothing.
    reference(*args, **kwargs) -> one new tensor (or None) per written argument, in schema order: the pure-torch
        semantics, and the op's CPU kernel.
    examples(device) -> [(label, args)]: random valid calls for `python -m cupy_ops check` (fresh data each time).
    compare(op, args, expected) -> None or what differs, for written arguments after a call; default: every written
        tensor within `testing.TOLERANCE` of the float64 reference (`reference(..., compute_dtype=float64)`).
    """

    def __init__(self, schema: str, *, tensors: Sequence[TensorArg], kernels: Sequence[Kernel],
                 params: CStruct | Sequence[CStruct], plan: Callable, reference: Callable,
                 check: Callable | None = None, examples: Callable | None = None, compare: Callable | None = None,
                 namespace: str = "cupy_ops", doc: str | None = None):
        parsed = torch._C.parse_schema(schema)
        self.name, self.namespace, self.schema = parsed.name, namespace, schema
        self.qualified_name = f"{namespace}::{self.name}"
        self.kernels = tuple(kernels)
        self.params = (params,) if isinstance(params, CStruct) else tuple(params)
        self.check, self.plan, self.reference = check, plan, reference
        self.examples, self.compare = examples, compare
        self.arguments = [a.name for a in parsed.arguments]
        self.defaults = {a.name: a.default_value for a in parsed.arguments if a.has_default_value()}
        self.written = [a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write]
        is_tensor = {a.name: "Tensor" in str(a.type) for a in parsed.arguments}
        self.optional = {a.name for a in parsed.arguments if isinstance(a.type, torch.OptionalType)}
        self.scalar_types = {a.name: str(a.type).replace("Optional[", "").rstrip("]")
                             for a in parsed.arguments if not is_tensor[a.name]}
        reserved = {"op", "dims", "device", "reject"} & set(self.arguments)
        if reserved:
            raise ValueError(f"{self.name}: argument names {sorted(reserved)} are taken by `Call`")
        declared = {t.name: t for t in tensors}
        schema_tensors = [n for n in self.arguments if is_tensor[n]]
        if sorted(declared) != sorted(schema_tensors):
            raise ValueError(f"{self.name}: TensorArg declarations {sorted(declared)} must be the schema's tensors "
                             f"{sorted(schema_tensors)}")
        for t in tensors:
            bad = [e for e in t.shape or () if not (isinstance(e, int) and e >= 0 or isinstance(e, str)
                                                   and e.isidentifier())]
            if bad:
                raise ValueError(f"{self.name}: {t.name}'s shape entries {bad} are neither symbol names nor sizes "
                                 f"(a symbol is a name, bound to one size; no '...' or expressions like '2*d': "
                                 f"declare shape=None and check the shape in `check`)")
        roles = {t.name: t.role for t in tensors}
        if not {n for n, r in roles.items() if r != "in"} <= set(self.written) or not set(roles.values()) <= {
                "in", "out", "inout"}:
            raise ValueError(f"{self.name}: roles {roles}: 'out' or 'inout' only for the schema's written arguments "
                             f"{self.written}")
        self.outputs = [n for n in self.arguments if roles.get(n) == "out"]  # written, not read
        self.writes = [n for n in self.arguments if roles.get(n) in ("out", "inout")]  # what the kernels write
        self.tensor_args = tuple(tensors)                # validation order
        self.tensor_names = tuple(schema_tensors)        # pointer-slot order (schema order)
        self._tensor_slots = tuple((self.arguments.index(n), arrays.absent() if n in self.optional else None)
                                   for n in schema_tensors)
        self._scalar_positions = tuple(i for i, n in enumerate(self.arguments) if not is_tensor[n])
        self._scalars = _picker(self._scalar_positions)
        self._aligned = tuple(i for i, n in enumerate(schema_tensors) if declared[n].aligned)
        self._aligned_pointers = _picker(self._aligned)
        self._layouts: dict[tuple, _Layout] = {}
        self._recent: _Layout | None = None
        # The recent layout's call and the one before it: calls that alternate two layouts (prefill and decode
        # steps, say) take straight-line code too.
        self._recent_call: Callable[..., bool] = _no_recent_call
        self._previous_call: Callable[..., bool] = _no_recent_call
        if self.qualified_name in registry:
            raise ValueError(f"{self.qualified_name} is defined twice")
        self.overload = self._register()
        self.public = self._public_function(doc)
        registry[self.qualified_name] = self

    def __repr__(self) -> str:
        return f"Op({self.qualified_name})"

    # ---- binding and routing ----

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """Positional and keyword arguments as one positional tuple in schema order, defaults filled in (an
        optional argument without a default in the schema defaults to None, as in vLLM's Python wrappers)."""
        if len(args) > len(self.arguments):
            raise TypeError(f"{self.name}: takes {len(self.arguments)} arguments, got {len(args)}")
        values = list(args)
        for name in self.arguments[len(args):]:
            if name in kwargs:
                values.append(kwargs.pop(name))
            elif name in self.defaults or name in self.optional:
                values.append(self.defaults.get(name))
            else:
                raise TypeError(f"{self.name}: missing argument {name!r}")
        if kwargs:
            raise TypeError(f"{self.name}: got unexpected or repeated arguments {sorted(kwargs)}")
        return tuple(values)

    def _public_function(self, doc: str | None) -> Callable:
        op, overload, nargs = self, self.overload, len(self.arguments)

        def public(*args, **kwargs):
            if kwargs or len(args) != nargs:
                args = op.bind(args, kwargs)  # also while compiling: the schema has no default for some optionals
            if _is_dynamo_compiling():
                return overload(*args)
            if not op._recent_call(*args) and not op._previous_call(*args):
                op._run(args, True)

        public.__name__ = public.__qualname__ = self.name
        public.__doc__ = doc
        public.__module__ = "cupy_ops"
        return public

    def _run(self, args: tuple, public: bool) -> None:
        """A call the recent layout's `recent_call` did not take: a cached layout from the dict (which becomes
        the recent one), else `_run_validated`."""
        tensors = [standin if (t := args[i]) is None else t for i, standin in self._tensor_slots]
        try:
            layout = self._lookup(tensors, self._scalars(args))
            pointers = None if layout is None else list(map(_data_ptr, tensors))
        except (AttributeError, TypeError, RuntimeError):  # not torch tensors, or fake ones: validate
            layout = None
        if layout is not None and all(pointers[k] for k in layout.sized):
            for i, j, size_i, size_j, same_view, disjoint in layout.overlaps:
                a, b = pointers[i], pointers[j]
                if a < b + size_j and b < a + size_i and not (same_view and a == b) and b - a != disjoint:
                    break  # overlapping memory: the full check explains, or allows, it
            else:
                self._launch(layout, pointers)
                return
        self._run_validated(args, public)

    def _lookup(self, tensors: list, scalars: tuple) -> _Layout | None:
        """The cached layout of these tensors and scalars (made the recent one), or None."""
        key = _layout_key(tensors, scalars, tuple(tensors[i].data_ptr() & 15 for i in self._aligned))
        layout = self._layouts.get(key)
        if layout is not None:
            if layout.match is None or not layout.match(*tensors):
                # Made by other tensor objects (one given twice, now not, or the reverse): guard these.
                layout.match, layout.recent_call = _metadata_matcher(tensors), None
            self._make_recent(layout, tensors)
        return layout

    def forget_layouts(self) -> None:
        """Drop every cached layout (tests start from a cold cache with it)."""
        self._layouts.clear()
        self._recent, self._recent_call, self._previous_call = None, _no_recent_call, _no_recent_call

    def _make_recent(self, layout: _Layout, tensors: list) -> None:
        if layout.match is None:
            return  # no guard on this torch: every call takes the dict
        # Read once: another thread's _lookup may reset layout.recent_call to None meanwhile (free-threaded Python).
        recent_call = layout.recent_call
        if recent_call is None:
            given = [t for t, g in zip(tensors, layout.given) if g]  # recent_call checks which are given itself
            recent_call = layout.recent_call = fastpath.recent_call(self, layout, _metadata_matcher(given),
                                                                    _current_device, _current_raw_stream)
        if recent_call is not self._recent_call:
            self._previous_call = self._recent_call
        self._recent, self._recent_call = layout, recent_call

    def _launch(self, layout: _Layout, pointers: list, stream: int | None = None, cupy: bool = False) -> None:
        """Run the layout's steps on `stream` (default: torch's current stream on the layout's device)."""
        device = layout.device
        if stream is None:
            if device != _current_device():
                with torch.cuda.device(device):
                    self._launch(layout, pointers)
                return
            stream = _current_raw_stream(device)
        scratch = None
        if layout.scratch:
            scratch = _allocate_scratch(layout.scratch, device, cupy)
            pointers = pointers + [buffer.data_ptr() for buffer in scratch]
        for step in layout.steps:
            step.run(pointers, stream)
        del scratch  # the allocator hands it out again only after this stream's queued work

    def _run_validated(self, args: tuple, public: bool) -> None:
        first = next((args[i] for i, _ in self._tensor_slots if args[i] is not None), None)
        if public and isinstance(first, torch.Tensor) and (type(first) not in _PLAIN_TENSORS or _is_compiling()):
            # Fake or functional tensors (torch.export, make_fx), or a call while torch.compile compiles: the
            # registered op, which tracing understands through its fake kernel.
            self.overload(*args)
            return
        call, infos = self.validate(args)
        pointers = [0 if info is None else info.ptr for info in infos]
        if call.device == arrays.CPU:
            self._run_reference(args)
        elif call.device == arrays.META:
            return  # meta tensors: validated, nothing to compute (as torch's meta kernels)
        elif arrays.is_cupy_array(first):
            import cupy

            layout = self._layout(call, infos, args)
            with cupy.cuda.Device(call.device):
                self._launch(layout, pointers, cupy.cuda.get_current_stream().ptr, cupy=True)
        else:
            layout = self._layout(call, infos, args)
            self._launch(layout, pointers)
            tensors = [standin if (t := args[i]) is None else t for i, standin in self._tensor_slots]
            if all(type(t) in (torch.Tensor, arrays._Absent) for t in tensors):
                self._remember(layout, tensors)

    def _run_reference(self, args: tuple) -> None:
        with torch.no_grad():  # as the kernels, which write raw memory: outputs get no autograd history
            self._write_reference(args)

    def _write_reference(self, args: tuple) -> None:
        results = self.reference(*args)
        written = [n for n in self.arguments if n in self.written]
        if not isinstance(results, (tuple, list)):
            raise TypeError(f"{self.name}: the reference must return a tuple (one new tensor or None per written "
                            f"argument {written}), got {type(results).__name__}")
        if len(results) != len(written):
            raise RuntimeError(f"{self.name}: reference returned {len(results)} results for {written}")
        for name, value in zip(written, results):
            target = args[self.arguments.index(name)]
            if target is not None and value is not None:
                target.copy_(value)

    def _remember(self, layout: _Layout, tensors: list) -> None:
        key = _layout_key(tensors, layout.scalars, layout.align)
        if len(self._layouts) >= _MAX_CACHED_LAYOUTS:
            self.forget_layouts()
        layout.match = _metadata_matcher(tensors)
        self._layouts[key] = layout
        self._make_recent(layout, tensors)

    # ---- validation (validation.py) ----

    def validate(self, args: tuple) -> tuple[Call, list]:
        """Check every argument (torch tensors on one device, or CuPy arrays); return the `Call` that `check` and
        `plan` see and each tensor argument's `arrays.ArrayInfo` (None when absent), in schema order."""
        return validation.validate(self, args)

    # ---- planning ----

    def _layout(self, call: Call, infos: list, args: tuple) -> _Layout:
        """The runtime form of `plan(call)` for a validated CUDA call."""
        steps = self.plan(call) or []
        if isinstance(steps, Launch | Memset | Scratch):
            steps = [steps]
        unlisted = [s.kernel for s in steps if isinstance(s, Launch) and s.kernel not in self.kernels]
        if unlisted:
            raise RuntimeError(f"{self.name}: plan launched {unlisted}, which the op does not list in `kernels` "
                               "(warm-up and the compile tests would miss it)")
        for grid in {s.config.grid for s in steps if isinstance(s, Launch)}:  # a safety net: checks name arguments
            if grid[0] > _MAX_GRID[0] or grid[1] > _MAX_GRID[1] or grid[2] > _MAX_GRID[2]:
                raise ValueError(f"{self.name}: the call needs a grid of {grid} blocks, past CUDA's limits "
                                 f"{_MAX_GRID}: the tensors are too large for one call")
        scratch = [s for s in steps if isinstance(s, Scratch) and s.nbytes > 0]
        slots = {name: k for k, name in enumerate(self.tensor_names)}
        slots.update({s.name: None for s in steps if isinstance(s, Scratch) and s.nbytes == 0})  # null pointers
        slots.update({s.name: len(self.tensor_names) + k for k, s in enumerate(scratch)})

        def pointer_index(name: str) -> int:
            if name not in slots:
                raise ValueError(f"{self.name}: a params field or memset names {name!r}, which is neither a tensor "
                                 "argument nor a scratch buffer")
            return slots[name]

        try:
            runtime_steps = tuple(
                _LaunchStep(s, call.device, pointer_index) if isinstance(s, Launch) else
                _MemsetStep(s, call.device, pointer_index)
                for s in steps if not isinstance(s, Scratch) and not (isinstance(s, Launch) and s.config.blocks == 0)
                and not (isinstance(s, Memset) and s.nbytes == 0))
        except (struct.error, OverflowError) as exc:  # a value past its field's C type (a safety net: checks name
            # arguments); struct raises OverflowError for a float past float32's range, struct.error for integers
            raise ValueError(f"{self.name}: a value does not fit its kernel parameter ({exc})") from None
        if any(isinstance(s, _MemsetStep) and s.index is None for s in runtime_steps):
            raise ValueError(f"{self.name}: a memset targets a 0-byte scratch buffer")
        # Same-view pairs may share memory exactly; every other written/other pair must not touch.
        extents = [0 if i is None else arrays.byte_extent(i.shape, i.strides, i.itemsize)[1] for i in infos]
        overlaps = tuple((slots[w], slots[o], extents[slots[w]], extents[slots[o]],
                          same_ok and validation.same_layout(infos[slots[w]], infos[slots[o]]),
                          _disjoint_offset(infos[slots[w]], infos[slots[o]]))
                         for w, o, same_ok in validation.overlap_pairs(self)
                         if extents[slots[w]] and extents[slots[o]])
        align = tuple(0 if infos[i] is None else infos[i].ptr & 15 for i in self._aligned)
        return _Layout(self._scalars(args), align, call.device, tuple(i is not None for i in infos),
                       tuple(k for k, extent in enumerate(extents) if extent), tuple(s.nbytes for s in scratch),
                       runtime_steps, overlaps)

    def instantiations(self) -> list[Kernel]:
        return list(self.kernels)

    # ---- torch.library ----

    def _register(self):
        library = _LIBRARIES.get(self.namespace)
        if library is None:
            library = _LIBRARIES[self.namespace] = torch.library.Library(self.namespace, "DEF")
        library.define(self.schema)
        kernel = _DispatchedKernel(self)
        library.impl(self.name, kernel, "CUDA")
        library.impl(self.name, kernel, "CPU")
        torch.library.register_fake(self.qualified_name, _no_op_fake, lib=library)
        return getattr(getattr(torch.ops, self.namespace), self.name).default


class _DispatchedKernel:
    """The CUDA and CPU kernel registered with torch.library (the dispatcher leaves out trailing defaults)."""

    def __init__(self, op: Op):
        self.op, self.nargs = op, len(op.arguments)

    def __call__(self, *args, **kwargs) -> None:
        if kwargs or len(args) != self.nargs:
            args = self.op.bind(args, kwargs)
        if not self.op._recent_call(*args) and not self.op._previous_call(*args):
            self.op._run(args, False)


def _allocate_scratch(sizes: tuple, device: int, cupy: bool) -> list:
    if cupy:
        import cupy as cp

        return [_CupyBuffer(cp.empty(nbytes, dtype=cp.uint8)) for nbytes in sizes]
    return [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}") for nbytes in sizes]


class _CupyBuffer:
    """A CuPy scratch array with a torch-like `data_ptr()`."""

    def __init__(self, array):
        self.array = array

    def data_ptr(self) -> int:
        return self.array.data.ptr


def _no_op_fake(*args, **kwargs) -> None:
    return None


def _disjoint_offset(a: arrays.ArrayInfo, b: arrays.ArrayInfo) -> int | None:
    """b's pointer minus a's when their spans overlap in a call that validation passed (so no element is shared, or
    b is a's same view), else None: any call of the layout at that offset shares no element either."""
    return b.ptr - a.ptr if arrays.spans_overlap(a, b) else None


def _no_recent_call(*args) -> bool:
    return False


def _metadata_matcher(tensors: list) -> Callable[..., bool] | None:
    """A check that a call's tensors are like `tensors` (`arrays.metadata_guard`), also where one tensor object
    fills two arguments (the guard alone never passes one object given twice): then those places must hold one
    object again, and the guard checks the others."""
    first: dict[int, int] = {}
    unique, repeats = [], []
    for position, t in enumerate(tensors):
        seen = first.setdefault(id(t), position)
        (unique if seen == position else repeats).append(position if seen == position else (position, seen))
    guard = arrays.metadata_guard(*(tensors[i] for i in unique))
    if guard is None or not repeats:
        return guard
    pick = _picker(unique)

    def check(*ts) -> bool:
        return all(ts[a] is ts[b] for a, b in repeats) and guard(*pick(ts))

    return check


def _picker(indices: Sequence[int | None]) -> Callable[[Sequence], tuple]:
    """f(seq) -> tuple(seq[i] for i in indices), 0 for an index None (a null pointer), in C (operator.itemgetter)
    where it can."""
    if None in indices:
        return lambda seq, idx=tuple(indices): tuple(0 if i is None else seq[i] for i in idx)
    if len(indices) > 1:
        return operator.itemgetter(*indices)
    if indices:
        return lambda seq, i=indices[0]: (seq[i],)
    return lambda seq: ()


_data_ptr = torch.Tensor.data_ptr
