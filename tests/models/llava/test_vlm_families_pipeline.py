"""vlmfast.pipeline, `vlmfast generate` and `vlmfast eval caption` on tiny LLaVA and BLIP-2
checkpoints (the family read from config.json), against transformers end to end: its processor,
its generate, its decoding."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmfast
from tests.models.blip2.checkpoint import write_checkpoint as write_blip2
from tests.models.llava.checkpoint import write_checkpoint as write_llava
from vlmfast.cli import main
from vlmfast.models import Blip2, Llava, from_pretrained

NEW = 5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    images = tmp_path_factory.mktemp("images")
    for name, (h, w, seed) in {"a.png": (50, 70, 1), "b.png": (31, 45, 2)}.items():
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    return {"llava": write_llava(tmp_path_factory.mktemp("llava"), seed=4),
            "blip-2": write_blip2(tmp_path_factory.mktemp("blip2"), seed=4)}, images


def transformers_answers(path, images, prompts):
    """transformers' own processor + generate + decode for the same prompts."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor.tokenizer.padding_side = "left"
    if model.config.model_type == "llava":
        texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": p}]}],
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]


@pytest.mark.parametrize("family", ["llava", "blip-2"])
def test_pipeline_equals_transformers(folders, family):
    paths, images = folders
    pictures = [Image.open(images / "a.png"), Image.open(images / "b.png")]
    prompts = ["What is in this image?", "Question: how many dogs are there? Answer:"]
    pipe = vlmfast.pipeline("image-text-to-text", model=paths[family], max_new_tokens=NEW)
    assert isinstance(pipe.model, {"llava": Llava, "blip-2": Blip2}[family])
    assert isinstance(from_pretrained(paths[family]), {"llava": Llava, "blip-2": Blip2}[family])
    assert pipe(pictures, prompts) == transformers_answers(paths[family], pictures, prompts)


@pytest.mark.parametrize("family", ["llava", "blip-2"])
def test_cli_generate_and_eval_caption(folders, family, tmp_path, capsys):
    paths, images = folders
    pipe = vlmfast.pipeline("image-text-to-text", model=paths[family], max_new_tokens=NEW)
    assert main(["generate", "--model", str(paths[family]), "--image", str(images / "a.png"), "--prompt", "What is it?",
                 "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == pipe([images / "a.png"], ["What is it?"])[0] + "\n"

    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"image_id": 1, "id": 1, "caption": "a cat on a mat"},
                        {"image_id": 2, "id": 2, "caption": "two dogs"}]}))
    assert main(["eval", "caption", "--model", str(paths[family]), "--annotations", str(annotations),
                 "--images", str(images), "--split", "all", "--max-new-tokens", str(NEW), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    prompt = "Describe this image in one sentence."
    expected = pipe([images / "a.png", images / "b.png"], [prompt, prompt])
    assert [p["caption"] for p in report["predictions"]] == expected
