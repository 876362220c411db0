"""The memory case of the smolvlm and qwen2vl suites: the peak resident set of a fresh process
that loads a checkpoint and generates once for a prompt with one image (generate_memory.py), for
vlmfast and for transformers (CPU only)."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from vlmfast.bench.timing import Result


def memory_case(suite: str, checkpoint_dir, inputs: dict, dtype: torch.dtype, *, new_tokens: int) -> Result:
    """suite: "smolvlm" or "qwen2vl" (the family generate_memory.py loads); inputs: the generate's
    input_ids, attention_mask, pixel_values (and the family's other tensors). ms: that first
    (cold) generate, prefill included; peak_mib: loading included (extra: the peer's, and both
    after the imports only); greedy_equal in float32."""
    script = Path(__file__).with_name("generate_memory.py")
    name = str(dtype).removeprefix("torch.")
    runs = {}
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "inputs.pt"
        torch.save({k: v.float().cpu() if k == "pixel_values" else v.cpu() for k, v in inputs.items()}, file)
        for impl in ("vlmfast", "transformers"):
            done = subprocess.run([sys.executable, str(script), suite, impl, str(checkpoint_dir), str(file), name,
                                   str(new_tokens)], capture_output=True, text=True, check=True)
            runs[impl] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, peer = runs["vlmfast"], runs["transformers"]
    return Result(suite, f"memory: load, first generate of {new_tokens} tokens, 1 image b=1 {name}", "vlmfast",
                  ours["ms"], "transformers", peer["ms"], peak_mib=ours["peak_mib"],
                  extra={"peer_peak_mib": peer["peak_mib"], "baseline_mib": ours["baseline_mib"],
                         "peer_baseline_mib": peer["baseline_mib"],
                         "greedy_equal": ours["tokens"] == peer["tokens"] if dtype == torch.float32 else None})
