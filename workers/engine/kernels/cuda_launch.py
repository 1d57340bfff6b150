"""Launching a kernel compiled by `torch.cuda._compile_kernel` with programmatic dependent launch.

torch's own launcher calls `cuLaunchKernel`, which takes no launch attributes. With `pdl=True` this module
calls the driver's `cuLaunchKernelEx` with the attribute `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`
(the one Triton's `launch_pdl` sets), so the kernel may become resident while the kernel ahead of it on the
stream still runs; the kernel itself must wait (`griddepcontrol.wait`) before it reads what that kernel
writes. Stream capture records it as a programmatic edge of the CUDA graph. The structures below follow
`cuda.h` (CUDA 12.0+): `CUlaunchAttribute` is a 4-byte id, 4 bytes of padding and a 64-byte value union;
`CUlaunchConfig` is six grid/block sizes, the shared-memory bytes, the stream, the attributes and their count.
"""
from __future__ import annotations

import ctypes

PROGRAMMATIC_STREAM_SERIALIZATION = 6        # CUlaunchAttributeID


class LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class LaunchConfig(ctypes.Structure):
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


def pdl_config(grid, block, shared_bytes: int, stream_handle: int) -> tuple[LaunchConfig, LaunchAttribute]:
    """The launch configuration with programmatic stream serialization allowed (its attribute is returned
    too: the configuration points at it, so it must live until the launch)."""
    attr = LaunchAttribute()
    attr.id = PROGRAMMATIC_STREAM_SERIALIZATION
    ctypes.c_int.from_buffer(attr, LaunchAttribute.value.offset).value = 1   # programmaticStreamSerializationAllowed
    config = LaunchConfig(*grid, *block, shared_bytes, ctypes.c_void_p(stream_handle), ctypes.pointer(attr), 1)
    return config, attr


def _argument(arg, keep: list):
    import torch
    if isinstance(arg, torch.Tensor):
        if not arg.is_cuda:
            raise ValueError("tensor arguments must be CUDA tensors")
        value = ctypes.c_void_p(arg.data_ptr())
    elif isinstance(arg, int):
        value = ctypes.c_int(arg)
    else:
        raise TypeError(f"unsupported kernel argument: {type(arg).__name__}")
    keep.append(value)
    return ctypes.cast(ctypes.byref(value), ctypes.c_void_p)


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether the CUDA driver has `cuLaunchKernelEx` (CUDA 12.0+); without it kernels launch plainly."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            from torch.cuda._utils import _get_gpu_runtime_library
            _AVAILABLE = hasattr(_get_gpu_runtime_library(), "cuLaunchKernelEx")
        except Exception:  # noqa: BLE001 - no driver library: no programmatic launch
            _AVAILABLE = False
    return _AVAILABLE


def launch(kernel, grid, block, args: list, shared_bytes: int, *, pdl: bool = False) -> None:
    """`kernel` (a `torch.cuda._compile_kernel` result) on the current stream; with `pdl`, through
    `cuLaunchKernelEx` and programmatic dependent launch."""
    if not pdl:
        kernel(grid=grid, block=block, args=args, shared_mem=shared_bytes)
        return
    import torch
    from torch.cuda._utils import _get_gpu_runtime_library
    keep: list = []                          # the argument values must outlive the call
    params = (ctypes.c_void_p * len(args))(*[_argument(arg, keep) for arg in args])
    config, _attr = pdl_config(grid, block, shared_bytes, torch.cuda.current_stream().cuda_stream)
    libcuda = _get_gpu_runtime_library()
    result = libcuda.cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if result != 0:
        message = ctypes.c_char_p()
        libcuda.cuGetErrorString(result, ctypes.byref(message))
        raise RuntimeError(f"cuLaunchKernelEx failed ({result}): {(message.value or b'').decode()}")
