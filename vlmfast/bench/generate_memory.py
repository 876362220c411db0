"""Peak memory of one generate, in a fresh process (run as a script by vlmfast/bench/memory_case.py
for the smolvlm and qwen2vl suites).

    python generate_memory.py FAMILY IMPL CHECKPOINT_DIR INPUTS.pt DTYPE NEW_TOKENS

FAMILY is `smolvlm` or `qwen2vl`, IMPL `vlmfast` or `transformers`. The child imports only torch
and that implementation (this file is run by path, so the vlmfast package is not imported for
transformers), then loads the checkpoint, runs generate once on the saved inputs (one image + a
prompt), and prints one JSON line: peak resident set (VmHWM, MiB) after the imports
(`baseline_mib`) and at the end (`peak_mib`, loading included, as a user's process would hold
it), and the generate's milliseconds.
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


def _model_class(family: str, impl: str):
    """The class that loads the checkpoint, imported here so that only that implementation is."""
    if impl == "vlmfast":
        if family == "smolvlm":
            from vlmfast.models.smolvlm import SmolVLM as cls
        else:
            from vlmfast.models.qwen2vl import Qwen2VL as cls
        return cls
    import transformers

    transformers.logging.set_verbosity_error()
    if family == "smolvlm":
        return transformers.SmolVLMForConditionalGeneration
    return transformers.Qwen2VLForConditionalGeneration


def _generate(family: str, impl: str, model, inputs: dict, pixels, new_tokens: int):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if impl == "vlmfast" and family == "smolvlm":
        return model.generate(ids, pixels, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    if impl == "vlmfast":
        return model.generate(ids, pixels, inputs["image_grid_thw"], mask, max_new_tokens=new_tokens, eos_token_id=[])
    extra = {} if family == "smolvlm" else {"image_grid_thw": inputs["image_grid_thw"],
                                            "mm_token_type_ids": inputs["mm_token_type_ids"]}
    return model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=2 if family == "smolvlm" else 0,
                          **extra)


def main(family: str, impl: str, path: str, inputs_file: str, dtype_name: str, new_tokens: int) -> dict:
    import torch

    cls = _model_class(family, impl)
    dtype = getattr(torch, dtype_name)
    inputs = torch.load(inputs_file)
    baseline = _peak_mib()
    pixels = inputs["pixel_values"].to(dtype)
    # loaded as a user would (outside inference mode); both generates turn gradients off themselves
    model = cls.from_pretrained(path, dtype=dtype)
    if impl == "transformers":
        model = model.eval()
    start = time.perf_counter()
    out = _generate(family, impl, model, inputs, pixels, new_tokens)
    ms = (time.perf_counter() - start) * 1e3
    return {"impl": impl, "baseline_mib": baseline, "peak_mib": _peak_mib(), "ms": ms,
            "tokens": out[0, inputs["input_ids"].shape[1]:].tolist()}


if __name__ == "__main__":
    family, impl, path, inputs_file, dtype_name, new_tokens = sys.argv[1:7]
    print(json.dumps(main(family, impl, path, inputs_file, dtype_name, int(new_tokens))))
