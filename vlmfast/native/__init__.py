"""Launchers of the C++ (vlmfast._C) and CUDA (vlmfast._C_cuda) kernels: one file per op.

They check what the kernels assume (dtype, strides), allocate outputs and pass addresses, sizes
and strides across the torch-free boundary; the Triton launchers live beside their kernels in
vlmfast.kernels.
"""
