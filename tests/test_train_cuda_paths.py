"""The training programs' CUDA and multi-process branches, run on the CPU: the device choices
made for CUDA (autocast, RNG states in checkpoints), and FSDP2 under gloo (gradient
accumulation, the fp16 loss scaler, clipping, resuming an unsharded checkpoint)."""

import pytest
import torch

from mimfast.train.checkpoint import load_checkpoint, save_checkpoint
from mimfast.train.config import PretrainConfig
from mimfast.train.pretrain import _autocast, _rng_state, _set_rng_state, pretrain
from runs import assert_same_training, free_port, pretrain_processes, step_losses

TINY = dict(
    model="mae_vit_tiny_patch16", img_size=32, patch_size=8,
    model_kwargs=dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                      decoder_num_heads=2),
    data="builtin", builtin_size=32, epochs=1, warmup_epochs=1, blr=1e-2, num_workers=0,
    kernels="eager", vis_every=0, tensorboard=False, log_every=1, seed=3, device="cpu",
)


def _one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CUDA autocast made on a CPU-only machine
def test_autocast_on_cuda_is_bf16_by_default():
    cfg = PretrainConfig(**dict(TINY, device="auto"))
    for precision, dtype in (("auto", torch.bfloat16), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        cfg.precision = precision
        name, ctx = _autocast(cfg, torch.device("cuda", 0))
        ac = ctx()
        assert name == {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        assert isinstance(ac, torch.autocast) and (ac.device, ac.fast_dtype) == ("cuda", dtype), precision
    cfg.precision = "auto"
    name, ctx = _autocast(cfg, torch.device("cpu"))
    assert name == "fp32" and not isinstance(ctx(), torch.autocast)


def test_cuda_rng_state_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    """Saved states are CPU byte tensors (weights_only loads them); restored from a checkpoint
    read on the CPU (the RNG setters refuse tensors on any other device)."""
    fake = torch.arange(16, dtype=torch.uint8)
    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.update(s=state, d=device))
    cuda = torch.device("cuda", 0)
    state = _rng_state(cuda)
    drawn = torch.rand(3)
    save_checkpoint({"rng": [state]}, tmp_path / "c.pth")
    loaded = load_checkpoint(tmp_path / "c.pth")["rng"][0]
    torch.rand(3)
    _set_rng_state(loaded, cuda)
    assert torch.equal(restored["s"], fake) and restored["d"] == cuda
    assert torch.equal(torch.rand(3), drawn)  # the CPU generator goes back too
    assert all(t.device.type == "cpu" and t.dtype == torch.uint8 for t in loaded.values())
    with pytest.raises((TypeError, RuntimeError)):
        torch.random.set_rng_state(loaded["torch"].to("meta"))


def _record_map_locations(monkeypatch, module) -> list:
    """The ``map_location`` of every ``load_checkpoint`` call ``module`` makes, as it makes them."""
    seen = []
    real = module.load_checkpoint

    def spy(path, map_location="cpu"):
        seen.append(map_location)
        return real(path, map_location=map_location)

    monkeypatch.setattr(module, "load_checkpoint", spy)
    return seen


def test_resume_reads_checkpoints_on_the_cpu(tmp_path, monkeypatch):
    import mimfast.train.pretrain as pretrain_module

    pretrain(PretrainConfig(**dict(TINY, batch_size=8, output_dir=str(tmp_path), max_steps=2)))
    seen = _record_map_locations(monkeypatch, pretrain_module)
    pretrain(PretrainConfig(**dict(TINY, batch_size=8, output_dir=str(tmp_path), resume="auto")))
    assert seen == ["cpu"]


def test_tokenizer_resume_reads_checkpoints_on_the_cpu(tmp_path, monkeypatch):
    import mimfast.train.tokenizer_train as tt

    kw = dict(img_size=16, downsample=4, vocab_size=16, embed_dim=8, hidden=8, batch_size=8, builtin_size=32,
              num_workers=0, eval_images=8, lr=2e-3, warmup_steps=1, output_dir=str(tmp_path), log_every=1000,
              device="cpu")
    tt.train_tokenizer(tt.TokenizerTrainConfig(steps=2, **kw))
    seen = _record_map_locations(monkeypatch, tt)
    assert tt.train_tokenizer(tt.TokenizerTrainConfig(steps=3, resume="auto", **kw))["steps"] == 3
    assert seen == ["cpu"]


def test_mae_loss_of_a_gpu_pipeline_batch_uses_the_keyed_noise():
    """``--gpu-pipeline`` batches are (images, labels, epochs, indices): the mask noise is the
    samples' keyed noise, made here rather than in the workers."""
    from mimfast.train.pretrain import MAETask, _keyed_noise

    cfg = PretrainConfig(**TINY)
    task = MAETask(cfg, torch.device("cpu"))
    model = task.build_model()
    imgs, epochs, indices = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1]), torch.tensor([4, 4, 7])
    keyed = task.loss(model, (imgs, torch.zeros(3, dtype=torch.int64), epochs, indices))
    noise = _keyed_noise(cfg.seed, epochs, indices, 16)
    assert torch.equal(keyed, task.loss(model, ((imgs, noise), None)))


