"""Resuming in another layout (number of processes, batch size, gradient accumulation): the
checkpoint's epoch position is a global sample count, converted to the new per-process start,
so the resumed run sees the rest of the epoch's order (nothing skipped, fewer than one global
step's samples again) with the LR schedule and the step counter where they belong."""

import contextlib
import json
import os
from unittest import mock

import pytest
import torch

import mimfast.train.pretrain as pretrain_module
from mimfast.data.sampler import ResumableSampler
from mimfast.train.checkpoint import load_checkpoint
from mimfast.train.config import PretrainConfig
from mimfast.train.pretrain import _resume_position
from mimfast.train.schedule import lr_at
from runs import join_process_group, spawn

N = 32
TINY = dict(
    model="mae_vit_tiny_patch16", img_size=16, patch_size=8,
    model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2),
    data="builtin", builtin_size=N, builtin_resolution=16, epochs=2, warmup_epochs=1, blr=1e-2, min_lr=1e-4,
    num_workers=0, kernels="eager", vis_every=0, tensorboard=False, log_every=1, seed=3, device="cpu",
    save_every=1, keep_checkpoints=8,
)


def _order(epoch):
    s = ResumableSampler(N, seed=TINY["seed"])
    s.set_epoch(epoch)
    return s.indices()


# ----------------------------------------------------------------------------- the conversion


@pytest.mark.parametrize("n", [10, 13, 32])
def test_start_for_resumes_the_global_order_in_any_layout(n):
    for w_old in (1, 2, 3, 4):
        for s_old in range(-(-n // w_old) + 1):
            old = ResumableSampler(n, seed=1, world_size=w_old)
            position = old.position(s_old)
            for w_new in (1, 2, 3, 4):
                for multiple in (1, 2, 3):
                    ranks = [ResumableSampler(n, seed=1, rank=r, world_size=w_new) for r in range(w_new)]
                    start = ranks[0].start_for(position, multiple)
                    assert start % multiple == 0 and 0 <= start <= ranks[0].per_rank
                    again = position - ranks[0].position(start)
                    assert again >= 0  # nothing skipped
                    if start // multiple < ranks[0].per_rank // multiple:  # not capped at the epoch's end
                        assert again <= w_new * multiple - 1
                    # the new ranks, interleaved, go on with the global order from there; the
                    # padding (past n) repeats the order from its start whatever the world size
                    base = ResumableSampler(n, seed=1).indices()
                    rest = [r.indices()[start:] for r in ranks]
                    merged = [rest[r][k] for k in range(len(rest[0])) for r in range(w_new)]
                    assert merged == (base + base)[w_new * start: w_new * ranks[0].per_rank]
                    assert old.indices() == (base + base)[: w_old * old.per_rank: w_old]

def _ckpt(step, epoch, start, world=None, batch=None, accum=None):
    c = {"step": step, "epoch": epoch, "sample_in_epoch": start}
    if world is not None:
        c.update(global_sample_in_epoch=start * world, world_size=world, batch_size=batch, accum_iter=accum)
    return c


def test_resume_position():
    two = ResumableSampler(N, world_size=2)  # this run: 2 processes, batch 4, accum 1 -> 4 steps an epoch
    # same layout, and a checkpoint from before layouts were recorded: the saved position as is
    assert _resume_position(_ckpt(3, 1, 12, 2, 4, 1), two, 4, 1, 4) == (3, 1, 12, None)
    assert _resume_position(_ckpt(3, 1, 12), two, 4, 1, 4) == (3, 1, 12, None)
    # 1 process, batch 8, 3 steps (24 samples) in: 12 per process, a step boundary here
    step, epoch, start, notice = _resume_position(_ckpt(3, 1, 24, 1, 8, 1), two, 4, 1, 4)
    assert (step, epoch, start) == (4 + 3, 1, 12)
    assert "position-exact but not bit-exact" in notice and "seen again" not in notice
    # 1 process, batch 4, 5 steps (20 samples): 10 per process, rounded down to 8 (4 samples again)
    step, epoch, start, notice = _resume_position(_ckpt(5, 0, 20, 1, 4, 1), two, 4, 1, 4)
    assert (step, epoch, start) == (2, 0, 8) and "4 samples are seen again" in notice
    # with accumulation the start is an optimizer step's boundary: 2 x 4 per process
    step, epoch, start, notice = _resume_position(_ckpt(5, 0, 20, 1, 4, 1), two, 4, 2, 2)
    assert (step, epoch, start) == (1, 0, 8)
    # a position in the epoch's tail that makes no whole step here starts the next epoch
    three = ResumableSampler(N, world_size=3)  # 11 per process: 2 steps of 4, 3 left out
    step, epoch, start, notice = _resume_position(_ckpt(7, 0, 28, 1, 4, 1), three, 4, 1, 2)
    assert (step, epoch, start) == (2, 1, 0) and "starts epoch 1" in notice
    # the same for an old same-layout checkpoint saved in such a tail
    assert _resume_position(_ckpt(2, 0, 10), three, 4, 1, 2) == (2, 1, 0, None)


# ----------------------------------------------------------------------------- end to end


class _Recording(ResumableSampler):
    """The sampler, writing down the (epoch, index) keys the loader actually takes."""

    seen = []

    def __iter__(self):
        for key in super().__iter__():
            _Recording.seen.append(list(key))
            yield key


def _run(rank, world, port, out, values):
    if world > 1:
        join_process_group(rank, world, port)
    _Recording.seen = []
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"stdout-{rank}.txt"), "w") as f, contextlib.redirect_stdout(f), \
            mock.patch.object(pretrain_module, "ResumableSampler", _Recording):
        pretrain_module.pretrain(PretrainConfig(**values, output_dir=out))
    with open(os.path.join(out, f"seen-{rank}.json"), "w") as f:
        json.dump(_Recording.seen, f)


