"""Where the host time of one eager call goes (GPU machine): each piece of the cached path timed alone, beside
the whole call, vLLM's op and bare driver launches, in interleaved rounds (median µs per call).

    python bench/eager_breakdown.py [--vllm .anchors/vllm-...so.xz] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys

import torch

import cupy_ops
from cupy_ops._bench import harness
from cupy_ops._bench.merge_attn_states import MergeCase, make_merge_inputs
from cupy_ops._runtime import launcher
from cupy_ops.ops.merge_attn_states import OP


def _pieces(vllm_ops) -> dict:
    args = make_merge_inputs(MergeCase(1, 32, 128, torch.bfloat16))
    cupy_ops.merge_attn_states(*args)
    layout = OP._recent
    tensors = [standin if (t := args[i]) is None else t for i, standin in OP._tensor_slots]
    pointers = [t.data_ptr() for t in tensors]
    stream = torch.cuda.current_stream().cuda_stream
    step = layout.steps[0]
    values = (*step.pointers(pointers), step.tail)
    run = step.launcher
    # The bare driver call with everything packed beforehand: the floor of any Python launch.
    buffers = launcher._buffers
    step.pack_into(buffers.params, 0, *values)
    config = run._config(stream)
    launch_ex = launcher._libcuda().cuLaunchKernelEx
    pieces = {
        "cupy_ops (whole call)": (cupy_ops.merge_attn_states, args),
        "torch.ops.cupy_ops (dispatcher)": (torch.ops.cupy_ops.merge_attn_states, args),
        "runtime _launch (layout known)": (OP._launch, (layout, pointers)),
        "Launcher.launch (pack + driver)": (run.launch, (stream, step.pack_into, values)),
        "ctypes cuLaunchKernelEx, prepacked": (launch_ex, (config, run.function, buffers.argv, None)),
        "metadata guard (7 tensors)": (layout.match, tuple(tensors)),
        "7 data_ptr reads": (lambda: [t.data_ptr() for t in tensors], ()),
        "current device + raw stream": (lambda: torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice()), ()),
        "empty Python call": (lambda: None, ()),
    }
    legacy = ctypes.CDLL("libcuda.so.1").cuLaunchKernel  # its own handle: argtypes set here only
    legacy.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    argv = ctypes.addressof(buffers.argv)
    pieces["ctypes cuLaunchKernel (11 args), prepacked"] = (
        legacy, (run.function.value, 1, 1, 1, 128, 1, 1, 0, stream, argv, None))
    plain = ctypes.CDLL("libcuda.so.1").cuLaunchKernel  # no argtypes: small ints convert fastest that way
    stream_ref = ctypes.c_void_p(stream)
    pieces["ctypes cuLaunchKernel, no argtypes, prepacked"] = (
        plain, (run.function, 1, 1, 1, 128, 1, 1, 0, stream_ref, buffers.argv, None))
    pieces["ctypes cuLaunchKernel, no argtypes, stream wrapped per call"] = (
        lambda: plain(run.function, 1, 1, 1, 128, 1, 1, 0, ctypes.c_void_p(stream), buffers.argv, None), ())
    x, y = torch.zeros(32, device="cuda"), torch.zeros(32, device="cuda")
    pieces["torch.add(x, 1, out=y) (a C++ op)"] = (lambda: torch.add(x, 1, out=y), ())
    try:
        from cupy_backends.cuda.api import driver

        pieces["CuPy launchKernel, prepacked"] = (
            driver.launchKernel, (run.function.value, 1, 1, 1, 128, 1, 1, 0, stream, argv, 0))
    except ImportError:
        pass
    if vllm_ops is not None:
        pieces["vLLM op (whole call)"] = (vllm_ops.merge_attn_states, args)
    return pieces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vllm")
    parser.add_argument("--json")
    args = parser.parse_args()
    vllm_ops = harness.try_load_vllm(args.vllm)[0] if args.vllm else None
    result = harness.eager_host_us(_pieces(vllm_ops), calls_per_round=2000, rounds=15)
    for name, r in result.items():
        print(f"{name:<40} {r['us_median']:7.2f} µs (min {r['us_min']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": harness.run_meta({"GBps": None}), "eager_breakdown_us": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
