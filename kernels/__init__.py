"""Triton kernels and their launchers, one module per op (installed as vlmfast.kernels).

Importing a module here imports triton: on a machine without a GPU set TRITON_INTERPRET=1 first.
"""
