"""NVRTC compilation of `cuda_kernels/*.cu` to native SASS, with a two-level (memory, disk) cache.

Torch-free and driver-free: everything here runs on a machine without a GPU, which is how CI compiles every
kernel instantiation and reads ptxas' register/spill report.

We drive the NVRTC program API ourselves (`cupy.cuda.nvrtc`, the same calls `cupy.RawModule(code=...,
name_expressions=...)` makes) instead of calling `RawModule(code=...)`, because RawModule asks the driver for
the arch before compiling (so it cannot run in CI), keys its cache on the source text only (an edited header
would not invalidate it), keeps one global cache folder (`CUPY_CACHE_DIR`) and does not return the cubin or
ptxas' report. `launcher.py` loads the cubin into the device's primary context with two driver calls.

Disk cache contract: one file per (source tree, name expression, options, arch, NVRTC, CUDA headers, package
version), written atomically (temp file + `os.replace`); a truncated or corrupt file is a miss that gets
recompiled and rewritten, never an error; an unwritable folder only costs the disk level.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from pathlib import Path

__all__ = [
    "CompileError",
    "CompiledKernel",
    "PtxasReport",
    "cache_dir",
    "compile_kernel",
    "cuda_include_dir",
    "kernel_dir",
    "nvrtc_version",
    "ptxas_report",
    "supported_arch",
]

# Every option that shapes the machine code is here (and so in the cache key). Not CuPy's defaults:
# no -ftz=true (torch keeps denormals), no --use_fast_math (expf/logf stay within 2 ulp).
BASE_OPTIONS = ("-std=c++17", "--ptxas-options=-v", "-default-device")

_CACHE_MAGIC = b"CUPYOPS\x03"  # \x03: PTX with its NUL; \x02: whole cubins (_program_image); \x01 lack a byte
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^">]+)[">]', re.MULTILINE)


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; the message carries the program log."""


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """One compiled instantiation: the cubin (or PTX when NVRTC cannot target the arch) and its symbol."""

    key: str
    name_expression: str
    lowered_name: str
    image: bytes
    log: str


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    """What ptxas said about one kernel (`--ptxas-options=-v`)."""

    name_expression: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_memory: int
    log: str


def kernel_dir() -> Path:
    """Folder holding the `.cu`/`.cuh` sources: inside the wheel, else the source checkout's `cuda_kernels/`."""
    return _kernel_dir()


@functools.lru_cache(maxsize=1)
def _kernel_dir() -> Path:
    from importlib import resources

    packaged = resources.files("cupy_ops").joinpath("cuda_kernels")
    if packaged.is_dir():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parents[2] / "cuda_kernels"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("cupy_ops: the cuda_kernels/ sources are missing from this installation")


def cache_dir() -> Path:
    """`$CUPY_OPS_CACHE_DIR`, else `$XDG_CACHE_HOME/cupy_ops`, else `~/.cache/cupy_ops`."""
    explicit = os.environ.get("CUPY_OPS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cupy_ops"


@functools.lru_cache(maxsize=1)
def cuda_include_dir() -> str:
    """CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h) of the same CUDA major as NVRTC, from the pip wheels."""
    candidates = []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            candidates.append(found)
    except Exception:  # cuda-pathfinder missing or too old: fall back to a toolkit install
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            return path
    raise FileNotFoundError(
        "cupy_ops: CUDA headers (cuda_fp16.h) not found; install the extra matching your CUDA major, "
        "e.g. pip install 'cupy-ops[cuda13]'"
    )


@functools.lru_cache(maxsize=1)
def _cuda_headers_version() -> str:
    text = Path(cuda_include_dir(), "cuda_runtime_api.h").read_text(errors="replace")
    match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    return match.group(1) if match else "unknown"


def _nvrtc():
    """CuPy's NVRTC binding (the calls RawModule makes), used to compile; imported only on a cache miss."""
    from cupy.cuda import nvrtc

    return nvrtc


@functools.lru_cache(maxsize=1)
def _nvrtc_library():
    """libnvrtc through ctypes, found by cuda-pathfinder as CuPy 14 finds it. The cache key needs the NVRTC
    version and the arch list on every first call; asking CuPy would import it (100-180 ms) even when the
    kernel is already on disk."""
    try:
        from cuda import pathfinder

        return ctypes.CDLL(pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path)
    except Exception:  # no cuda-pathfinder, or it cannot find NVRTC: CuPy's binding answers instead
        return None


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    lib = _nvrtc_library()
    if lib is None:
        return _cupy_nvrtc_version()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


@functools.lru_cache(maxsize=1)
def _cupy_nvrtc_version() -> tuple[int, int]:
    """The NVRTC CuPy compiles with (it may load another library than cuda-pathfinder finds)."""
    return tuple(_nvrtc().getVersion())


@functools.lru_cache(maxsize=1)
def _nvrtc_archs() -> tuple[int, ...]:
    lib = _nvrtc_library()
    if lib is None:
        try:
            return tuple(int(a) for a in _nvrtc().getSupportedArchs())
        except Exception:
            return ()
    count = ctypes.c_int()
    if lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)) != 0:
        return ()
    archs = (ctypes.c_int * count.value)()
    if lib.nvrtcGetSupportedArchs(archs) != 0:
        return ()
    return tuple(archs)