def _launch(out, world, **kw):
    values = dict(TINY, **kw)
    if world == 1:
        _run(0, 1, 0, str(out), values)
    else:
        spawn(_run, world, str(out), values)
    seen = [json.loads((out / f"seen-{r}.json").read_text()) for r in range(world)]
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    return seen, log, (out / "stdout-0.txt").read_text()


def _by_epoch(seen, world):
    """The keys of all ranks in the global order (rank r's k-th is the (k * world + r)-th)."""
    merged = [seen[r][k] for k in range(len(seen[0])) for r in range(world)]
    assert all(len(s) == len(seen[0]) for s in seen)
    out = {}
    for e, i in merged:
        out.setdefault(e, []).append(i)
    return out


def _check_lr(log, steps_per_epoch, global_batch):
    peak = TINY["blr"] * global_batch / 256
    for rec in log:  # step k opens at the epoch fraction (k - 1) / steps_per_epoch
        want = lr_at((rec["step"] - 1) / steps_per_epoch, peak, TINY["min_lr"], TINY["warmup_epochs"], TINY["epochs"])
        assert rec["lr"] == pytest.approx(want, rel=1e-9), rec


def test_two_processes_resumed_on_one_with_another_batch_and_accumulation(tmp_path):
    """2 processes x batch 4 stop 3 steps in; 1 process x batch 2 x accum 4 (the same global batch
    of 8) goes on from sample 24 of epoch 0's order: 16 micro-batches an epoch, 4 steps."""
    seen, log, _ = _launch(tmp_path / "part", 2, batch_size=4, max_steps=3)
    assert _by_epoch(seen, 2) == {0: _order(0)[:24]}
    _check_lr(log, 4, 8)
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoint-000003.pth")
    assert (ckpt["sample_in_epoch"], ckpt["global_sample_in_epoch"], ckpt["world_size"], ckpt["batch_size"],
            ckpt["accum_iter"]) == (12, 24, 2, 4, 1)

    seen, log, printed = _launch(tmp_path / "resumed", 1, batch_size=2, accum_iter=4,
                                 resume=str(tmp_path / "part" / "checkpoint-000003.pth"))
    assert "position-exact but not bit-exact" in printed and "seen again" not in printed
    assert _by_epoch(seen, 1) == {0: _order(0)[24:], 1: _order(1)}  # the rest, then a whole epoch
    assert [rec["step"] for rec in log] == [4, 5, 6, 7, 8]
    _check_lr(log, 4, 8)
    last = load_checkpoint(tmp_path / "resumed" / "checkpoint-last.pth")
    assert (last["step"], last["epoch"], last["sample_in_epoch"], last["world_size"]) == (8, 2, 0, 1)


