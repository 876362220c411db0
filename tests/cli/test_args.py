"""One argument-checking layer for every command (issue 19, item 6): a bad value is refused by the
flag's name with argparse's status 2 before any work, never a raw Python error or a traceback."""

import pytest
import torch

from tests.cli.helpers import shape_images, tiny_clip
from vlmfast import cli_args
from vlmfast.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    model = tiny_clip(root / "model")
    shape_images(root / "images", 2)
    (root / "data.jsonl").write_text("{}\n")
    (root / "vlm").mkdir()  # parsing reads only config.json: enough for the flags' checks
    (root / "vlm" / "config.json").write_text('{"model_type": "smolvlm"}')
    return root, model


def _commands(root, model):
    images, data = str(root / "images"), str(root / "data.jsonl")
    clip = ["--model", str(model), "--images", images]
    return {
        "embed": ["embed", *clip, "--out", str(root / "out")],
        "zeroshot": ["zeroshot", *clip, "--labels", "a,b"],
        "eval zeroshot": ["eval", "zeroshot", "--model", str(model), "--data", images],
        "generate": ["generate", "--model", str(root / "vlm"), "--requests", data, "--out", str(root / "r.jsonl")],
        "finetune": ["finetune", "--model", str(root / "vlm"), "--data", data, "--out", str(root / "ft")],
        "demo": ["demo", "--out", str(root / "demo")],
    }


@pytest.mark.parametrize("command", ["embed", "zeroshot", "eval zeroshot", "generate", "finetune", "demo"])
def test_batch_size_zero_names_the_flag(setup, command, capsys):
    argv = _commands(*setup)[command] + ["--batch-size", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "argument --batch-size: expected a positive integer (1 or more), got 0" in err
    assert "Traceback" not in err and "range()" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["embed", "zeroshot", "eval zeroshot", "generate", "finetune"])
def test_device_cuda_without_cuda_is_one_line(setup, command, capsys):
    assert main(_commands(*setup)[command] + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "argument --device: cuda: CUDA is not available here" in err and "use --device cpu" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["embed", "--model", "{root}/nope", "--images", "{root}/images", "--out", "{root}/o"],
     "argument --model: no such folder"),
    (["embed", "--model", "{root}/images", "--images", "{root}/images", "--out", "{root}/o"],
     "argument --model: expected a checkpoint folder with config.json"),
    (["embed", "--model", "{model}", "--images", "{root}/nope", "--out", "{root}/o"],
     "argument --images: no such file or folder"),
    (["embed", "--model", "{model}", "--images", "{root}/images", "--out", "{root}/data.jsonl"],
     "argument --out: expected a folder to write into"),
    (["embed", "--model", "{model}", "--images", "{root}/images", "--out", "{root}/o", "--shard-size", "-1"],
     "argument --shard-size: expected a positive integer"),
    (["embed", "--model", "{model}", "--images", "{root}/images", "--out", "{root}/o", "--device", "gpu"],
     "argument --device: expected a device such as cpu, cuda or cuda:1"),
    (["embed", "--model", "{root}/vlm", "--images", "{root}/images", "--out", "{root}/o"],
     "argument --model: expected a CLIP or SigLIP checkpoint, {root}/vlm/config.json says model_type='smolvlm'"),
    (["finetune", "--model", "{model}", "--data", "{root}/data.jsonl", "--out", "{root}/o"],
     "argument --model: expected a vision-language checkpoint"),
    (["generate", "--model", "{model}", "--prompt", "hi"], "argument --model: expected a vision-language checkpoint"),
    (["dedup", "{root}/images", "--max-distance", "65"], "argument --max-distance: expected an integer from 0 to 64 bits"),
    (["dedup", "{root}/nope"], "argument folder: no such folder"),
    (["dedup", "{root}/images", "--report", "{root}/images"], "argument --report: expected a file name to write"),
    (["eval", "zeroshot", "--model", "{model}", "--data", "{root}/images", "--report", "{root}/data.jsonl/r.json"],
     "argument --report: cannot write"),
    (["finetune", "--model", "{root}/vlm", "--data", "{root}/data.jsonl", "--out", "{root}/o", "--lr", "-1"],
     "argument --lr: expected a positive number"),
    (["finetune", "--model", "{root}/vlm", "--data", "{root}/data.jsonl", "--out", "{root}/o", "--lora-dropout", "1"],
     "argument --lora-dropout: expected a number from 0 up to (not including) 1"),
    (["finetune", "--model", "{root}/vlm", "--data", "{root}/data.jsonl", "--out", "{root}/o", "--steps", "2",
      "--warmup-steps", "5"], "argument --warmup-steps: expected at most --steps (2), got 5"),
    (["demo", "--train-images", "10", "--batch-size", "64"], "argument --train-images: expected at least the batch size"),
    (["eval", "vqa", "--model", "{root}/vlm", "--questions", "{root}/data.jsonl", "--annotations", "{root}/data.jsonl",
      "--images", "{root}/images", "--prompt", "Answer:"], "argument --prompt: 'Answer:': expected {question} in it"),
    (["eval", "vqa", "--model", "{root}/vlm", "--questions", "{root}/data.jsonl", "--annotations", "{root}/data.jsonl",
      "--images", "{root}/images", "--image-file", "{id}.jpg"], "argument --image-file: '{id}.jpg': cannot be filled"),
    (["generate", "--model", "{root}/vlm", "--prompt", "hi", "--requests", "{root}/data.jsonl", "--out", "{root}/r"],
     "argument --prompt/--requests: give exactly one"),
    (["generate", "--model", "{root}/vlm", "--requests", "{root}/data.jsonl", "--out", "{root}"],
     "argument --out: expected a file name to write"),
])
def test_bad_values_are_named_by_their_flag(setup, argv, message, capsys):
    root, model = setup
    argv = [a.format(root=root, model=model) if "{root}" in a or "{model}" in a else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{root}", str(root)) in err, err
    assert "Traceback" not in err


def test_checkers_accept_what_they_should(tmp_path):
    assert cli_args.positive_int("3") == 3 and cli_args.non_negative_int("0") == 0
    assert cli_args.int_in(0, 64)("64") == 64 and cli_args.fraction("0.5") == 0.5
    assert cli_args.device("cpu") == "cpu"
    assert cli_args.labels("red circle, blue square") == ["red circle", "blue square"]
    assert cli_args.labels('["a", "b, c"]') == ["a", "b, c"]
    (tmp_path / "labels.csv").write_text("cat, dog\nbird\n")
    assert cli_args.labels(str(tmp_path / "labels.csv")) == ["cat", "dog", "bird"]
    assert cli_args.templates("a {}|a photo of a {label}.") == ["a {}", "a photo of a {}."]
    assert cli_args.template("{{literal}} {}") == "{{literal}} {}"
    assert cli_args.fills(image_id=1)("COCO_{image_id:012d}.jpg") == "COCO_{image_id:012d}.jpg"
    for bad in ("nan", "inf"):
        with pytest.raises(cli_args.Invalid, match="finite"):
            cli_args.positive_float(bad)
