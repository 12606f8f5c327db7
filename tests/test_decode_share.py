"""The adaptive share of images the DataLoader workers decode (mimfast.data.gpu_pipeline.DecodeShare):
its rule, the dataset reading it per item, its value seen by worker processes, and the loader
reporting each batch's wait to it."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mimfast.data import gpu_pipeline as gp


def test_rule_moves_towards_what_the_workers_sustain():
    s = gp.DecodeShare(0.5, window=4, step=0.1, low=0.01, high=0.05)
    for _ in range(3):
        s.observe(0.01, 0.1)  # waited 10% of the time: the workers are the bottleneck
    assert s.get() == 0.5  # not before a whole window
    s.observe(0.01, 0.1)
    assert s.get() == pytest.approx(0.3)  # waits twice the high mark: two steps down
    for _ in range(4):
        s.observe(0.0, 0.1)  # no wait: the workers keep up, take decoding off the GPU
    assert s.get() == pytest.approx(0.4)
    for _ in range(4):
        s.observe(0.003, 0.1)  # between low and high: stays
    assert s.get() == pytest.approx(0.4)
    for _ in range(4):
        s.observe(0.06, 0.1)  # far past the high mark: at most four steps down
    assert s.get() == pytest.approx(0.0)
    for _ in range(4):
        s.observe(0.0, 0.1)
    assert s.get() == pytest.approx(0.1)
    for _ in range(40):
        s.observe(0.0, 0.1)
    assert s.get() == 1.0  # bounded
    for _ in range(80):
        s.observe(0.2, 0.1)  # a wait longer than the batch counts as the batch's time
    assert s.get() == 0.0
    assert s.history[0] == 0.5 and len(s.history) == 1 + (4 + 4 + 4 + 4 + 4 + 40 + 80) // 4


def test_bad_settings():
    with pytest.raises(ValueError, match="initial"):
        gp.DecodeShare(1.5)
    with pytest.raises(ValueError, match="window"):
        gp.DecodeShare(0.5, window=0)
    with pytest.raises(ValueError, match="low < high"):
        gp.DecodeShare(0.5, low=0.1, high=0.05)
    with pytest.raises(ValueError, match="DecodeShare"):
        gp.EncodedImages([], cpu_decode_fraction=2.0)


def _jpegs(tmp_path, n=6):
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    (tmp_path / "a").mkdir()
    for i in range(n):
        img = torch.randint(0, 256, (3, 12 + i, 10), dtype=torch.uint8, generator=g)
        (tmp_path / "a" / f"{i}.jpg").write_bytes(bytes(encode_jpeg(img, quality=90).numpy()))
    return tmp_path


def test_dataset_reads_the_share_per_item(tmp_path):
    share = gp.DecodeShare(0.0)
    ds = gp.EncodedImages(_jpegs(tmp_path), cpu_decode_fraction=share)
    assert ds[0][0].dim() == 1  # bytes: nvjpeg's
    share.set(1.0)
    assert ds[0][0].shape == (3, 12, 10)  # decoded by the worker
    share.set(0.5)
    got = np.mean([ds._decode_here(i) for i in range(2000)])
    assert 0.45 < got < 0.55


def test_worker_processes_see_the_share_the_main_process_sets(tmp_path):
    share = gp.DecodeShare(0.0)
    ds = gp.EncodedImages(_jpegs(tmp_path), cpu_decode_fraction=share)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=gp.collate_encoded, persistent_workers=True)

    def dims():
        return {d.dim() for batch in loader for d in batch[0].items()}

    assert dims() == {1}
    share.set(1.0)
    assert dims() == {3}  # the same (persistent) worker processes now decode


def test_loader_reports_each_batch(tmp_path, device):
    share = gp.DecodeShare(0.5, window=1, step=0.25, low=0.0, high=1e-9)
    ds = gp.EncodedImages(_jpegs(tmp_path), cpu_decode_fraction=share)
    aug = gp.GpuAugment(8, scale=(0.2, 1.0), seed=0, device=device)
    loader = gp.GpuLoader.from_dataset(ds, aug, batch_size=2, num_workers=0, prefetch=0)
    n = sum(1 for _ in loader)
    assert n == 3 and len(share.history) == 1 + 3  # one adjustment a batch (window 1)
