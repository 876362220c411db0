"""The `vlmfast` command: a tiny demo end to end (outputs exist, report fields, the saved model
loads in vlmfast and transformers), embed (shards, resume) and zeroshot on its model; the full
demo's accuracy under VLMFAST_SLOW=1."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vlmfast.cli import COMMANDS, build_parser, main
from vlmfast.data.synthetic import CLASSES, SyntheticShapes
from vlmfast.models import CLIP

REPORT_FIELDS = {"zero_shot_accuracy", "num_classes", "image_to_text", "text_to_image", "steps", "train_seconds", "out"}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "model"
    code = main(["demo", "--steps", "3", "--batch-size", "16", "--train-images", "64", "--test-images", "24",
                 "--out", str(out), "--threads", "1", "--quiet"])
    assert code == 0
    return out


def test_tiny_demo_writes_the_model_and_the_report(demo_dir, capsys):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                 "report.json", "metrics.jsonl"):
        assert (demo_dir / name).is_file(), name
    report = json.loads((demo_dir / "report.json").read_text())
    assert REPORT_FIELDS <= set(report)
    assert report["num_classes"] == len(CLASSES) >= 8 and report["steps"] == 3
    assert 0.0 <= report["zero_shot_accuracy"] <= 1.0 and set(report["image_to_text"]) == {"R@1", "R@5"}
    assert len((demo_dir / "metrics.jsonl").read_text().splitlines()) == 3
    model = CLIP.from_pretrained(demo_dir)
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPModel.from_pretrained(demo_dir).eval()
    pixels = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_image_features(pixels).pooler_output, model.encode_image(pixels),
                                   rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    ds = SyntheticShapes(7, seed=5, image_size=24)
    for i in range(7):
        Image.fromarray(ds[i].image).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_embed_writes_resumable_shards(demo_dir, image_dir, tmp_path):
    out = tmp_path / "emb"
    args = ["embed", "--model", str(demo_dir), "--images", str(image_dir), "--out", str(out),
            "--shard-size", "3", "--batch-size", "2", "--device", "cpu"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    feats = np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])
    paths = sum(((out / s["paths"]).read_text().splitlines() for s in manifest["shards"]), [])
    assert len(paths) == 7 and feats.shape == (7, 64) and not any("broken" in p for p in paths)
    assert [f["path"] for f in manifest["failed"]] == [str(image_dir / "broken.png")]
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    model = CLIP.from_pretrained(demo_dir)
    from vlmfast.train.demo import IMAGE_MEAN, IMAGE_STD

    image = torch.from_numpy(np.array(Image.open(paths[4]).convert("RGB")))[None]
    with torch.no_grad():
        direct = torch.nn.functional.normalize(
            model.encode_image(image, mean=torch.tensor(IMAGE_MEAN), std=torch.tensor(IMAGE_STD)), dim=-1)
    np.testing.assert_allclose(feats[4], direct[0].numpy(), rtol=1e-4, atol=1e-5)

    # a rerun with nothing new rewrites the manifest only
    before = {p: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before
    assert json.loads((out / "manifest.json").read_text())["images"] == 7


def test_embed_safetensors_and_zeroshot(demo_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["embed", "--model", str(demo_dir), "--images", str(image_dir), "--out", str(out), "--format",
                 "safetensors", "--device", "cpu"]) == 0
    from safetensors.torch import load_file

    assert load_file(out / "shard-00000.safetensors")["embeddings"].shape == (7, 64)
    capsys.readouterr()
    labels = ",".join(CLASSES)
    assert main(["zeroshot", "--model", str(demo_dir), "--images", str(image_dir), "--labels", labels,
                 "--templates", "a {}|a picture of a {}", "--top-k", "2", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == {"path": str(image_dir / "broken.png"), "error": "not an image file Pillow can read"}
    rows = rows[1:]
    assert len(rows) == 7 and all(len(r["labels"]) == 2 and r["labels"][0] in CLASSES for r in rows)
    assert all(r["scores"][0] >= r["scores"][1] for r in rows)


def test_errors_are_reported_not_raised(demo_dir, tmp_path, capsys):
    assert main(["embed", "--model", str(demo_dir), "--images", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "argument --images: no such file or folder" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


def test_eval_zeroshot_agrees_with_the_zeroshot_command(demo_dir, tmp_path, capsys):
    """`vlmfast eval zeroshot` (runner over a folder per class) and `vlmfast zeroshot` (per-image
    predictions) are two code paths over the same model: the runner's top-1 must equal the share
    of per-image predictions that name the right class."""
    data = tmp_path / "classes"
    ds = SyntheticShapes(24, seed=9, image_size=24)
    for i in range(len(ds)):
        folder = data / CLASSES[ds[i].label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds[i].image).save(folder / f"{i}.png")
    report_file = tmp_path / "report.json"
    assert main(["eval", "zeroshot", "--model", str(demo_dir), "--data", str(data), "--template", "a {}",
                 "--device", "cpu", "--report", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    capsys.readouterr()
    present = sorted(p.name.replace("_", " ") for p in data.iterdir())
    assert main(["zeroshot", "--model", str(demo_dir), "--images", str(data), "--labels", ",".join(present),
                 "--templates", "a {}", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    correct = [r["labels"][0] == os.path.basename(os.path.dirname(r["path"])).replace("_", " ") for r in rows]
    assert len(rows) == 24
    assert report["top1"] == pytest.approx(sum(correct) / len(correct))


def test_dedup_groups_a_resized_copy(tmp_path, capsys):
    ds = SyntheticShapes(3, seed=2, image_size=96)
    for i in range(3):
        Image.fromarray(ds[i].image).save(tmp_path / f"{i}.png")
    Image.fromarray(ds[0].image).resize((64, 64)).save(tmp_path / "0-small.png")
    report_file = tmp_path / "dedup.json"
    assert main(["dedup", str(tmp_path), "--report", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert [sorted(group) for group in report["groups"]] == [["0-small.png", "0.png"]]


def test_subcommands_are_registered_in_one_table():
    assert {"demo", "embed", "zeroshot", "bench", "eval", "dedup"} <= set(COMMANDS)
    assert build_parser().parse_args(["demo", "--steps", "5"]).steps == 5


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLMFAST_SLOW") != "1", reason="the full demo takes minutes; set VLMFAST_SLOW=1")
def test_full_demo_reaches_80_percent(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["zero_shot_accuracy"] >= 0.80, report
