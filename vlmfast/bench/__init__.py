"""vlmfast's benchmark suite: every op and model against its peers, measured in the same run.

`vlmfast bench [SUITE|GROUP ...] [--device cpu|cuda] [--dtype ...] [--json [FILE]] [--quick]` runs
it (runner.py); each suite module (rotary, attention, losses, patch_embed, linear_cross_entropy,
smolvlm) has `run(device, dtype, quick) -> list[Result]` (timing.py). `vlmfast bench --report`
prints the README's table from the recorded JSON lines (report.py).
"""