def test_keyed_noise_takes_any_seed():
    """Date-like and negative seeds (past 64 bits once keyed) give noise; small seeds keep theirs."""
    from mimfast.train.pretrain import _keyed_noise

    for seed in (20240601, 2**31 - 1, -1):
        noise = _keyed_noise(seed, [0, 3], [5, 9], 16)
        assert noise.shape == (2, 16) and torch.equal(noise, _keyed_noise(seed, [0, 3], [5, 9], 16))
    g = torch.Generator().manual_seed(((3 * 1_000_003 + 1) * 10_000_019 + 2) ^ 0x6D61736B)
    assert torch.equal(_keyed_noise(3, [1], [2], 16)[0], torch.rand(16, generator=g))


def test_fsdp_shards_beit_blocks():
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from mimfast.models import create_model
    from mimfast.models.beit import BEiTBlock
    from mimfast.train.sharding import shard_model

    _one_process_group()
    try:
        model = create_model("beit_tiny_patch16_224_8k_vocab", img_size=32, patch_size=8, depth=2, vocab_size=64,
                             kernels="eager")
        shard_model(model)
        blocks = [m for m in model.modules() if isinstance(m, BEiTBlock)]
        assert len(blocks) == 2 and all(isinstance(b, FSDPModule) for b in blocks)
        assert isinstance(model, FSDPModule)
    finally:
        dist.destroy_process_group()


