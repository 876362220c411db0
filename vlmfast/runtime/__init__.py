"""What the launchers below the op layer share: output allocation, strided layouts, argument
checks, and the record of which kernel ran.

Imports run one way: kernels/ (vlmfast.kernels) and vlmfast/native/ import this package and
never vlmfast.ops; vlmfast.ops imports them. Nothing here imports anything of vlmfast but
other leaf modules (tests/test_import_layers.py checks it).
"""
