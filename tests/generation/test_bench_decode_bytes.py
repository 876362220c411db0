"""decode_case.decoder_weight_bytes: the bytes a decode step streams, counted from the
transformers model of each family (the GB/s of the benches' decode rows divides them by a step)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _smolvlm(tied: bool):
    from vlmfast.bench.smolvlm import QUICK

    spec = copy.deepcopy(QUICK)
    spec["text_config"]["tie_word_embeddings"] = tied
    return transformers.SmolVLMForConditionalGeneration(transformers.SmolVLMConfig(**spec)), spec["text_config"]


@pytest.mark.parametrize("tied", [False, True])
def test_llama_decoder_bytes_by_hand(tied):
    from vlmfast.bench.decode_case import decoder_weight_bytes

    model, cfg = _smolvlm(tied)
    D, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    E = D // cfg["num_attention_heads"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = D * H * E + 2 * D * Hkv * E + H * E * D + 3 * D * I + 2 * D  # q, k, v, o, MLP, 2 norms
    expected = 4 * (L * per_layer + D + V * D)  # float32; the final norm; the head, once even if tied
    assert decoder_weight_bytes(model) == expected
    assert decoder_weight_bytes(model.to(torch.bfloat16)) == expected // 2


def test_opt_learned_positions_are_not_streamed():
    from vlmfast.bench.decode_case import decoder_weight_bytes
    from vlmfast.bench.vlm_families import SPECS

    model = transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**SPECS["blip2"]["quick"]))
    decoder = model.get_decoder()
    positions = decoder.model.decoder.embed_positions.weight
    head = model.get_output_embeddings().weight
    assert head.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # OPT ties its head
    unique = {p.data_ptr(): p for p in decoder.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    assert decoder_weight_bytes(model) == total - positions.numel() * positions.element_size()