def supported_arch(device_arch: int) -> tuple[int, bool]:
    """(arch to compile for, native SASS?) for a device of compute capability `device_arch` (e.g. 90)."""
    archs = _nvrtc_archs()
    if not archs or device_arch in archs:
        return device_arch, True
    lower = [a for a in archs if a <= device_arch]
    # Newer GPU than this NVRTC knows: PTX for the newest arch it has, which the driver JIT-compiles.
    return (max(lower) if lower else device_arch), False


@functools.lru_cache(maxsize=None)
def _source_tree(filename: str, root: Path | None = None) -> tuple[str, str]:
    """(source text, sha256 over the .cu and every header NVRTC opens from the kernel trees). Includes resolve as
    NVRTC resolves them: a quoted one first beside the file that includes it, then (quoted or <>) in -I order,
    `root` then cuda_kernels/. One found in neither (a toolkit header such as cuda_fp16.h, or one inside #if 0)
    is NVRTC's to find and is not hashed; an include through a macro (`#include NAME`) is not followed (no kernel
    here has one)."""
    base = kernel_dir()
    search = [base] if root is None or Path(root) == base else [Path(root), base]
    main = next((d / filename for d in search if (d / filename).is_file()), base / filename)
    digest = hashlib.sha256()
    seen: set[str] = set()
    pending = [str(main)]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        text = Path(path).read_text()
        name = next((os.path.relpath(path, d) for d in search if Path(path).is_relative_to(d)), path)
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        for quote, inc in _INCLUDE_RE.findall(text):
            beside = [os.path.normpath(os.path.join(os.path.dirname(path), inc))] if quote == '"' else []
            found = next((c for c in (*beside, *(os.path.normpath(d / inc) for d in search)) if os.path.isfile(c)),
                         None)
            if found is not None:
                pending.append(found)
    return main.read_text(), digest.hexdigest()


def _package_version() -> str:
    from cupy_ops import __version__

    return __version__


def _arch_option(arch: int, native: bool) -> str:
    return f"-arch=sm_{arch}" if native else f"-arch=compute_{arch}"


def _cache_key(filename: str, name_expression: str, arch: int, native: bool, options: tuple[str, ...],
               root: Path | None) -> str:
    _, tree_digest = _source_tree(filename, root)
    parts = {
        "package": _package_version(),
        "source": filename,
        "tree": tree_digest,
        "name": name_expression,
        "arch": _arch_option(arch, native),
        "options": list(BASE_OPTIONS + options),
        "nvrtc": list(nvrtc_version()),
        "cuda_headers": _cuda_headers_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


_compilations = 0  # NVRTC compilations made by this process (cache misses)


def compile_count() -> int:
    """How many kernels this process has compiled with NVRTC (cache misses) so far."""
    return _compilations


def _nvrtc_compile(filename: str, name_expression: str, arch: int, native: bool, options: tuple[str, ...],
                   key: str, root: Path | None = None) -> CompiledKernel:
    global _compilations
    _compilations += 1
    nvrtc = _nvrtc()
    source, _ = _source_tree(filename, root)
    all_options = (
        *BASE_OPTIONS,
        *options,
        _arch_option(arch, native),
        *([f"-I{root}"] if root is not None else []),
        f"-I{kernel_dir()}",
        f"-I{cuda_include_dir()}",
    )
    # The program is named by its file's path: a profiler's source view finds it from a -lineinfo build.
    prog = nvrtc.createProgram(source, str(Path(root or kernel_dir()) / filename), [], [])
    try:
        nvrtc.addNameExpression(prog, name_expression)
        try:
            nvrtc.compileProgram(prog, list(all_options))
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"cupy_ops: NVRTC failed on {name_expression} ({filename}):\n{log}") from exc
        log = nvrtc.getProgramLog(prog)
        lowered = nvrtc.getLoweredName(prog, name_expression)
        image = _program_image(nvrtc, prog, native)
    finally:
        nvrtc.destroyProgram(prog)
    return CompiledKernel(key, name_expression, lowered, image, log)


