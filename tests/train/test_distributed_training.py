"""Data-parallel training (torchrun-style, gloo on the CPU, DistributedDataParallel): 2 processes x
local batch 4 give the same per-step losses and final weights as 1 process with batch 8 (CLIP's
InfoNCE and SigLIP's sigmoid loss over the gathered global batch; a per-rank loss averaged), only
rank 0 writes the log and checkpoints, and a checkpoint written by the 2-process run resumes (in 2
processes and in 1). `vlmfast demo` runs under torchrun."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmfast.models import CLIP, CLIPConfig, SigLIP, SigLIPConfig, TextConfig, VisionConfig
from vlmfast.train import TrainConfig, Trainer
from vlmfast.train import distributed
from vlmfast.train.trainer import CHECKPOINT_NAME

WORLD, GLOBAL_BATCH, STEPS = 2, 8, 4
MODELS = ("clip", "siglip", "clip-per-rank-loss", "clip-local-batches")


def tiny(kind: str, seed: int = 0):
    text = TextConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=6, eos_token_id=19, hidden_act="gelu")
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=8, patch_size=4, hidden_act="gelu")
    torch.manual_seed(seed)
    if kind == "siglip":
        return SigLIP(SigLIPConfig(text_config=text, vision_config=vision))
    return CLIP(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


def global_batches(step, micro):
    """The step's whole batch, the same on every rank (a pure function of the step)."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(1, 19, (GLOBAL_BATCH, 5), generator=g)
    ids[:, -1] = 19
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), ids, None


def local_batches(step, micro):
    """This rank's rows only, as a loader that reads just its shard would give them."""
    pixels, ids, mask = global_batches(step, micro)
    if not dist.is_initialized():
        return pixels, ids, mask
    rows = slice(dist.get_rank() * GLOBAL_BATCH // WORLD, (dist.get_rank() + 1) * GLOBAL_BATCH // WORLD)
    return pixels[rows], ids[rows], mask


def per_rank_loss(model, pixel_values, input_ids, attention_mask=None):
    """A loss over this rank's rows only (a mean per row): no group keyword, gradients averaged."""
    return (model.encode_image(pixel_values) - model.encode_text(input_ids, attention_mask)).square().mean()


def config(folder, **kw):
    return TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=1, grad_accum=kw.pop("grad_accum", 1), max_grad_norm=1.0,
                       checkpoint_dir=str(folder / "ckpt"), log_path=str(folder / "log.jsonl"), **kw)


