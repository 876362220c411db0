"""The headline fine-tuning case run several times: how much the ratio moves between runs.

    python -m vlmfast.bench.finetune_runs --runs 4 [--dtype float32] [--json FILE]

Each run measures vlmfast (checkpointing + AdamW in the backward) and transformers (plain) in
fresh subprocesses, as `vlmfast bench finetune` does, alternating which side goes first. On a
small shared CPU one side's step time can move by ~10 % between processes (transformers' more
than ours: its step allocates and first-touches ~1.7 GiB of fresh gradients), so a single run's
ratio is one draw; this prints every run's and their median.
"""

import argparse
import json
import statistics
import time

import torch

from vlmfast.bench import machine
from vlmfast.bench.finetune import IN_BACKWARD, measure_in_subprocess

OURS = ("vlmfast", IN_BACKWARD)
PEER = ("transformers", "plain")


def runs(count: int, dtype_name: str = "float32", repeats: int = 3, spec_name: str = "full") -> list[dict]:
    """`count` runs of the headline case, one record each (spec_name "quick": the toy model)."""
    records = []
    for index in range(count):
        order = (OURS, PEER) if index % 2 == 0 else (PEER, OURS)
        measured = {side: measure_in_subprocess(side, spec_name, setting, dtype_name, repeats) for side, setting in order}
        ours, peer = measured["vlmfast"], measured["transformers"]
        records.append({
            "run": index, "first": order[0][0], "dtype": dtype_name, "setting": IN_BACKWARD, "peer_setting": "plain",
            "ms": ours["ms"], "peer_ms": peer["ms"], "speedup": peer["ms"] / ours["ms"],
            "peak_mib": ours["peak_mib"], "peer_peak_mib": peer["peak_mib"],
            "memory_ratio": ours["peak_mib"] / peer["peak_mib"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", help="append the runs as JSON lines to this file")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs: expected at least 1, got {args.runs}")
    where = machine.describe(torch.device("cpu"))
    records = runs(args.runs, args.dtype)
    for record in records:
        record["machine"] = where
        print(f"run {record['run']} ({record['first']} first): {record['speedup']:.2f}x tokens/s "
              f"({record['ms']:.0f} vs {record['peer_ms']:.0f} ms), memory {record['memory_ratio']:.3f}x "
              f"({record['peak_mib']:.0f} vs {record['peer_peak_mib']:.0f} MiB)")
    speedups = [r["speedup"] for r in records]
    print(f"speedup: median {statistics.median(speedups):.2f}x, min {min(speedups):.2f}x, max {max(speedups):.2f}x")
    if args.json:
        with open(args.json, "a") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
