"""Small fixtures for the command-line tests: the demo's tiny CLIP with random weights (no
training: the tests compare the commands' outputs with the model's own, whatever it learnt), and
folders of the built-in shapes images."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmfast.data.synthetic import SyntheticShapes, caption_vocabulary
from vlmfast.models import CLIP
from vlmfast.models.tokenizer import word_tokenizer
from vlmfast.train.demo import IMAGE_MEAN, IMAGE_STD, demo_model

IMAGE_SIZE = 24


def tiny_clip(path, *, seed: int = 0) -> Path:
    """The demo's CLIP architecture, random weights from `seed`, saved as `vlmfast demo` saves it."""
    path = Path(path)
    torch.manual_seed(seed)
    context = 16
    tokenizer = word_tokenizer(caption_vocabulary(), context_length=context)
    model = demo_model(tokenizer.vocab_size, IMAGE_SIZE, context)
    model.save_pretrained(path)
    tokenizer.save(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGE_MEAN), "image_std": list(IMAGE_STD), "resample": 3,
    }))
    return path


def shape_images(folder, n: int, *, seed: int = 5, prefix: str = "img") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = SyntheticShapes(n, seed=seed, image_size=IMAGE_SIZE)
    paths = []
    for i in range(n):
        paths.append(folder / f"{prefix}{i:02d}.png")
        Image.fromarray(shapes[i].image).save(paths[-1])
    return paths


def direct_embedding(model_dir, paths) -> np.ndarray:
    """What the image tower gives for these files, computed here without the command."""
    model = CLIP.from_pretrained(model_dir)
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))) for p in paths])
    with torch.no_grad():
        features = model.encode_image(images, mean=torch.tensor(IMAGE_MEAN), std=torch.tensor(IMAGE_STD))
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def read_embeddings(out) -> tuple[list[str], np.ndarray]:
    """(paths, rows) of every shard the manifest lists, in order."""
    out = Path(out)
    manifest = json.loads((out / "manifest.json").read_text())
    paths, arrays = [], []
    for shard in manifest["shards"]:
        paths += (out / shard["paths"]).read_text().splitlines()
        arrays.append(np.load(out / shard["file"]))
    return paths, np.concatenate(arrays)


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir() if p.is_file()}
