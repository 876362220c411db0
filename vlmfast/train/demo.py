"""`vlmfast demo`: train a small CLIP on the built-in shapes data set on the CPU, then measure
zero-shot accuracy and Recall@K on held-out images and save the model in Hugging Face layout.

The model: a 24x24-pixel ViT (patch 4, 36 patches, 64 wide, 2 layers) and a one-layer word-level
text transformer over the captions' vocabulary, trained with the InfoNCE loss (1000 steps of 64
pairs). Colour is learnt within a few dozen steps, shape later: fewer steps leave shape at chance
on some seeds. Held-out images come from another seed, so
no test image was seen in training.

Under `torchrun --nproc-per-node N vlmfast demo` (or python -m vlmfast.cli demo) every rank
builds the same data, trains on its 1/N of each step's batch (the InfoNCE loss still sees the
whole batch's negatives), and rank 0 alone logs, evaluates, saves and reports.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmfast.data.synthetic import CLASSES, PROMPT_TEMPLATES, SyntheticShapes, caption_vocabulary
from vlmfast.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlmfast.models.tokenizer import word_tokenizer
from vlmfast.models.zeroshot import classify, embed_images, embed_texts, zero_shot_classifier
from vlmfast.train import distributed
from vlmfast.train.trainer import Trainer, TrainConfig

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.25, 0.25, 0.25)


@dataclass
class DemoConfig:
    out: str = "vlmfast-demo"
    steps: int = 1000
    batch_size: int = 64
    train_images: int = 8192
    test_images: int = 600
    image_size: int = 24  # 24 px learnt shape in fewer steps than 32 px (fewer tokens to pool)
    lr: float = 3e-3
    seed: int = 0
    # One thread by default: 64-wide matrices gain little from a second one, and on a busy machine
    # OpenMP threads waiting on each other made steps 15x slower (measured). None: torch's choice.
    threads: int | None = 1


def demo_model(vocab_size: int, image_size: int, context_length: int) -> CLIP:
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, max_position_embeddings=context_length, hidden_act="gelu",
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=image_size, patch_size=4, hidden_act="gelu")
    return CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def _recall(similarity: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Recall@K where an item is correct when it shows / names the query's class."""
    from vlmfast.eval import recall_at_k

    positives = [torch.nonzero(labels == label).flatten().tolist() for label in labels.tolist()]
    return {f"R@{k}": v for k, v in recall_at_k(similarity, positives, ks=ks).items()}


def evaluate(model, tokenizer, images: np.ndarray, captions, labels: np.ndarray, retrieval_pairs: int = 200) -> dict:
    """Zero-shot accuracy over CLASSES (prompt ensemble) and Recall@1/5 both ways."""
    model.eval()
    mean, std = torch.tensor(IMAGE_MEAN), torch.tensor(IMAGE_STD)
    feats = embed_images(model, torch.from_numpy(images), mean=mean, std=std)
    classifier = zero_shot_classifier(model, tokenizer, list(CLASSES), PROMPT_TEMPLATES)
    labels_t = torch.from_numpy(labels)
    predicted = classify(feats, classifier).argmax(dim=-1)
    accuracy = (predicted == labels_t).float().mean().item()
    n = min(retrieval_pairs, len(captions))
    text_feats = embed_texts(model, tokenizer, list(captions[:n]))
    similarity = feats[:n] @ text_feats.T
    return {
        "zero_shot_accuracy": accuracy,
        "num_classes": len(CLASSES),
        "num_test_images": int(len(labels)),
        "image_to_text": _recall(similarity, labels_t[:n]),
        "text_to_image": _recall(similarity.T, labels_t[:n]),
    }


def run_demo(cfg: DemoConfig, log=print) -> dict | None:
    """Trains, evaluates, saves; returns the report (also written to out/report.json). Under
    torchrun (see the module's docstring) ranks other than 0 train only and return None."""
    with distributed.session(cfg.threads) as parallel:
        if not parallel.is_main:
            log = lambda message: None  # noqa: E731  (rank 0 reports)
        return _run_demo(cfg, log, parallel)


def _run_demo(cfg: DemoConfig, log, parallel: distributed.DataParallel) -> dict | None:
    if cfg.batch_size % parallel.world:
        raise ValueError(
            f"batch_size: expected a multiple of the {parallel.world} torchrun ranks, got {cfg.batch_size}"
        )
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    started = time.perf_counter()

    train = SyntheticShapes(cfg.train_images, image_size=cfg.image_size, seed=cfg.seed)
    test = SyntheticShapes(cfg.test_images, image_size=cfg.image_size, seed=cfg.seed + 1_000_003)
    train_images, train_captions, _ = train.batch(range(len(train)))
    test_images, test_captions, test_labels = test.batch(range(len(test)))
    context = 2 + max(len(c.split()) for c in list(train_captions) + list(PROMPT_TEMPLATES)) + 2
    tokenizer = word_tokenizer(caption_vocabulary(), context_length=context)
    ids, mask = tokenizer(list(train_captions))
    images = torch.from_numpy(train_images)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    log(f"data: {len(train)} training pairs, {len(test)} held-out images, {len(CLASSES)} classes "
        f"({time.perf_counter() - started:.1f} s)" + (f"; {parallel.world} ranks" if parallel.enabled else ""))

    model = demo_model(tokenizer.vocab_size, cfg.image_size, context)

    def batches(step, micro):
        # batch of a step = a pure function of the step (exact resume); an epoch is a permutation
        per_epoch = len(train) // cfg.batch_size
        epoch, slot = divmod(step, per_epoch)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        index = torch.from_numpy(perm[slot * cfg.batch_size : (slot + 1) * cfg.batch_size])
        pixels = (images[index].permute(0, 3, 1, 2).float() / 255 - mean) / std
        rows = mask[index]
        length = int(rows.sum(dim=1).max())  # trim common padding: shorter sequences, same result
        return pixels, ids[index, :length], rows[:, :length]

    train_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=0.05, warmup_steps=max(1, cfg.steps // 15),
                            min_lr_ratio=0.02, log_path=str(out / "metrics.jsonl"))
    if parallel.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    trainer = Trainer(model, train_cfg, batches)  # each rank keeps its rows of every batch
    every = max(1, cfg.steps // 10)

    def progress(t):
        # the training clock alone, as the final "trained N steps in X s" (data generation before
        # it and evaluation after it are in total_seconds)
        if t.step % every == 0 or t.step == cfg.steps:
            log(f"step {t.step}/{cfg.steps}  loss {t.losses[-1]:.4f}  ({time.perf_counter() - t0:.1f} s of training)")

    t0 = time.perf_counter()
    losses = trainer.fit(callback=progress)
    train_seconds = time.perf_counter() - t0
    if not parallel.is_main:
        return None

    report = evaluate(model, tokenizer, test_images, test_captions, test_labels)
    model.save_pretrained(out)
    tokenizer.save(out)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": cfg.image_size},
        "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "resample": 3,
    }, indent=2))
    report.update({
        "steps": cfg.steps, "batch_size": cfg.batch_size, "world_size": parallel.world,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": round(train_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2),
        "out": str(out), "classes": list(CLASSES),
    })
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