def train(kind, folder, *, seed=0, stop_at=None, **kw):
    model = tiny("siglip" if kind == "siglip" else "clip", seed=seed)
    options = {"loss_fn": per_rank_loss} if kind == "clip-per-rank-loss" else {}
    batches = global_batches
    if kind == "clip-local-batches":
        batches, options = local_batches, {"batches_are_local": True}
    trainer = Trainer(model, config(folder, **kw), batches, **options)
    losses = trainer.fit(stop_at=stop_at)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str):
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for kind in MODELS:
            base = Path(root) / kind
            # rank 1 builds its replica from another seed: the trainer's broadcast must fix it
            results[kind] = train(kind, base / "whole", seed=rank, grad_accum=2 if kind == "clip" else 1)
            # interrupted after 2 steps (checkpoint), then a new trainer resumes from it
            train(kind, base / "resumed", seed=rank, stop_at=2, checkpoint_every=2,
                  grad_accum=2 if kind == "clip" else 1)
            if rank == 0:  # the step-2 checkpoint, kept for the 1-process resume in the test
                shutil.copytree(base / "resumed" / "ckpt", base / "step2")
            dist.barrier()
            results[kind + "/resumed"] = train(kind, base / "resumed", seed=rank,
                                               grad_accum=2 if kind == "clip" else 1)
        torch.save(results, Path(root) / f"rank{rank}.pt")
        dist.barrier()  # both ranks leave together
    finally:
        dist.destroy_process_group()
    # Done and saved: skip interpreter finalisation, where a gloo child sometimes aborts on this
    # torch (see tests/ops/test_losses_distributed.py) after everything passed.
    os._exit(0)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def assert_every_rank_equals(ranks: list[dict], kind: str, losses, weights) -> None:
    """Each rank's (per-step losses, final weights) of run `kind` equal one process's."""
    for rank, results in enumerate(ranks):
        rank_losses, rank_weights = results[kind]
        torch.testing.assert_close(torch.tensor(rank_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6,
                                   msg=f"per-step losses, rank {rank}")
        assert rank_weights.keys() == weights.keys()
        for key in weights:
            torch.testing.assert_close(rank_weights[key], weights[key], rtol=1e-4, atol=1e-5,
                                       msg=f"{key} after {STEPS} steps, rank {rank}")


def assert_every_rank_resumed(ranks: list[dict], kind: str) -> None:
    """Each rank's resumed run (kind + "/resumed") has the losses and weights of rank 0's
    uninterrupted run."""
    whole_losses, whole_weights = ranks[0][kind]
    for results in ranks:
        resumed_losses, resumed_weights = results[kind + "/resumed"]
        assert resumed_losses == pytest.approx(whole_losses, rel=1e-6, abs=1e-7)
        for key in whole_weights:
            torch.testing.assert_close(resumed_weights[key], whole_weights[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", MODELS)
def test_two_ranks_equal_one_process_with_the_whole_batch(two_process_run, kind, tmp_path):
    root, ranks = two_process_run
    losses, weights = train(kind, tmp_path, grad_accum=2 if kind == "clip" else 1)
    assert_every_rank_equals(ranks, kind, losses, weights)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", MODELS)
def test_only_rank_0_writes_and_its_checkpoint_resumes(two_process_run, kind, tmp_path):
    root, ranks = two_process_run
    whole_losses, whole_weights = ranks[0][kind]
    assert_every_rank_resumed(ranks, kind)  # resumed in 2 processes: as the uninterrupted 2-process run
    # one log line per step (rank 1 wrote none), rewritten from step 2 on by the resumed run
    for run in ("whole", "resumed"):
        steps = [json.loads(line)["step"] for line in (root / kind / run / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(STEPS)), run
    assert sorted(os.listdir(root / kind / "whole" / "ckpt")) == [CHECKPOINT_NAME]
    # the 2-process checkpoint of step 2 resumed by 1 process with the whole batch
    shutil.copytree(root / kind / "step2", tmp_path / "ckpt")
    losses, weights = train(kind, tmp_path, grad_accum=2 if kind == "clip" else 1)
    assert losses == pytest.approx(whole_losses, rel=1e-5, abs=1e-6)
    for key in weights:
        torch.testing.assert_close(weights[key], whole_weights[key], rtol=1e-4, atol=1e-5, msg=key)


def test_shard_splits_rows_and_rejects_uneven_batches():
    context = distributed.DataParallel(group=None, rank=1, world=2)
    pixels, ids, _ = global_batches(0, 0)
    local = distributed.shard((pixels, ids, None), context)
    assert torch.equal(local[0], pixels[4:]) and torch.equal(local[1], ids[4:]) and local[2] is None
    with pytest.raises(ValueError, match=r"batches: expected a batch whose size divides among world=2 ranks, got 7"):
        distributed.shard((pixels[:7],), context)
    single = distributed.current()
    assert not single.enabled and single.is_main and distributed.shard((pixels,), single)[0] is pixels


def test_a_group_without_torch_distributed_is_rejected():
    with pytest.raises(ValueError, match="group: expected a process group of an initialised torch.distributed"):
        distributed.current(object())


def test_demo_runs_under_torchrun(tmp_path):
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed beside this python")
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "vlmfast.cli", "demo",
           "--out", str(out), "--steps", "3", "--batch-size", "16", "--train-images", "64", "--test-images", "32",
           "--quiet"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone printed the report
    assert report["world_size"] == 2 and report["steps"] == 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "model.safetensors").is_file()
