"""`vlmfast demo vlm`: the VLM half offline. Builds a tiny SmolVLM-architecture model with a
tokenizer trained here, trains it on conversations about the built-in shapes (the decoder with
`vlmfast finetune`'s stack), measures VQA accuracy on held-out images with `vlmfast eval vqa`'s
runner, and leaves a checkpoint folder that `vlmfast generate / finetune / eval vqa / serve` and
transformers load.

    report = run_vlm_demo(VLMDemoConfig(out="vlmfast-demo-vlm"))
    build_tiny_smolvlm("ckpt/")   # just a random-weight tiny checkpoint folder (tests, experiments)

The model: SmolVLM's architecture at toy size: a SigLIP vision tower over one unsplit 32 x 32
tile (patch 8: 16 patches, 64 wide, 2 layers), pixel shuffle (scale 2: 4 image tokens) into a
linear connector, a 2-layer Llama decoder (64 wide, GQA 2/1 heads) over a byte-level BPE
vocabulary learnt from the training conversations (vlmfast.processing.tokenizer_training).

It is trained as SmolVLM was, in two stages: the vision tower first, contrastively on the
images' captions (a small SigLIP, vlmfast.train.demo_vlm_vision: why is said there), then the
connector and decoder on the conversations with the tower frozen (`vlmfast finetune`'s stack:
InstructionCollator, SmolVLM.loss, the Trainer).

The out folder:
    data/train.jsonl, data/images/   the training conversations (shape_questions.write_shape_conversations)
    data/vqa/                        held-out images, questions.json, annotations.json (VQA v2 format)
    base/                            the model before stage 2 (pretrained tower, the rest random), its
                                     tokenizer and processor files
    model/                           the fine-tuned checkpoint (Hugging Face layout) + finetune's logs
    vqa_report.json, report.json     the evaluation and the demo's report
A rerun starts over: the demo clears what a previous demo wrote there (and refuses a non-empty
folder that is not a demo's), so old and new data or models never mix.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlmfast.data.instructions import read_instructions
from vlmfast.data.shape_questions import shape_conversation, write_shape_conversations, write_shape_vqa

MARKER = "vlmfast-demo-vlm.json"  # says a folder is the VLM demo's: a rerun may clear it
OWNED = ("data", "base", "model", "vqa_report.json", "report.json", MARKER)
HELD_OUT_SEED_OFFSET = 1_000_003  # held-out images are drawn from another seed than training's
VQA_PROMPT = "{question}"  # the questions exactly as trained (eval vqa's default adds an instruction)


@dataclass(frozen=True)
class TinySmolVLM:
    """The toy architecture. image_size: the one tile an image is resized to (no splitting)."""

    image_size: int = 32
    patch_size: int = 8  # 8 x 8 patches learnt shape in half the steps of 4 x 4 (measured)
    scale_factor: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    vocab_size: int = 512  # the most BPE tokens; a small corpus stops earlier

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size // self.scale_factor) ** 2

    def config(self, vocab_size: int, image_token_id: int, pad_token_id: int):
        from vlmfast.models.smolvlm import SmolVLMConfig, SmolVLMTextConfig, SmolVLMVisionConfig

        vision = SmolVLMVisionConfig(hidden_size=self.vision_hidden, intermediate_size=2 * self.vision_hidden,
                                     num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                                     image_size=self.image_size, patch_size=self.patch_size)
        text = SmolVLMTextConfig(vocab_size=vocab_size, hidden_size=self.text_hidden,
                                 intermediate_size=2 * self.text_hidden, num_hidden_layers=self.text_layers,
                                 num_attention_heads=self.text_heads, num_key_value_heads=self.text_kv_heads,
                                 max_position_embeddings=2048, rope_theta=10000.0, pad_token_id=pad_token_id)
        return SmolVLMConfig(vision_config=vision, text_config=text, scale_factor=self.scale_factor,
                             image_token_id=image_token_id)


def _rendered(conversations) -> list[str]:
    """Conversations (lists of messages) as the chat template renders them: the tokenizer's corpus."""
    from vlmfast.models.smolvlm.chat_template import render_chat_template
    from vlmfast.processing.tokenizer_training import CHAT_TEMPLATE

    return [render_chat_template(CHAT_TEMPLATE, list(messages)) for messages in conversations]


