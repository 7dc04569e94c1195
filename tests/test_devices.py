"""GPU offload settings and device reporting, on this (CPU-only) machine: the offload decision as a
pure function, settings parsing, the devices llama.cpp lists, and a clear error at start when offload
is asked of a build that cannot. The CUDA path itself is measured by the device check (issue 26)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from backend.config import BackendSettings
from backend.devices import Device, describe_devices, list_devices
from backend.llama_model import offload_layers


def test_offload_layers_follows_the_build_and_says_why_it_cannot():
    assert offload_layers(-1, can_offload=False, n_gpus=0, main_gpu=0, tensor_split=()) == 0  # the default on a CPU
    assert offload_layers(-1, can_offload=True, n_gpus=1, main_gpu=0, tensor_split=()) == 2**31 - 1  # every layer
    assert offload_layers(0, can_offload=True, n_gpus=1, main_gpu=0, tensor_split=()) == 0
    assert offload_layers(12, can_offload=True, n_gpus=2, main_gpu=1, tensor_split=(3.0, 1.0)) == 12
    with pytest.raises(ValueError, match="GPU=cuda"):
        offload_layers(12, can_offload=False, n_gpus=0, main_gpu=0, tensor_split=())
    with pytest.raises(ValueError, match="MAIN_GPU=1"):
        offload_layers(-1, can_offload=True, n_gpus=1, main_gpu=1, tensor_split=())
    with pytest.raises(ValueError, match="TENSOR_SPLIT"):
        offload_layers(-1, can_offload=True, n_gpus=2, main_gpu=0, tensor_split=(1.0, 1.0, 1.0))


def test_settings_parse_the_split_and_refuse_nonsense():
    assert BackendSettings(tensor_split="3,1").tensor_split_values() == (3.0, 1.0)
    assert BackendSettings().tensor_split_values() == () and BackendSettings().n_gpu_layers == -1
    for bad in ({"tensor_split": "3;1"}, {"n_gpu_layers": -2}, {"main_gpu": -1}):
        with pytest.raises(ValidationError):
            BackendSettings(**bad)


def test_llama_cpp_lists_this_machines_cpu():
    import llama_cpp

    llama_cpp.llama_backend_init()
    devices = list_devices()
    cpu = [d for d in devices if d.kind == "cpu"]
    assert cpu and cpu[0].memory_total > 0 and cpu[0].name
    assert describe_devices(devices, 0) == "the CPU"
    gpu = Device(1, "CUDA0", "NVIDIA H200", "gpu", memory_free=100 * 2**30, memory_total=140 * 2**30)
    assert describe_devices([*devices, gpu], 25) == "25 layer(s) on CUDA0 NVIDIA H200 (40.0 of 140.0 GiB used)"


def test_stats_report_the_devices_and_no_offload_here(model_service):
    stats = model_service.stats()
    assert stats.n_gpu_layers == 0 and any(d.kind == "cpu" for d in stats.devices)


def test_offload_asked_of_a_build_that_cannot_is_a_clear_error_at_start(model_service):
    import llama_cpp

    from backend.runtime import ModelService

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp can offload: the error is for builds that cannot")
    service = ModelService(BackendSettings(model=str(model_service.model.path), n_gpu_layers=8, embeddings=False))
    service.load()
    assert service.error and "N_GPU_LAYERS=8" in service.error and service.engine is None