def test_one_process_resumed_on_two_off_a_batch_boundary(tmp_path):
    """1 process x batch 4 stops 3 steps (12 samples) in; on 2 processes x batch 4 that is 6 per
    process, rounded down to 4: order[8:12] comes again, nothing is skipped, step 1 of 4."""
    seen, log, _ = _launch(tmp_path / "part", 1, batch_size=4, max_steps=3)
    assert _by_epoch(seen, 1) == {0: _order(0)[:12]}
    seen, log, printed = _launch(tmp_path / "resumed", 2, batch_size=4,
                                 resume=str(tmp_path / "part" / "checkpoint-000003.pth"))
    assert "not bit-exact" in printed and "4 samples are seen again" in printed
    assert _by_epoch(seen, 2) == {0: _order(0)[8:], 1: _order(1)}
    assert [rec["step"] for rec in log] == [2, 3, 4, 5, 6, 7, 8]
    _check_lr(log, 4, 8)


def test_a_checkpoint_at_an_epochs_last_whole_step_resumes_exactly(tmp_path):
    """8 micro-batches an epoch with --accum-iter 3 make 2 steps; the 2 left over are never
    used. The checkpoint after the epoch's last step points at the next epoch, so the resumed
    run neither reads those 2 nor carries their gradients into its first step."""
    kw = dict(batch_size=4, accum_iter=3, save_every=2)
    _launch(tmp_path / "full", 1, **kw)
    ckpt = load_checkpoint(tmp_path / "full" / "checkpoint-000002.pth")
    assert (ckpt["epoch"], ckpt["sample_in_epoch"]) == (1, 0)
    seen, _, printed = _launch(tmp_path / "resumed", 1, **kw,
                               resume=str(tmp_path / "full" / "checkpoint-000002.pth"))
    assert "bit-exact" not in printed and _by_epoch(seen, 1) == {1: _order(1)[:24]}
    a = load_checkpoint(tmp_path / "full" / "checkpoint-last.pth")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_tokenizer_resumed_with_another_batch_size(tmp_path, capsys):
    import mimfast.train.tokenizer_train as tok_module

    def cfg(name, **kw):
        base = dict(img_size=16, downsample=4, vocab_size=16, embed_dim=8, hidden=8, builtin_size=N,
                    num_workers=0, eval_images=4, save_every=0, lr=2e-3, warmup_steps=5, seed=3,
                    output_dir=str(tmp_path / name), log_every=1000, device="cpu")
        return tok_module.TokenizerTrainConfig(**dict(base, **kw))

    tok_module.train_tokenizer(cfg("a", batch_size=8, steps=3))  # 24 samples of epoch 0
    ckpt = load_checkpoint(tmp_path / "a" / "checkpoint-last.pth")
    assert (ckpt["global_sample_in_epoch"], ckpt["batch_size"]) == (24, 8)
    _Recording.seen = []
    with mock.patch.object(tok_module, "ResumableSampler", _Recording):
        tok_module.train_tokenizer(cfg("a", batch_size=16, steps=5, resume="auto"))
    assert "not bit-exact" in capsys.readouterr().out
    # batch 16: rounded down to sample 16 (8 again), then epoch 1's first batch
    assert _by_epoch([_Recording.seen], 1) == {0: _order(0)[16:], 1: _order(1)[:16]}
    last = load_checkpoint(tmp_path / "a" / "checkpoint-last.pth")
    assert (last["step"], last["epoch"], last["sample_in_epoch"], last["dataset_size"]) == (5, 1, 16, N)
    tok_module.train_tokenizer(cfg("a", batch_size=16, steps=6, resume="auto", builtin_size=N + 8))
    assert f"dataset of {N} images and this run's has {N + 8}" in capsys.readouterr().out
