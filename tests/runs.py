"""Launching short pretraining runs in several CPU processes (gloo) and comparing two runs."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from mimfast.train.checkpoint import load_checkpoint
from mimfast.train.config import PretrainConfig
from mimfast.train.pretrain import pretrain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_process_group(rank: int, world: int, port: int) -> None:
    """The environment torchrun would give process ``rank`` of ``world`` (one thread each)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _pretrain_worker(rank, world, port, out, cfg_values):
    join_process_group(rank, world, port)
    pretrain(PretrainConfig(**cfg_values, output_dir=out))


# Forked from a server that has imported the training modules but never run a backward: forking
# the test process itself is cheaper but breaks once autograd has started its device threads
# there ("Unable to handle autograd's threading in combination with fork-based multiprocessing"),
# which depends on which tests ran before (an FSDP test before the first backward is enough).
START_METHOD = "forkserver"
mp.set_forkserver_preload(["torch", "mimfast.train.pretrain", "runs"])


def spawn(fn, world: int, *args) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` fresh processes."""
    mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=True, start_method=START_METHOD)


def pretrain_processes(world: int, out, cfg_values: dict) -> None:
    """``pretrain`` in ``world`` gloo processes writing to ``out``."""
    spawn(_pretrain_worker, world, str(out), cfg_values)


def step_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(out, "log.jsonl")))}


def assert_same_training(a, b, steps: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Runs ``a`` and ``b`` logged the same ``steps`` losses and ended with the same weights."""
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=rtol, abs=atol)
    wa = load_checkpoint(os.path.join(a, "checkpoint-last.pth"))["model"]
    wb = load_checkpoint(os.path.join(b, "checkpoint-last.pth"))["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol)
