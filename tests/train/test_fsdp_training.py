"""FSDP2 training (TrainConfig(fsdp=True): torch.distributed.fsdp.fully_shard, gloo on the CPU):
2 processes x local batch 4 give the same per-step losses and final weights as 1 process with
batch 8, with gradient accumulation and clipping; the sharded checkpoint (torch.distributed.
checkpoint, one folder of per-rank shards) resumes to the same result as the uninterrupted run."""

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.test_distributed_training import (
    WORLD, _free_port, assert_every_rank_equals, assert_every_rank_resumed, config, global_batches, tiny,
)
from vlmfast.train import Trainer
from vlmfast.train.trainer import CHECKPOINT_NAME

KINDS = ("clip", "siglip")


def train(kind, folder, *, seed=0, stop_at=None, fsdp=False, **kw):
    model = tiny(kind, seed=seed)
    trainer = Trainer(model, config(folder, fsdp=fsdp, grad_accum=2, **kw), global_batches)
    losses = trainer.fit(stop_at=stop_at)
    return losses, {k: v.detach().clone() for k, v in trainer.full_state_dict().items()}


def _worker(rank: int, port: int, root: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        for kind in KINDS:
            base = Path(root) / kind
            # rank 1 builds its replica from another seed: rank 0's weights must be the ones sharded
            results[kind] = train(kind, base / "whole", seed=rank, fsdp=True)
            train(kind, base / "resumed", seed=rank, fsdp=True, stop_at=2, checkpoint_every=2)
            results[kind + "/files"] = sorted(os.listdir(base / "resumed" / "ckpt"))
            dist.barrier()
            results[kind + "/resumed"] = train(kind, base / "resumed", seed=rank, fsdp=True)
        torch.save(results, Path(root) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as test_distributed_training: no gloo teardown at interpreter exit


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    pytest.importorskip("torch.distributed.fsdp")
    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_two_ranks_equal_one_process_with_the_whole_batch(two_process_run, kind, tmp_path):
    _, ranks = two_process_run
    losses, weights = train(kind, tmp_path)
    assert_every_rank_equals(ranks, kind, losses, weights)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_sharded_checkpoint_resumes(two_process_run, kind):
    root, ranks = two_process_run
    assert ranks[0][kind + "/files"] == ["sharded-step-00000002", CHECKPOINT_NAME]
    shards = os.listdir(root / kind / "resumed" / "ckpt" / "sharded-step-00000004")
    assert sum(name.endswith(".distcp") for name in shards) == WORLD  # one file of shards per rank
    assert_every_rank_resumed(ranks, kind)


def test_fsdp_checkpoint_is_not_resumed_whole(tmp_path):
    from vlmfast.train import TrainConfig

    model = tiny("clip")
    trainer = Trainer(model, config(tmp_path), global_batches)
    trainer.fit(stop_at=1)
    trainer.save_checkpoint()
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    state["sharded"] = "sharded-step-00000001"
    torch.save(state, tmp_path / "ckpt" / CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="fsdp=True"):
        Trainer(tiny("clip"), config(tmp_path), global_batches)
    with pytest.raises(ValueError, match="fsdp: not with optimizer_in_backward"):
        TrainConfig(steps=1, fsdp=True, optimizer_in_backward=True)
