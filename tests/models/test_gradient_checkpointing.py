"""Gradient checkpointing of the CLIP / SigLIP encoders: the same loss and gradients as without,
and the layers really are recomputed in the backward."""

import copy

import pytest
import torch

from vlmfast.models import CLIP, CLIPConfig, SigLIP, SigLIPConfig, TextConfig, VisionConfig
from vlmfast.models.layers import EncoderLayer, set_gradient_checkpointing
from vlmfast.train import TrainConfig, Trainer, contrastive_loss


def _tiny(cls):
    text = TextConfig(vocab_size=30, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=3, max_position_embeddings=9, eos_token_id=29, hidden_act="gelu")
    vision = VisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                          image_size=12, patch_size=4, hidden_act="gelu")
    torch.manual_seed(0)
    if cls is CLIP:
        return CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    return SigLIP(SigLIPConfig(text_config=text, vision_config=vision))


def _batch(step=0, micro=0):
    g = torch.Generator().manual_seed(10 * step + micro)
    ids = torch.randint(1, 29, (5, 7), generator=g)
    ids[:, -1] = 29
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[2, 4:] = 0
    return torch.randn(5, 3, 12, 12, generator=g), ids, mask


def _count_layer_calls(model) -> list:
    """[number of EncoderLayer forwards so far]. The instances' forward is wrapped (forward hooks
    do not fire during checkpoint's recomputation)."""
    calls = [0]

    def counting(forward):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)
        return wrapped

    for layer in model.modules():
        if isinstance(layer, EncoderLayer):
            layer.forward = counting(layer.forward)
    return calls


@pytest.mark.parametrize("cls", [CLIP, SigLIP])
def test_same_loss_and_gradients_and_layers_recomputed(cls):
    plain = _tiny(cls)
    checkpointed = copy.deepcopy(plain)
    assert checkpointed.set_gradient_checkpointing(True) is checkpointed
    batch = _batch()

    want = contrastive_loss(plain, *batch)
    want.backward()
    calls = _count_layer_calls(checkpointed)
    got = contrastive_loss(checkpointed, *batch)
    assert calls[0] == 4  # 2 vision + 2 text layers in the forward
    got.backward()
    assert calls[0] == 8  # ... and each once more in the backward: the recomputation

    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_off_again_and_no_recompute_without_grad():
    model = _tiny(CLIP).set_gradient_checkpointing(True)
    calls = _count_layer_calls(model)
    with torch.no_grad():
        contrastive_loss(model, *_batch())
    assert calls[0] == 4
    model.set_gradient_checkpointing(False)
    contrastive_loss(model, *_batch()).backward()
    assert calls[0] == 8  # forward only: nothing recomputed


def test_trainer_flag_repeats_the_plain_run():
    runs = []
    for flag in (False, True):
        model = _tiny(CLIP)
        calls = _count_layer_calls(model)
        trainer = Trainer(model, TrainConfig(steps=2, lr=1e-2, gradient_checkpointing=flag), _batch)
        trainer.fit()
        runs.append((trainer.losses, model.state_dict(), calls[0]))
    (plain_losses, plain_state, plain_calls), (ckpt_losses, ckpt_state, ckpt_calls) = runs
    assert ckpt_calls == 2 * plain_calls
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-6)
    for name, value in plain_state.items():
        torch.testing.assert_close(ckpt_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_model_without_encoder_raises():
    with pytest.raises(TypeError, match="model: expected a module holding an Encoder"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2))
