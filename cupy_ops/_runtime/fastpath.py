"""The recent layout's call, written out as straight-line Python once per layout.

A call like the last validated one (same tensor metadata, same optional tensors given, same scalars, same
pointer alignment) must cost no more host time than vLLM's own C++ op. On the H200 VM (2026-12-01, one run) that
op took 7.9 µs, the driver's cuLaunchKernelEx alone 3.9 µs, and the runtime's generic loops over tensors, alignments
and overlap pairs brought a merge call to 10.0 µs (the VM drifts by µs between runs: a later run that day,
bench/results/h200-eager-breakdown.json, medians 13.0, 5.6 and 12.3 µs, the unrolled call included). So for the
recent layout the runtime writes one function with those loops unrolled and every per-layout number a constant; for
merge_attn_states with output_lse given and no output_scale it reads:

    def recent_call(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse,
                    prefill_tokens_with_context, output_scale):
        if output_lse is None or output_scale is not None:
            return False
        if prefill_tokens_with_context is not None:
            return False
        try:
            if not match(output, output_lse, prefix_output, prefix_lse, suffix_output, suffix_lse):
                return False
        except TypeError:  # not torch tensors
            return False
        p0 = output.data_ptr()
        ...
        if p0 & 15 != 0 or p2 & 15 != 0 or p4 & 15 != 0:
            return False
        if p0 < p1 + 16384 and p1 < p0 + 8192:  # output vs output_lse
            return False
        ...
        if current_device() != 0:
            return False
        stream = raw_stream(0)
        launch_0(stream, pack_0, (p0, p1, p2, p3, p4, p5, 0, tail_0))
        return True

It returns False, having launched nothing, for any call it does not cover; the runtime then takes its general
path (the layout dict, or full validation). `recent_call_source` returns the text, for tests and for reading.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["recent_call", "recent_call_source"]


def recent_call_source(op, layout, match: Callable[..., bool], current_device: Callable[[], int],
                       raw_stream: Callable[[int], int]) -> tuple[str, dict]:
    """(source of `recent_call` for `layout` of `op`, the names it uses). `match`: the metadata guard of the
    layout's given tensors, in schema order."""
    names = {"match": match, "current_device": current_device, "raw_stream": raw_stream}
    arguments = op.arguments
    lines = [f"def recent_call({', '.join(arguments)}):"]
    present = [n for n, i in zip(op.tensor_names, layout.given) if i]
    absent = [n for n, i in zip(op.tensor_names, layout.given) if not i]
    checks = [f"{n} is None" for n in present if n in op.optional] + [f"{n} is not None" for n in absent]
    if checks:
        lines += [f"    if {' or '.join(checks)}:", "        return False"]
    for position, value in zip(op._scalar_positions, layout.scalars):
        name = arguments[position]
        if value is None:
            test = f"{name} is not None"
        elif isinstance(value, bool):
            test = f"{name} is not {value}"
        else:
            names[f"value_{name}"], names[f"type_{name}"] = value, type(value)  # an int subclass too (IntEnum)
            test = f"{name}.__class__ is not type_{name} or {name} != value_{name}"
        lines += [f"    if {test}:", "        return False"]
    lines += ["    try:", f"        if not match({', '.join(present)}):", "            return False",
              "    except TypeError:  # not torch tensors", "        return False"]
    pointer = {}
    for k, (name, given) in enumerate(zip(op.tensor_names, layout.given)):
        pointer[k] = f"p{k}" if given else "0"
        if given:
            lines.append(f"    p{k} = {name}.data_ptr()")
    if layout.sized:  # a null pointer: a freed storage (full validation refuses it)
        lines += [f"    if not ({' and '.join(pointer[k] for k in layout.sized)}):", "        return False"]
    aligned = [f"{pointer[k]} & 15 != {a}" for k, a in zip(op._aligned, layout.align) if layout.given[k]]
    if aligned:
        lines += [f"    if {' or '.join(aligned)}:", "        return False"]
    for i, j, size_i, size_j, same_view, disjoint in layout.overlaps:
        test = f"{pointer[i]} < {pointer[j]} + {size_j} and {pointer[j]} < {pointer[i]} + {size_i}"
        if same_view:
            test += f" and {pointer[i]} != {pointer[j]}"
        if disjoint is not None:
            test += f" and {pointer[j]} - {pointer[i]} != {disjoint}"
        lines += [f"    if {test}:  # {op.tensor_names[i]} vs {op.tensor_names[j]}", "        return False"]
    lines += [f"    if current_device() != {layout.device}:", "        return False"]
    all_pointers = ", ".join(pointer[k] for k in range(len(op.tensor_names)))
    if layout.scratch or any(not hasattr(step, "launcher") for step in layout.steps):
        names["run_steps"], names["layout"] = op._launch, layout  # scratch buffers or memsets: the general runner
        lines.append(f"    run_steps(layout, [{all_pointers}])")
    else:
        lines.append(f"    stream = raw_stream({layout.device})")
        for s, step in enumerate(layout.steps):
            names[f"launch_{s}"], names[f"pack_{s}"], names[f"tail_{s}"] = step.launcher.launch, step.pack_into, \
                step.tail
            values = "".join(f"{'0' if k is None else pointer[k]}, " for k in step.indices)
            lines.append(f"    launch_{s}(stream, pack_{s}, ({values}tail_{s}))")
    lines.append("    return True")
    return "\n".join(lines) + "\n", names


def recent_call(op, layout, match: Callable[..., bool], current_device: Callable[[], int],
                raw_stream: Callable[[int], int]) -> Callable[..., bool]:
    """`recent_call` of `layout` (see the module docstring), compiled."""
    source, names = recent_call_source(op, layout, match, current_device, raw_stream)
    namespace = dict(names)
    exec(compile(source, f"<cupy_ops recent call of {op.name}>", "exec"), namespace)  # noqa: S102 - our own text
    return namespace["recent_call"]
