"""Loading a vision-language model and generating from an image, in a fresh interpreter, never
imports torch._dynamo: the ops' plain inference calls skip their custom ops (whose first call
imports it: ~1.5 s and ~150 MiB resident for a process that never compiles)."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

GENERATE = {
    "smolvlm": """
from vlmfast.bench.smolvlm import prompt
ids, mask = prompt(1, 12, 4, "cpu")
model.generate(ids, torch.randn(1, 1, 3, 64, 64), None, mask, max_new_tokens=3, eos_token_id=[])
""",
    "qwen2vl": """
from vlmfast.bench.qwen2vl import prompt
ids, mask, _ = prompt(model.config, 1, 8, (1, 8, 8))
model.generate(ids, torch.randn(64, 3 * 2 * 14 * 14), torch.tensor([[1, 8, 8]]), mask, max_new_tokens=3,
               eos_token_id=[])
""",
}


def _checkpoint(family: str, folder: str) -> None:
    torch.manual_seed(0)
    if family == "smolvlm":
        from vlmfast.bench.smolvlm import QUICK

        model = transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(**QUICK))
    else:
        from vlmfast.bench import qwen2vl

        config = transformers.Qwen2VLConfig(text_config=qwen2vl.QUICK_TEXT, vision_config=qwen2vl.QUICK_QWEN2_VISION,
                                            tie_word_embeddings=True, **qwen2vl.IDS)
        model = transformers.Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(folder)


@pytest.mark.parametrize("family", ["smolvlm", "qwen2vl"])
def test_load_and_generate_import_no_compiler(family, tmp_path):
    _checkpoint(family, str(tmp_path))
    code = f"""
import sys, torch
import vlmfast.models
model = vlmfast.models.from_pretrained({str(tmp_path)!r})
{GENERATE[family]}
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