def _program_image(nvrtc, prog: int, native: bool) -> bytes:
    """The program's cubin (native) or PTX, all nvrtcGet{CUBIN,PTX}Size bytes of it. CuPy's binding (14.2) returns
    one byte less of either, as if every image ended in a NUL: a cubin lost the last byte of its ELF's last program
    header (a 0 so far, which the driver read from past the end of the Python bytes object), a PTX text its closing
    NUL, which cuModuleLoadData needs. So the image comes from libnvrtc through ctypes when that is the library
    CuPy compiled with (same version: a program handle means nothing to another library); else CuPy's image is
    mended: a cubin padded to the extent its ELF header gives, a PTX text given its NUL."""
    lib = _nvrtc_library()
    if lib is None or nvrtc_version() != _cupy_nvrtc_version():
        image = nvrtc.getCUBIN(prog) if native else nvrtc.getPTX(prog)
        if isinstance(image, str):
            image = image.encode()
        if native:
            return image + bytes(max(0, elf_extent(image) - len(image)))
        return image if image.endswith(b"\0") else image + b"\0"
    kind = "CUBIN" if native else "PTX"
    size = ctypes.c_size_t()
    if getattr(lib, f"nvrtcGet{kind}Size")(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        raise CompileError(f"cupy_ops: nvrtcGet{kind}Size failed")
    buffer = ctypes.create_string_buffer(size.value)
    if getattr(lib, f"nvrtcGet{kind}")(ctypes.c_void_p(prog), buffer) != 0:
        raise CompileError(f"cupy_ops: nvrtcGet{kind} failed")
    return buffer.raw


def elf_extent(image: bytes) -> int:
    """The bytes a 64-bit ELF image spans by its header: the end of its section and program header tables."""
    phoff, shoff = struct.unpack_from("<QQ", image, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", image, 0x36)
    return max(phoff + phnum * phentsize, shoff + shnum * shentsize)


def compile_source(source: str, arch: int, root: Path | None = None, name: str = "check.cu") -> str:
    """Compile a source text for `arch` with the kernels' options and include paths (no cache, no GPU); return
    NVRTC's log, or raise CompileError with it. Tests use it for compile-time checks (static_assert)."""
    nvrtc = _nvrtc()
    options = [*BASE_OPTIONS, f"-arch=sm_{arch}", *([f"-I{root}"] if root is not None else []),
               f"-I{kernel_dir()}", f"-I{cuda_include_dir()}"]
    prog = nvrtc.createProgram(source, name, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            raise CompileError(f"cupy_ops: NVRTC failed on {name}:\n{nvrtc.getProgramLog(prog)}") from exc
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


# ---- disk cache ------------------------------------------------------------------------------------------


def _entry_path(key: str) -> Path:
    return cache_dir() / f"{key}.bin"


def _read_entry(key: str) -> CompiledKernel | None:
    """A valid entry, or None for a missing, truncated or corrupt one."""
    try:
        blob = _entry_path(key).read_bytes()
        if not blob.startswith(_CACHE_MAGIC):
            return None
        (header_len,) = struct.unpack_from("<I", blob, len(_CACHE_MAGIC))
        start = len(_CACHE_MAGIC) + 4
        header = json.loads(blob[start:start + header_len].decode())
        image = blob[start + header_len:]
        if header["key"] != key or _entry_digest(header, image) != header["sha256"]:
            return None
        return CompiledKernel(key, header["name_expression"], header["lowered_name"], image, header["log"])
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
        return None


def _entry_digest(header: dict, image: bytes) -> str:
    """sha256 of what an entry returns: the image and the header's names and log (a damaged lowered name would
    load no kernel)."""
    fields = json.dumps([header["name_expression"], header["lowered_name"], header["log"]]).encode()
    return hashlib.sha256(fields + b"\0" + image).hexdigest()


def _write_entry(entry: CompiledKernel) -> None:
    fields = {"key": entry.key, "name_expression": entry.name_expression, "lowered_name": entry.lowered_name,
              "log": entry.log}
    header = json.dumps({**fields, "sha256": _entry_digest(fields, entry.image)}).encode()
    blob = _CACHE_MAGIC + struct.pack("<I", len(header)) + header + entry.image
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".bin")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a cache warmed by one user (an image build) from others
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, _entry_path(entry.key))  # atomic: readers see the old file or the whole new one
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass  # read-only or full disk: the in-memory cache still holds the kernel


# ---- public entry points ---------------------------------------------------------------------------------

_memory: dict[str, CompiledKernel] = {}
_key_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def compile_kernel(filename: str, name_expression: str, arch: int, *, native: bool = True,
                   options: tuple[str, ...] = (), root: Path | None = None) -> CompiledKernel:
    """Compile `name_expression` (e.g. "cupy_ops::merge_attn_states_kernel<float, float, 4>") from
    `cuda_kernels/<filename>` (or `root/<filename>`) for compute capability `arch` (e.g. 90), through the memory
    and disk caches.

    Thread-safe: concurrent first calls for one key compile once per process; processes racing on the disk
    cache each write a complete file and the last rename wins. `CUPY_OPS_NVRTC_OPTIONS` (whitespace-separated)
    adds options to every kernel, e.g. "-lineinfo" for a profiler's source view; they are part of the key.
    """
    options = (*options, *os.environ.get("CUPY_OPS_NVRTC_OPTIONS", "").split())
    key = _cache_key(filename, name_expression, arch, native, options, root)
    hit = _memory.get(key)
    if hit is not None:
        return hit
    with _locks_guard:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        hit = _memory.get(key)
        if hit is None:
            hit = _read_entry(key)
            if hit is None:
                hit = _nvrtc_compile(filename, name_expression, arch, native, options, key, root)
                _write_entry(hit)
            _memory[key] = hit
    return hit


_PTXAS_FUNC_RE = re.compile(r"Function properties for (\S+)")


def ptxas_report(filename: str, name_expression: str, arch: int, options: tuple[str, ...] = (),
                 root: Path | None = None) -> PtxasReport:
    """Compile for `arch` (no GPU needed) and parse ptxas' resource usage for this instantiation."""
    # NVRTC 12.9+ keeps a compile cache where a CUDA driver is installed, and a hit prints no ptxas report (the
    # H200 machine's NVRTC 13.0 gave an empty log for every kernel compiled before: NVRTC's "Caching" section):
    # the report's compilation opts out (a key of its own in our caches).
    if nvrtc_version() >= (12, 9):
        options = (*options, "--no-cache")
    entry = compile_kernel(filename, name_expression, arch, native=True, options=options, root=root)
    lines = entry.log.splitlines()
    block: list[str] = []
    for i, line in enumerate(lines):
        match = _PTXAS_FUNC_RE.search(line)
        if match and match.group(1) == entry.lowered_name:
            block = lines[i:i + 4]
            break
    text = "\n".join(block)

    def number(pattern: str) -> int:
        found = re.search(pattern, text)
        if found is None:
            raise CompileError(f"cupy_ops: no '{pattern}' in ptxas' report for {name_expression}:\n{entry.log}")
        return int(found.group(1))

    shared = re.search(r"(\d+) bytes smem", text)
    return PtxasReport(
        name_expression=name_expression,
        arch=arch,
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        stack_frame=number(r"(\d+) bytes stack frame"),
        shared_memory=int(shared.group(1)) if shared else 0,
        log=entry.log,
    )


def clear_memory_cache() -> None:
    """Forget compiled kernels held in this process (tests use it to exercise the disk level)."""
    _memory.clear()
    _source_tree.cache_clear()
