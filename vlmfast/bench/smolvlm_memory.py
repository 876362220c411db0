"""Peak memory of one SmolVLM generate, in a fresh process (run as a script by vlmfast/bench/smolvlm.py).

    python smolvlm_memory.py IMPL CHECKPOINT_DIR INPUTS.pt DTYPE NEW_TOKENS

IMPL is `vlmfast` or `transformers`. The child imports only torch and that implementation (this
file is run by path, so the vlmfast package is not imported for transformers), then loads the
checkpoint, runs generate once on the saved inputs, and prints one JSON line: peak resident set
(VmHWM, MiB) after the imports (`baseline_mib`) and at the end (`peak_mib`, loading included,
as a user's process would hold it), and the generate's milliseconds.
"""

import json
import resource
import sys
import time


def _peak_mib() -> float:
    """The high-water mark of this process's resident set. VmHWM, not ru_maxrss: the latter
    survives exec, so a child would report its parent's peak when that was larger."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(impl: str, path: str, inputs_file: str, dtype_name: str, new_tokens: int) -> dict:
    import torch

    if impl == "vlmfast":
        from vlmfast.models.smolvlm import SmolVLM
    else:
        import transformers
        from transformers import SmolVLMForConditionalGeneration

        transformers.logging.set_verbosity_error()
    dtype = getattr(torch, dtype_name)
    inputs = torch.load(inputs_file)
    baseline = _peak_mib()
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"].to(dtype)
    # loaded as a user would (outside inference mode); both generates turn gradients off themselves
    if impl == "vlmfast":
        model = SmolVLM.from_pretrained(path, dtype=dtype)
        start = time.perf_counter()
        out = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    else:
        model = SmolVLMForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
    ms = (time.perf_counter() - start) * 1e3
    return {"impl": impl, "baseline_mib": baseline, "peak_mib": _peak_mib(), "ms": ms,
            "tokens": out[0, ids.shape[1]:].tolist()}


if __name__ == "__main__":
    impl, path, inputs_file, dtype_name, new_tokens = sys.argv[1:6]
    print(json.dumps(main(impl, path, inputs_file, dtype_name, int(new_tokens))))
