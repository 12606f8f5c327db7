"""collate_encoded's ItemBatch: a batch of encoded bytes and decoded images packed into one
tensor (one shared-memory segment and one pinned copy per batch instead of one per image)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mimfast.data import gpu_pipeline as gp


def _items(seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in (17, 1, 300)]
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((5, 7), (1, 1))]
    return [raw[0], imgs[0], raw[1], raw[2], imgs[1]]


def test_pack_gives_back_every_item_as_a_view():
    items = _items()
    batch = gp.ItemBatch.pack(items)
    assert len(batch) == len(items) and batch.data.dtype == torch.uint8
    assert batch.data.numel() == sum(t.numel() for t in items)
    for i, want in enumerate(items):
        got = batch[i]
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == batch.data.untyped_storage().data_ptr()  # a view
    assert [t.shape for t in batch] == [t.shape for t in items]
    assert all(torch.equal(a, b) for a, b in zip(batch, items))
    assert torch.equal(batch[-1], items[-1])
    with pytest.raises(IndexError):
        batch[len(items)]


def test_pack_rejects_what_decode_would_reject():
    with pytest.raises(TypeError, match=r"items\[1\] must be a uint8 tensor"):
        gp.ItemBatch.pack([torch.zeros(3, dtype=torch.uint8), torch.zeros(3)])
    with pytest.raises(ValueError, match=r"items\[0\] must be 1-D .* or \(3, H, W\)"):
        gp.ItemBatch.pack([torch.zeros(2, 2, dtype=torch.uint8)])


def test_collate_and_decode(tmp_path):
    from torchvision.io import encode_jpeg, encode_png

    g = torch.Generator().manual_seed(1)
    imgs = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in ((12, 9), (8, 8))]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(bytes(encode_png(imgs[0]).numpy()))
    (tmp_path / "a" / "1.jpg").write_bytes(bytes(encode_jpeg(imgs[1], quality=95).numpy()))
    ds = gp.EncodedImages(tmp_path)
    batch, labels, epochs, indices = gp.collate_encoded([ds[(2, i)] for i in range(2)])
    assert isinstance(batch, gp.ItemBatch) and epochs.tolist() == [2, 2] and indices.tolist() == [0, 1]
    assert torch.equal(batch[0], torch.frombuffer(bytearray((tmp_path / "a" / "0.png").read_bytes()),
                                                  dtype=torch.uint8))
    decoded, failed = gp.decode_images(batch, "cpu")
    assert failed == [] and torch.equal(decoded[0], imgs[0]) and decoded[1].shape == (3, 8, 8)


def test_workers_send_one_packed_batch(tmp_path):
    """Through DataLoader worker processes: the batch arrives as an ItemBatch with the files'
    bytes (and the images a worker decoded itself, in the hybrid mode)."""
    from torchvision.io import encode_png

    g = torch.Generator().manual_seed(2)
    imgs = [torch.randint(0, 256, (3, 6 + i, 5), dtype=torch.uint8, generator=g) for i in range(4)]
    (tmp_path / "a").mkdir()
    for i, im in enumerate(imgs):
        (tmp_path / "a" / f"{i}.png").write_bytes(bytes(encode_png(im).numpy()))
    for fraction in (0.0, 1.0):
        ds = gp.EncodedImages(tmp_path, cpu_decode_fraction=fraction)
        loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=gp.collate_encoded)
        got = []
        for batch, _, _, indices in loader:
            assert isinstance(batch, gp.ItemBatch) and len(batch) == 2
            decoded, failed = gp.decode_images(batch, "cpu")
            assert failed == []
            got += list(zip(indices.tolist(), decoded))
        assert sorted(i for i, _ in got) == [0, 1, 2, 3]
        for i, im in got:
            assert torch.equal(im, imgs[i]), (fraction, i)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory_pins_the_packed_tensors():
    batch = gp.ItemBatch.pack(_items()).pin_memory()
    assert batch.data.is_pinned() and batch.offsets.is_pinned() and batch.shapes.is_pinned()
    assert all(torch.equal(a, b) for a, b in zip(batch, _items()))


def test_kinds_from_the_tables_match_the_item_checks():
    """ItemBatch.kinds() (a few tensor ops over the packed bytes) classifies as the per-item
    checks do: decoded images, JPEGs (FF D8 FF), other bytes, items too short to tell."""
    from torchvision.io import encode_jpeg, encode_png

    imgs = _items(3)[1:2] + [torch.randint(0, 256, (3, 9, 6), dtype=torch.uint8)]
    items = [encode_jpeg(imgs[1], quality=90), encode_png(imgs[1]), imgs[0],
             torch.tensor([0xFF, 0xD8], dtype=torch.uint8), torch.empty(0, dtype=torch.uint8),
             torch.tensor([0xFF, 0xD8, 0xFF], dtype=torch.uint8), encode_jpeg(imgs[0], quality=80)]
    want = gp._kinds(items)
    assert want == ([2], [0, 5, 6], [1, 3, 4])
    assert gp.ItemBatch.pack(items).kinds() == want
    assert gp.ItemBatch.pack([torch.empty(0, dtype=torch.uint8)]).kinds() == ([], [], [0])
    assert gp.ItemBatch.pack([imgs[0]]).kinds() == ([0], [], [])
