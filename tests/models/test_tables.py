"""models/tables.embedding: nn.Embedding without its random init on the meta device, where every
from_pretrained builds its model (normal_ on a meta tensor imports torch._dynamo: seconds and
~150 MiB for values nobody reads)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from vlmfast.models import tables


@pytest.mark.parametrize("through", ["context", "argument"])
def test_meta_table_is_an_embedding_of_the_right_shape(through):
    if through == "context":
        with torch.device("meta"):
            table = tables.embedding(11, 6, padding_idx=3, dtype=torch.bfloat16)
    else:
        table = tables.embedding(11, 6, padding_idx=3, device="meta", dtype=torch.bfloat16)
    assert type(table) is nn.Embedding and table.weight.is_meta
    assert table.weight.shape == (11, 6) and table.weight.dtype == torch.bfloat16 and table.weight.requires_grad
    assert table.padding_idx == 3 and table.num_embeddings == 11 and table.embedding_dim == 6


def test_real_device_table_is_initialised_as_nn_embedding():
    torch.manual_seed(5)
    ours = tables.embedding(9, 4, padding_idx=2)
    torch.manual_seed(5)
    theirs = nn.Embedding(9, 4, padding_idx=2)
    assert torch.equal(ours.weight, theirs.weight) and ours.weight[2].abs().sum() == 0


def test_building_every_family_on_meta_imports_no_compiler():
    code = """
import sys, torch
from vlmfast.bench.smolvlm import QUICK
from vlmfast.models import CLIP, SigLIP, SmolVLM, Llava, Blip2, Qwen2VL
from vlmfast.models.smolvlm.config import SmolVLMConfig
from vlmfast.models.qwen2vl.config import Qwen2VLConfig
assert "torch._dynamo" not in sys.modules
with torch.device("meta"):
    models = [CLIP(), SigLIP(), Llava(), Blip2(), Qwen2VL(Qwen2VLConfig()), SmolVLM(SmolVLMConfig.from_hf({**QUICK, "model_type": "smolvlm"}))]
assert all(p.is_meta for m in models for p in m.parameters())
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
