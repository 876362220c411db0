"""vlmfast's benchmark suite: every op and model against its peers, measured in the same run.

`vlmfast bench [SUITE ...] [--device cpu|cuda] [--dtype ...] [--json FILE]` runs it; each suite
module (rotary, ...) has `run(device, dtype, quick) -> list[Result]`.
"""
