"""`vlmfast generate --requests` split over torchrun ranks (gloo on the CPU): each rank answers its
share into OUT.rankR, rank 0 merges them into OUT; a run after a crash merges the rank files left
over first and answers only what is missing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import vlmfast
from vlmfast.generation import rank_shards


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_merge_keeps_complete_lines_once_and_removes_the_rank_files(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 1, "output": "a"}\n{"id": 2, "err')  # a line cut short at the end
    (tmp_path / "out.jsonl.rank0").write_text('{"id": 1, "output": "again"}\n{"id": 3, "output": "c"}\n')
    (tmp_path / "out.jsonl.rank1").write_text('{"id": 4, "error": "bad image"}\n{"id": 2, "output": "b"}\n{"id"')
    (tmp_path / "out.jsonl.ranking").write_text("not a rank file")
    assert rank_shards.merge(out) == 3
    assert _lines(out) == [{"id": 1, "output": "a"}, {"id": 3, "output": "c"}, {"id": 4, "error": "bad image"},
                           {"id": 2, "output": "b"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "out.jsonl.ranking"]
    assert rank_shards.merge(out) == 0  # nothing left: OUT unchanged


def test_two_ranks_resume_a_crashed_run_and_answer_as_one_process(tmp_path):
    pytest.importorskip("transformers")
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this python")
    from tests.models.smolvlm_checkpoint import write_checkpoint
    from tests.serving.server_helpers import random_image
    from tests.train.test_distributed_training import _free_port

    checkpoint = write_checkpoint(tmp_path / "ckpt")
    random_image(50, 70, 1).save(tmp_path / "a.png")
    random_image(31, 45, 2).save(tmp_path / "b.png")
    requests = [{"id": i, "prompt": p, "images": imgs} for i, (p, imgs) in enumerate(
        [("What?", ["a.png"]), ("Hi.", []), ("Compare.", ["b.png", "a.png"]), ("Colour?", ["b.png"]),
         ("Missing?", ["gone.png"]), ("Again?", ["a.png"])])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out.jsonl"
    # a crashed earlier run: one answer in OUT, one in a rank file, and a line cut short there
    pipe = vlmfast.pipeline("image-text-to-text", model=checkpoint, max_new_tokens=5)
    expected = {r["id"]: pipe([[str(tmp_path / i) for i in r["images"]]], [r["prompt"]])[0]
                for r in requests if r["id"] != 4}
    out.write_text(json.dumps({"id": 0, "output": expected[0]}) + "\n")
    (tmp_path / "out.jsonl.rank1").write_text(json.dumps({"id": 3, "output": expected[3]}) + '\n{"id": 5, "out')
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(vlmfast.__file__).resolve().parents[1])}
    done = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m",
                           "vlmfast.cli", "generate", "--model", str(checkpoint), "--requests",
                           str(tmp_path / "in.jsonl"), "--out", str(out), "--max-new-tokens", "5", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 alone prints it
    assert summary == {"requests": 6, "skipped": 2, "generated": 3, "failed": 1, "out": str(out)}
    results = _lines(out)
    assert sorted(r["id"] for r in results) == list(range(6))  # each once
    for r in results:
        if r["id"] == 4:
            assert "gone.png" in r["error"]
        else:
            assert r["output"] == expected[r["id"]]
    assert not rank_shards.leftover_shards(out)
