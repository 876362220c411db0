"""Outputs of the commands (issue 19, item 10): the demo's folder is ignored by git, every file a
command writes has the umask's permissions (atomic writes included), and the demo's step lines and
its final line time the same thing."""

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.cli.helpers import shape_images, tiny_clip
from vlmfast.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_DEMO = ["demo", "--steps", "3", "--batch-size", "16", "--train-images", "64", "--test-images", "24", "--threads", "1"]


def test_the_demo_folder_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "vlmfast-demo/model.safetensors"], cwd=ROOT)
    assert ignored.returncode == 0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_written_file_has_the_umask_mode(tmp_path, umask, capsys):
    images = tmp_path / "images"
    shape_images(images, 2)
    model = tiny_clip(tmp_path / "model")
    previous = os.umask(umask)
    try:
        assert main([*TINY_DEMO, "--out", str(tmp_path / "demo"), "--quiet"]) == 0
        assert main(["embed", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "emb")]) == 0
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    files = [p for folder in ("demo", "emb") for p in (tmp_path / folder).rglob("*") if p.is_file()]
    assert {"config.json", "model.safetensors", "tokenizer.json", "report.json", "manifest.json"} <= {p.name for p in files}
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(expected)}, modes


def test_demo_step_lines_and_final_line_use_one_clock(tmp_path, capsys):
    assert main([*TINY_DEMO, "--out", str(tmp_path / "demo")]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    last_step = re.findall(r"step 3/3 .*\(([\d.]+) s of training\)", captured.err)
    final = re.search(r"trained 3 steps in ([\d.]+) s \(([\d.]+) s in all", captured.out)
    assert last_step and final, captured
    assert float(last_step[0]) <= float(final.group(1)) + 0.05  # the same clock, read a moment later
    assert float(final.group(1)) == pytest.approx(report["train_seconds"], abs=0.05)
    assert float(final.group(2)) >= float(final.group(1))
    assert "step 1/3" not in captured.out  # progress is on stderr, the result on stdout
