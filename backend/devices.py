"""The compute devices llama.cpp sees (ggml's backend registry): name, kind and memory.

llama-cpp-python binds llama.h only; ggml's device API lives in the libggml libraries it ships
beside libllama (or the ones `LLAMA_CPP_LIB_PATH` points at), so it is bound here with ctypes:
`ggml_backend_dev_count/get` (libggml) and `ggml_backend_dev_name/description/type/memory`
(libggml-base). A build without a GPU backend, or a machine without a GPU, lists the CPU only.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("backend.devices")

# enum ggml_backend_dev_type (ggml-backend.h)
_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class Device:
    index: int
    name: str  # e.g. CUDA0, CPU
    description: str  # e.g. NVIDIA H200
    kind: str  # cpu, gpu, igpu, accel
    memory_free: int  # bytes
    memory_total: int  # bytes

    @property
    def memory_used(self) -> int:
        return max(0, self.memory_total - self.memory_free)


def _lib_dir() -> Path:
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


def _load(names: tuple[str, ...]) -> ctypes.CDLL | None:
    where = _lib_dir()
    for name in names:
        path = where / name
        if path.exists():
            # RTLD_GLOBAL as llama-cpp-python loads them: the same library, not a second copy.
            return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return None


@functools.cache
def _bindings() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """libggml and libggml-base with the device functions' signatures, bound once per process (every
    /stats and /metrics read lists the devices)."""
    ggml = _load(("libggml.so", "libggml.dylib", "ggml.dll"))
    base = _load(("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"))
    if ggml is None or base is None:
        return None
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for fn in (base.ggml_backend_dev_name, base.ggml_backend_dev_description):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    base.ggml_backend_dev_type.restype, base.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    return ggml, base


def list_devices() -> list[Device]:
    """Every device ggml has registered in this process (call after the model is loaded, when the
    backends are), memory read now. Empty when the libraries cannot be found."""
    try:
        libs = _bindings()
        if libs is None:
            return []
        ggml, base = libs
        out = []
        for i in range(ggml.ggml_backend_dev_count()):
            dev = ggml.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            out.append(Device(
                index=i,
                name=(base.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace"),
                description=(base.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
                kind=_KINDS.get(base.ggml_backend_dev_type(dev), "other"),
                memory_free=free.value,
                memory_total=total.value,
            ))
        return out
    except (OSError, AttributeError) as e:  # an older or foreign build: report nothing rather than fail
        log.warning("cannot list llama.cpp's devices: %s", e)
        return []


def gpus(devices: list[Device]) -> list[Device]:
    return [d for d in devices if d.kind in ("gpu", "igpu")]


def describe_devices(devices: list[Device], n_gpu_layers: int) -> str:
    """For the start-up log line: where the model runs and how much memory each GPU uses."""
    on_gpu = gpus(devices)
    if not n_gpu_layers or not on_gpu:
        return "the CPU"
    listed = ", ".join(f"{d.name} {d.description} ({d.memory_used / 2**30:.1f} of {d.memory_total / 2**30:.1f} GiB used)"
                       for d in on_gpu)
    return f"{n_gpu_layers} layer(s) on {listed}"
