"""What every native launcher needs: the dtype tags, the module for a device, threads, stream."""

import torch

from vlmfast import _extension

# Must match csrc/common/dtype.h (enum class DType).
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_tag(tensor: torch.Tensor) -> int:
    return DTYPE_TAGS[tensor.dtype]


def module_for(device: torch.device):
    """vlmfast._C for CPU tensors, vlmfast._C_cuda for CUDA tensors (the dispatcher checked it exists)."""
    return _extension.load("_C_cuda" if device.type == "cuda" else "_C")


def launch_args(device: torch.device) -> dict:
    """threads= for the CPU kernels, stream= (the current torch stream) for the CUDA ones."""
    if device.type == "cuda":
        return {"stream": torch.cuda.current_stream(device).cuda_stream}
    return {"threads": torch.get_num_threads()}
