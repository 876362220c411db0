"""Zero-shot helpers: prompt ensembling formula, batching invariance, SigLIP texts padded to the
context without a mask, image embedding of uint8 batches."""

import json

import pytest
import torch
import torch.nn.functional as F

from vlmfast.models import CLIP, CLIPConfig, SigLIP, SigLIPConfig, TextConfig, VisionConfig
from vlmfast.models.tokenizer import load_tokenizer, word_tokenizer
from vlmfast.models.zeroshot import classify, embed_images, embed_texts, zero_shot_classifier

WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "picture"]


def towers(eos):
    text = TextConfig(vocab_size=len(WORDS) + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=9, eos_token_id=eos, pad_token_id=0)
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4)
    return text, vision


def test_prompt_ensemble_is_the_normalised_mean_of_normalised_prompts():
    torch.manual_seed(0)
    text, vision = towers(eos=3)
    model = CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    tok = word_tokenizer(WORDS, context_length=9)
    templates = ["a photo of a {}", "a {}", "a picture of a {label}"]
    classifier = zero_shot_classifier(model, tok, ["red cat", "blue dog"], templates)
    with torch.no_grad():
        for c, name in enumerate(["red cat", "blue dog"]):
            prompts = [t.replace("{label}", "{}").format(name) for t in templates]
            rows = [F.normalize(model.encode_text(*tok([p])), dim=-1) for p in prompts]
            expected = F.normalize(torch.cat(rows).mean(0), dim=-1)
            torch.testing.assert_close(classifier[c], expected, rtol=1e-5, atol=1e-6)
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    one_batch = embed_images(model, images, mean=mean, std=std)
    torch.testing.assert_close(embed_images(model, images, batch_size=2, mean=mean, std=std), one_batch)
    assert classify(one_batch, classifier).shape == (5, 2)
    with pytest.raises(ValueError, match="classifier"):
        classify(one_batch, classifier[:, :4])
    with pytest.raises(ValueError, match="classnames"):
        zero_shot_classifier(model, tok, [], templates)


def test_siglip_texts_are_padded_to_the_context_without_a_mask(tmp_path):
    torch.manual_seed(0)
    text, vision = towers(eos=3)
    model = SigLIP(SigLIPConfig(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(tmp_path)
    word_tokenizer(WORDS, context_length=9).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("padding")  # the checkpoint's model_type alone must select padding to the context
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    ids, _ = tok(["a red cat", "a photo of a blue dog"])
    assert ids.shape == (2, 9)
    with torch.no_grad():
        expected = F.normalize(model.encode_text(ids), dim=-1)
    torch.testing.assert_close(embed_texts(model, tok, ["a red cat", "a photo of a blue dog"]), expected)