def test_fsdp_mesh_is_on_the_models_device_not_the_machines_accelerator(monkeypatch):
    """A CPU (gloo) run shards over a CPU mesh even where the machine has an accelerator:
    ``fully_shard``'s default mesh is on ``torch._C._get_accelerator()``, which put rank 1 of the
    H200 run's two gloo processes on cuda:1 ('invalid device ordinal') and would move the shards
    to the GPU. The accelerator is faked as CUDA here, so a CPU-only machine checks it too."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from mimfast.models import create_model
    from mimfast.train.sharding import shard_model

    model = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, kernels="eager")
    _one_process_group()
    try:
        monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
        shard_model(model)
        params = list(model.parameters())
        assert params and all(isinstance(p, DTensor) for p in params)
        assert {p.device_mesh.device_type for p in params} == {"cpu"}
        assert {p.to_local().device.type for p in params} == {"cpu"}
    finally:
        dist.destroy_process_group()


def test_grad_scaler_agrees_across_ranks_when_sharded():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from mimfast.train.sharding import grad_scaler

    assert not isinstance(grad_scaler("cpu", enabled=True, sharded=False), ShardedGradScaler)
    assert isinstance(grad_scaler("cpu", enabled=True, sharded=True), ShardedGradScaler)


def test_fsdp_accumulation_fp16_clipping_and_resume_from_an_unsharded_checkpoint(tmp_path):
    """One process, batch 4 x 2 accumulated, fp16 with loss scaling and clipping, two epochs;
    then two FSDP2 processes (batch 2 x 2 each: the same 8 samples a step) resumed from its
    epoch-1 checkpoint (unsharded, its optimizer state keyed by position) run the same epoch 2."""
    common = dict(TINY, accum_iter=2, precision="fp16", clip_grad=0.5, epochs=2)
    one = tmp_path / "one"
    pretrain(PretrainConfig(**dict(common, batch_size=4), output_dir=str(one)))
    two = tmp_path / "two"
    values = dict(common, batch_size=2, fsdp=True, resume=str(one / "checkpoint-000004.pth"))
    pretrain_processes(2, two, values)

    l1, l2 = step_losses(one), step_losses(two)
    assert sorted(l1) == list(range(1, 9)) and sorted(l2) == [5, 6, 7, 8]
    for step in l2:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4)
    a = load_checkpoint(one / "checkpoint-last.pth")
    b = load_checkpoint(two / "checkpoint-last.pth")
    start = load_checkpoint(one / "checkpoint-000004.pth")["model"]
    assert b["step"] == 8 and a["scaler"]["scale"] == b["scaler"]["scale"]
    assert a["model"].keys() == b["model"].keys()
    # Epoch 2 moves the weights by four Adam steps of about the lr (3e-4 at most, 8e-4 in all),
    # so the weights are compared well below one step. Except the key bias: softmax ignores a
    # shift of every key, so its gradient is rounding noise that Adam scales to lr-sized steps
    # of either sign, which the two layouts need not share.
    tol = 2e-5
    moved = max((a["model"][k] - start[k]).abs().max().item() for k in a["model"])
    assert moved > 20 * tol
    for k in a["model"]:
        wa, wb = a["model"][k], b["model"][k]
        if k.endswith("attn.qkv.bias"):
            d = wa.shape[0] // 3
            torch.testing.assert_close(wa[d:2 * d], wb[d:2 * d], rtol=0, atol=1e-3, msg=k)
            wa, wb = torch.cat([wa[:d], wa[2 * d:]]), torch.cat([wb[:d], wb[2 * d:]])
        torch.testing.assert_close(wa, wb, rtol=0, atol=tol, msg=k)


def test_fsdp_beit_with_clipping_equals_one_process(tmp_path):
    """BEiT (its blocks FSDP units, the shared relative position bias in the root unit) with
    gradient clipping on sharded gradients: two FSDP2 processes follow one process."""
    import dataclasses

    from mimfast.models.tokenizer import VQTokenizer, save_vq_tokenizer
    from mimfast.train.config import build_parser, config_from_args

    vq = tmp_path / "vq.safetensors"
    save_vq_tokenizer(VQTokenizer(vocab_size=64, embed_dim=8, hidden=8, downsample=4), vq)
    argv = ["--method", "beit", "--preset", "beit-tiny", "--img-size", "32", "--patch-size", "4", "--builtin-size",
            "32", "--num-workers", "0", "--kernels", "eager", "--log-every", "1", "--no-tensorboard",
            "--num-mask-patches", "20", "--epochs", "1", "--vis-every", "0", "--clip-grad", "0.05", "--device", "cpu",
            "--tokenizer", f"vq:{vq}"]
    cfg = config_from_args(build_parser().parse_args(argv + ["--batch-size", "8"]))
    cfg.model_kwargs = dict(cfg.model_kwargs, depth=2)
    pretrain(dataclasses.replace(cfg, output_dir=str(tmp_path / "one")))
    values = dataclasses.asdict(dataclasses.replace(cfg, batch_size=4, fsdp=True))
    values.pop("output_dir")
    pretrain_processes(2, tmp_path / "two", values)
    assert_same_training(tmp_path / "one", tmp_path / "two", steps=4)
