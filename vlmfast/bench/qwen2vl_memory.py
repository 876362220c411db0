"""Peak memory of one Qwen2-VL generate, in a fresh process (run as a script by vlmfast/bench/qwen2vl.py).

    python qwen2vl_memory.py IMPL CHECKPOINT_DIR INPUTS.pt DTYPE NEW_TOKENS

IMPL is `vlmfast` or `transformers`. The child imports only torch and that implementation (this
file is run by path, so the vlmfast package is not imported for transformers), loads the
checkpoint, runs generate once on the saved inputs (one image + a prompt), and prints one JSON
line: peak resident set (VmHWM, MiB) after the imports (`baseline_mib`) and at the end
(`peak_mib`, loading included), and the generate's milliseconds.
"""

import json
import resource
import sys
import time


def _peak_mib() -> float:
    """VmHWM, not ru_maxrss (which survives exec: a child would report its parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(impl: str, path: str, inputs_file: str, dtype_name: str, new_tokens: int) -> dict:
    import torch

    if impl == "vlmfast":
        from vlmfast.models.qwen2vl import Qwen2VL
    else:
        import transformers
        from transformers import Qwen2VLForConditionalGeneration

        transformers.logging.set_verbosity_error()
    dtype = getattr(torch, dtype_name)
    inputs = torch.load(inputs_file)
    baseline = _peak_mib()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    pixels, grid, types = inputs["pixel_values"].to(dtype), inputs["image_grid_thw"], inputs["mm_token_type_ids"]
    if impl == "vlmfast":
        model = Qwen2VL.from_pretrained(path, dtype=dtype)
        start = time.perf_counter()
        out = model.generate(ids, pixels, grid, mask, max_new_tokens=new_tokens, eos_token_id=[])
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid,
                             mm_token_type_ids=types, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    ms = (time.perf_counter() - start) * 1e3
    return {"impl": impl, "baseline_mib": baseline, "peak_mib": _peak_mib(), "ms": ms,
            "tokens": out[0, ids.shape[1]:].tolist()}


if __name__ == "__main__":
    impl, path, inputs_file, dtype_name, new_tokens = sys.argv[1:6]
    print(json.dumps(main(impl, path, inputs_file, dtype_name, int(new_tokens))))
