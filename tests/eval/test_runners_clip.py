"""The contrastive runners with vlmfast's own CLIP (tiny, random weights): the runner's numbers
equal the metrics of features computed directly, in one batch, from the same model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast.eval import recall_at_k, runners, zero_shot_accuracy

models = pytest.importorskip("vlmfast.models")

WORDS = ["<pad>", "<bos>", "<eos>", "a", "photo", "of", "red", "green", "blue", "striped", "dotted", "square"]


def tiny_clip():
    from vlmfast.models.config import CLIPConfig, TextConfig, VisionConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=TextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=12, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2),
        vision_config=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=16),
        projection_dim=16,
    )
    return models.CLIP(config).eval()


def preprocess(image):
    pixels = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


def tokenize(texts):
    rows = [[1] + [WORDS.index(w) for w in t.lower().replace(".", "").split()] + [2] for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    return ids, (ids != 0).long()


def _images(tmp_path, count):
    rng = np.random.default_rng(0)
    paths = []
    for k in range(count):
        path = tmp_path / "images" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(40, 36, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _direct(model, paths, texts):
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
        txt = model.encode_text(*tokenize(texts))
    return torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)


def test_retrieval_with_clip(tmp_path):
    model = tiny_clip()
    paths = _images(tmp_path, 7)
    rng = np.random.default_rng(1)
    vocab = WORDS[3:]
    captions = [[" ".join(rng.choice(vocab, size=4)) for _ in range(int(rng.integers(1, 4)))] for _ in paths]
    data = {"images": [{"id": k, "file_name": p.name} for k, p in enumerate(paths)],
            "annotations": [{"image_id": k, "caption": c} for k, caps in enumerate(captions) for c in caps]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    report = runners.run_retrieval(model, tmp_path / "captions.json", tmp_path / "images", preprocess, tokenize,
                                   ks=(1, 2, 5), batch_size=3, show_progress=False)
    texts = [c for caps in captions for c in caps]
    owner = [k for k, caps in enumerate(captions) for _ in caps]
    img, txt = _direct(model, paths, texts)
    sim = img @ txt.T
    i2t = recall_at_k(sim, [[t for t, o in enumerate(owner) if o == k] for k in range(len(paths))], ks=(1, 2, 5))
    t2i = recall_at_k(sim.T, [[o] for o in owner], ks=(1, 2, 5))
    assert report["image_to_text"] == {f"R@{k}": pytest.approx(v) for k, v in i2t.items()}
    assert report["text_to_image"] == {f"R@{k}": pytest.approx(v) for k, v in t2i.items()}


def test_zeroshot_with_clip(tmp_path):
    model = tiny_clip()
    paths = _images(tmp_path, 9)
    classes = ["blue", "green", "red", "striped_square"]
    files, labels = [], []
    for k, path in enumerate(paths):
        label = k % len(classes)
        target = tmp_path / "data" / classes[label] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
        files.append(target)
        labels.append(label)
    templates = ["a photo of a {}.", "a {}"]
    report = runners.run_zeroshot(model, tmp_path / "data", preprocess, tokenize, templates=templates,
                                  batch_size=4, show_progress=False)
    names = [c.replace("_", " ") for c in classes]
    order = sorted(range(len(files)), key=lambda i: (labels[i], files[i].name))
    img, txt = _direct(model, [files[i] for i in order], [t.format(n) for n in names for t in templates])
    class_emb = torch.nn.functional.normalize(txt.reshape(len(names), len(templates), -1).mean(1), dim=-1)
    expected = zero_shot_accuracy(img @ class_emb.T, [labels[i] for i in order], ks=(1, 5))
    assert report["classes"] == names
    assert report["top1"] == pytest.approx(expected[1]) and report["top5"] == 1.0