def _default_corpus(n: int = 256) -> list[str]:
    """The built-in shape conversations (as the demo writes them), rendered."""
    from vlmfast.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(n, image_size=8, seed=0)  # only the attributes are used: tiny images
    return _rendered(shape_conversation(shapes[i].attributes, np.random.default_rng([0, i, 1])) for i in range(n))


def build_tiny_smolvlm(out_dir: str | os.PathLike, *, texts=None, seed: int = 0,
                       architecture: TinySmolVLM = TinySmolVLM(), vision_tower: dict | None = None) -> Path:
    """Writes a tiny SmolVLM checkpoint folder (random weights) that vlmfast (SmolVLM,
    SmolVLMProcessor, pipeline, the CLI) and transformers (SmolVLMForConditionalGeneration,
    AutoTokenizer, SmolVLMImageProcessor) load: config.json, model.safetensors,
    generation_config.json (stops at <end_of_utterance>), tokenizer.json, tokenizer_config.json,
    chat_template.jinja, preprocessor_config.json, processor_config.json. Returns the folder.

    texts: the tokenizer's training corpus (default: the built-in shape conversations).
    vision_tower: a state dict for the vision transformer (demo_vlm_vision.vision_tower_state;
    None: random like the rest). Deterministic in its arguments; takes about a second."""
    from tokenizers import Tokenizer

    from vlmfast.models.smolvlm import SmolVLM
    from vlmfast.processing.smolvlm_prompt import IMAGE_TOKEN
    from vlmfast.processing.tokenizer_training import (
        END_OF_UTTERANCE, PAD_TOKEN, train_smolvlm_tokenizer, write_tokenizer_files,
    )

    out = Path(out_dir)
    tokenizer = train_smolvlm_tokenizer(_default_corpus() if texts is None else texts,
                                        vocab_size=architecture.vocab_size)
    write_tokenizer_files(out, tokenizer)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))  # ids exactly as loaded later
    pad, end = tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(END_OF_UTTERANCE)
    config = architecture.config(tokenizer.get_vocab_size(), tokenizer.token_to_id(IMAGE_TOKEN), pad)
    torch.manual_seed(seed)
    model = SmolVLM(config)
    if vision_tower is not None:
        model.model.vision_model.load_state_dict(vision_tower, strict=True)
    model.generation_defaults = {"eos_token_id": end, "pad_token_id": pad}  # saved as generation_config.json
    model.save_pretrained(out)
    side = {"longest_edge": architecture.image_size}
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "do_resize": True, "size": side, "do_image_splitting": False, "max_image_size": side,
        "resample": 1, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": True, "do_convert_rgb": True,
    }, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "SmolVLMProcessor", "image_seq_len": architecture.image_seq_len}, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- the demo

