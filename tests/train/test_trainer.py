"""The trainer: an interrupted and resumed run repeats the uninterrupted one exactly; schedule,
accumulation, bf16 autocast, SigLIP's loss, the JSONL log and atomic checkpoints."""

import json
import math

import pytest
import torch

from vlmfast.models import CLIP, CLIPConfig, SigLIP, SigLIPConfig, TextConfig, VisionConfig
from vlmfast.train import TrainConfig, Trainer, contrastive_loss, learning_rate
from vlmfast.train.trainer import CHECKPOINT_NAME


def tiny(cls=CLIP):
    text = TextConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=6, eos_token_id=19, hidden_act="gelu")
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4, hidden_act="gelu")
    torch.manual_seed(0)
    if cls is CLIP:
        return CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    return SigLIP(SigLIPConfig(text_config=text, vision_config=vision))


def batches(step, micro, batch=6):
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(1, 19, (batch, 5), generator=g)
    ids[:, -1] = 19
    return torch.randn(batch, 3, 8, 8, generator=g), ids, None


def test_schedule_warms_up_then_follows_the_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cfg, 100) == pytest.approx(0.1)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    common = dict(steps=6, lr=1e-2, warmup_steps=2, grad_accum=2, max_grad_norm=1.0, checkpoint_every=2)
    straight = Trainer(tiny(), TrainConfig(**common, checkpoint_dir=str(tmp_path / "a"), log_path=str(tmp_path / "a.jsonl")), batches)
    expected = straight.fit()

    first = Trainer(tiny(), TrainConfig(**common, checkpoint_dir=str(tmp_path / "b"), log_path=str(tmp_path / "b.jsonl")), batches)
    first.fit(stop_at=5)  # "crash" after step 5: the last checkpoint is from step 4
    resumed = Trainer(tiny(), TrainConfig(**common, checkpoint_dir=str(tmp_path / "b"), log_path=str(tmp_path / "b.jsonl")), batches)
    assert resumed.step == 4
    assert resumed.fit() == expected  # bit for bit
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    logged = [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(6))  # the replayed step 4 is not logged twice
    assert [r["loss"] for r in logged] == expected
    assert {"lr", "logit_scale", "grad_norm", "time"} <= set(logged[0])
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [CHECKPOINT_NAME]  # no temp files left


def test_accumulation_matches_one_big_batch_for_a_per_sample_loss():
    def mse(model, pixels, ids, mask):
        return model.encode_image(pixels).pow(2).mean()

    def halves(step, micro):
        pixels, ids, _ = batches(step, 0, batch=4)
        return pixels[2 * micro : 2 * micro + 2], ids, None

    big = Trainer(tiny(), TrainConfig(steps=2, lr=1e-2), lambda s, m: batches(s, 0, batch=4), loss_fn=mse)
    accumulated = Trainer(tiny(), TrainConfig(steps=2, lr=1e-2, grad_accum=2), halves, loss_fn=mse)
    big.fit(), accumulated.fit()
    for a, b in zip(big.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_for_clip_and_siglip_and_bf16_runs():
    for cls in (CLIP, SigLIP):
        trainer = Trainer(tiny(cls), TrainConfig(steps=12, lr=5e-3), lambda s, m: batches(0, 0))
        losses = trainer.fit()
        assert losses[-1] < losses[0], cls.__name__
    bf16 = Trainer(tiny(), TrainConfig(steps=2, lr=1e-3, bf16=True), batches).fit()
    assert all(math.isfinite(x) for x in bf16)


def test_siglip_loss_is_the_sigmoid_loss():
    model = tiny(SigLIP)
    pixels, ids, _ = batches(0, 0)
    with torch.no_grad():
        per_image, _ = model(pixels, ids)
        labels = 2 * torch.eye(6) - 1
        expected = -torch.nn.functional.logsigmoid(labels * per_image).sum() / 6
        torch.testing.assert_close(contrastive_loss(model, pixels, ids), expected, rtol=1e-5, atol=1e-5)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(steps=3, grad_accum=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=3, warmup_steps=4)