@dataclass
class VLMDemoConfig:
    out: str = "vlmfast-demo-vlm"
    steps: int = 800  # fine-tuning steps (stage 2)
    vision_steps: int = 1000  # contrastive steps of the vision tower (stage 1)
    batch_size: int = 32
    vision_batch_size: int = 64
    lr: float = 3e-3
    train_examples: int = 8192
    test_images: int = 100  # len(KINDS) questions each
    seed: int = 0
    # One thread by default, as the CLIP demo: 64-wide matrices gain little from a second one and
    # a busy machine's waiting OpenMP threads slow every step. None or 0: torch's choice.
    threads: int | None = 1
    max_new_tokens: int = 8

    def __post_init__(self):
        for name in ("steps", "vision_steps", "batch_size", "vision_batch_size", "train_examples", "test_images",
                     "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.threads is not None and self.threads < 0:
            raise ValueError(f"--threads: expected 0 (torch's choice) or a positive count, got {self.threads}")


def _prepare_out(out: Path) -> None:
    """An empty or new folder, or a previous VLM demo's (whose outputs are removed)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; expected a folder for the demo's data and models")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"--out: {out} is not empty and holds no VLM demo ({MARKER} is missing); "
                             "choose a new or empty folder")
        for name in OWNED:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_vlm_demo(cfg: VLMDemoConfig, log=print) -> dict:
    """Builds, fine-tunes, evaluates and saves (module docstring); returns the report (also
    out/report.json). log(str) gets the progress lines (None: silent)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("vlmfast demo vlm runs in one process; under torchrun use vlmfast finetune on its data")
    log = log or (lambda message: None)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: VLMDemoConfig, log) -> dict:
    from vlmfast.data.synthetic import SyntheticShapes
    from vlmfast.eval.runners import run_vqa
    from vlmfast.pipelines import pipeline
    from vlmfast.train.demo_vlm_vision import pretrain_vision_tower, vision_tower_state
    from vlmfast.train.finetune import finetune

    started = time.perf_counter()
    elapsed = lambda: f"{time.perf_counter() - started:.1f} s"  # noqa: E731
    out = Path(cfg.out)
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    architecture = TinySmolVLM()
    shapes = SyntheticShapes(cfg.train_examples, image_size=architecture.image_size, seed=cfg.seed)
    samples = [shapes[i] for i in range(cfg.train_examples)]  # drawn once: both stages train on them
    train_file = write_shape_conversations(out / "data", n=cfg.train_examples, seed=cfg.seed,
                                           image_size=architecture.image_size, samples=samples)
    questions, annotations = write_shape_vqa(out / "data" / "vqa", cfg.test_images,
                                             seed=cfg.seed + HELD_OUT_SEED_OFFSET, image_size=architecture.image_size)
    examples = read_instructions(train_file)
    log(f"data: {len(examples)} training conversations, {cfg.test_images} held-out images ({elapsed()})")

    # stage 1: the vision tower on the same training images with their captions
    t0 = time.perf_counter()
    images, captions = np.stack([sample.image for sample in samples]), [sample.caption for sample in samples]
    siglip = pretrain_vision_tower(architecture, images, captions, steps=cfg.vision_steps,
                                   batch_size=cfg.vision_batch_size, lr=cfg.lr, seed=cfg.seed, log=log)
    vision_seconds = time.perf_counter() - t0
    base = build_tiny_smolvlm(out / "base", texts=_rendered(example.messages for example in examples), seed=cfg.seed,
                              architecture=architecture, vision_tower=vision_tower_state(siglip))
    log(f"model: a tiny SmolVLM around that tower, with a tokenizer trained here, in {base} ({elapsed()})")

    # stage 2: connector and decoder on the conversations, the tower frozen
    every = max(1, cfg.steps // 10)

    def progress(message: str) -> None:  # finetune logs every step: keep a tenth of them
        if message.startswith("step "):
            step = int(message.split()[1].split("/")[0])
            if step % every and step != cfg.steps:
                return
        log(message)

    model_dir = out / "model"
    t0 = time.perf_counter()
    trained = finetune(base, train_file, model_dir, log=progress, steps=cfg.steps, lr=cfg.lr,
                       batch_size=cfg.batch_size, warmup_steps=max(1, cfg.steps // 15), min_lr_ratio=0.02,
                       weight_decay=0.01, freeze_vision=True, seed=cfg.seed, device="cpu", threads=None)
    train_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    generate = pipeline("image-text-to-text", str(model_dir), device="cpu",
                        max_new_tokens=cfg.max_new_tokens, batch_size=64)
    vqa = run_vqa(generate, questions, annotations, questions.parent, prompt=VQA_PROMPT, batch_size=64,
                  report=out / "vqa_report.json", show_progress=False)
    eval_seconds = time.perf_counter() - t0
    report = {
        "vqa_accuracy": vqa["accuracy"],
        "per_question_type": vqa["per_question_type"],
        "num_questions": vqa["num_questions"],
        "num_test_images": cfg.test_images,
        "examples": _examples(questions, vqa["predictions"]),
        "steps": cfg.steps, "vision_steps": cfg.vision_steps, "batch_size": cfg.batch_size,
        "train_examples": cfg.train_examples, "parameters": trained["parameters"],
        "first_loss": trained["first_loss"], "final_loss": trained["last_loss"],
        "vision_seconds": round(vision_seconds, 2), "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2), "total_seconds": round(time.perf_counter() - started, 2),
        "model": str(model_dir), "data": str(train_file), "vqa_questions": str(questions),
        "vqa_annotations": str(annotations), "vqa_images": str(questions.parent), "out": str(out),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _examples(questions: Path, predictions: list[dict], n: int = 3) -> list[dict]:
    """The first n questions with their image and the model's answer (the report shows them)."""
    by_id = {q["question_id"]: q for q in json.loads(questions.read_text())["questions"]}
    return [{"image": str(questions.parent / by_id[p["question_id"]]["image"]),
             "question": by_id[p["question_id"]]["question"], "answer": p["answer"]} for p in predictions[:n]]
