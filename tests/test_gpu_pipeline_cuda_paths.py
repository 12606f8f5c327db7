"""The GPU input pipeline's CUDA-only code paths, run on any machine.

- ``decode_images`` on CUDA (nvjpeg batch, the one-image retry when nvjpeg refuses a batch,
  the CPU fallback, undecodable files) with a stand-in for ``decode_jpeg(device="cuda")``
  that decodes on the CPU and fails a whole list as nvjpeg does.
- ``GpuLoader``'s prefetch thread with a stand-in for ``torch.cuda``'s stream API: batches
  made on the side stream, handed over in order with an event wait and ``record_stream`` on
  the consumer's stream, errors raised in the consumer, the thread ended when the consumer
  stops early; ``GpuAugment`` resolves a bare "cuda" to the current device's index.
- The augmentation kernel with the CUDA launch's tiles (16 x 32, several per view, the second
  view's tiles after the first's), which the interpreted runs otherwise skip (one tile per view).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import warnings

import pytest
import torch

from mimfast.data import gpu_pipeline as gp
from tolerance import poison_

THREAD = "mimfast-gpu-loader"


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


# --------------------------------------------------------------------------------------------
# decode_images on CUDA


class _FakeNvjpeg:
    """``torchvision.io.decode_jpeg`` with ``device="cuda"``, decoding on the CPU: refuses the
    whole list when one image fails (a corrupt file, or one in ``refuse``), as nvjpeg does."""

    def __init__(self, real, refuse=()):
        self.real, self.refuse, self.calls = real, {t.data_ptr() for t in refuse}, []

    def __call__(self, input, mode=None, device="cpu"):
        assert torch.device(device).type == "cuda"
        batch = input if isinstance(input, list) else [input]
        self.calls.append(len(batch) if isinstance(input, list) else "one")
        assert batch, "torchvision refuses an empty list"
        assert all(t.device.type == "cpu" and t.dim() == 1 for t in batch)
        if any(t.data_ptr() in self.refuse for t in batch):
            raise RuntimeError("Error while decoding JPEG images: not supported")
        out = [self.real(t, mode=mode) for t in batch]
        return out if isinstance(input, list) else out[0]


@pytest.fixture
def fake_cuda_decode(monkeypatch):
    """Returns a function installing a _FakeNvjpeg; uploads are recorded, not made."""
    import torchvision.io

    uploads = []
    monkeypatch.setattr(gp, "_to_device", lambda im, device, pin=False: uploads.append(pin) or im)

    def install(refuse=()):
        fake = _FakeNvjpeg(torchvision.io.decode_jpeg, refuse)
        monkeypatch.setattr(torchvision.io, "decode_jpeg", fake)
        return fake, uploads

    return install


def _encoded():
    from torchvision.io import encode_jpeg, encode_png

    imgs = _images([(20, 27), (18, 15), (23, 19), (16, 21)], seed=1)
    return imgs, [encode_jpeg(imgs[0], quality=95), encode_png(imgs[1]), encode_jpeg(imgs[2], quality=95), imgs[3]]


def _cpu(data):
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(data, mode=ImageReadMode.RGB)


def test_cuda_decode_batches_jpegs_and_falls_back_to_cpu(fake_cuda_decode):
    nvjpeg, uploads = fake_cuda_decode()
    imgs, items = _encoded()
    out, failed = gp.decode_images(items, "cuda")
    assert failed == [] and nvjpeg.calls == [2]  # the two JPEGs in one nvjpeg call
    assert sorted(uploads) == [False, True]  # the decoded item as it is, the PNG through pinned memory
    assert torch.equal(out[1], imgs[1]) and torch.equal(out[3], imgs[3])
    for i in (0, 2):
        assert torch.equal(out[i], _cpu(items[i]))


def test_cuda_decode_of_a_packed_batch_is_the_lists(fake_cuda_decode):
    """The loader's batches come as one packed ItemBatch: classified from its tables, the JPEGs
    still go to nvjpeg together, the rest as before."""
    nvjpeg, uploads = fake_cuda_decode()
    imgs, items = _encoded()
    out, failed = gp.decode_images(gp.ItemBatch.pack(items), "cuda")
    assert failed == [] and nvjpeg.calls == [2] and sorted(uploads) == [False, True]
    assert torch.equal(out[1], imgs[1]) and torch.equal(out[3], imgs[3])
    for i in (0, 2):
        assert torch.equal(out[i], _cpu(items[i]))


def test_cuda_decode_retries_a_refused_batch_one_by_one(fake_cuda_decode):
    _, items = _encoded()
    nvjpeg, uploads = fake_cuda_decode(refuse=[items[2]])  # e.g. a CMYK JPEG
    out, failed = gp.decode_images(items, "cuda")
    assert failed == [] and nvjpeg.calls == [2, "one", "one"]
    assert sorted(uploads) == [False, True, True]  # the refused JPEG was decoded on the CPU
    assert torch.equal(out[2], _cpu(items[2])) and torch.equal(out[0], _cpu(items[0]))


def test_cuda_decode_reports_undecodable_items(fake_cuda_decode):
    nvjpeg, _ = fake_cuda_decode()
    _, items = _encoded()
    corrupt = torch.frombuffer(bytearray(b"\xff\xd8\xffnot a jpeg"), dtype=torch.uint8)
    items = [corrupt, items[1], items[0], torch.frombuffer(bytearray(b"GIF89a?"), dtype=torch.uint8)]
    with pytest.warns(UserWarning, match="batch position 0"):
        out, failed = gp.decode_images(items, "cuda")
    assert failed == [0, 3] and nvjpeg.calls == [2, "one", "one"]
    assert out[0] is out[1] and out[3] is out[1]  # the next good image, else the first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="none of the 2 images"):
            gp.decode_images([corrupt, items[3]], "cuda")


def test_cuda_decode_without_jpegs_skips_nvjpeg(fake_cuda_decode):
    nvjpeg, _ = fake_cuda_decode()
    imgs, items = _encoded()
    out, failed = gp.decode_images([items[1], items[3]], "cuda")
    assert nvjpeg.calls == [] and failed == []
    assert torch.equal(out[0], imgs[1]) and torch.equal(out[1], imgs[3])


# --------------------------------------------------------------------------------------------
# GpuLoader's prefetch thread


class _Stream:
    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_event(self, event):
        self.waited.append(event)


class _Event:
    def __init__(self, *args, **kwargs):
        self.stream = None

    def record(self, stream=None):
        self.stream = stream


class _FakeStreams:
    """``torch.cuda``'s stream API as ``GpuLoader._threaded`` uses it; the current stream is
    per thread, as CUDA's is."""

    def __init__(self):
        self.main, self.sides, self._tls = _Stream("main"), [], threading.local()

    def Stream(self, device=None):  # noqa: N802 - torch.cuda.Stream
        self.sides.append(_Stream("side"))
        return self.sides[-1]

    def current_stream(self, device=None):
        return getattr(self._tls, "stream", self.main)

    @contextlib.contextmanager
    def stream(self, s):
        previous, self._tls.stream = self.current_stream(), s
        try:
            yield
        finally:
            self._tls.stream = previous

    def device(self, device):
        assert torch.device(device).type == "cuda"
        return contextlib.nullcontext()


@pytest.fixture
def streams(monkeypatch):
    fake = _FakeStreams()
    for name in ("Stream", "current_stream", "stream", "device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    yield fake
    assert not any(t.name == THREAD and t.is_alive() for t in threading.enumerate()), "prefetch thread left running"


class _View:
    def __init__(self, key):
        self.key, self.recorded = key, []

    def record_stream(self, stream):
        self.recorded.append(stream)


class _Augment:
    """Stands in for a CUDA GpuAugment; records the thread and the stream each batch ran on."""

    def __init__(self, streams, two_views=False, fail_at=None, device="cuda"):
        self.streams, self.two_views, self.fail_at = streams, two_views, fail_at
        self.device, self.ran_on = torch.device(device), []

    def __call__(self, items, epochs, indices):
        self.ran_on.append((threading.current_thread().name, self.streams.current_stream().name))
        key = int(indices[0])
        if key == self.fail_at:
            raise RuntimeError(f"augment failed at {key}")
        return (_View(key), _View(-key)) if self.two_views else _View(key)


def _batch(k):
    return [torch.zeros(1, dtype=torch.uint8)], torch.tensor([k]), torch.tensor([0]), torch.tensor([k])


def _batches(n):
    return [_batch(k) for k in range(n)]


@pytest.mark.parametrize("two_views", [False, True])
def test_prefetch_thread_hands_over_in_order_on_the_consumer_stream(streams, two_views):
    aug = _Augment(streams, two_views)
    got = list(gp.GpuLoader(_batches(7), aug, prefetch=2, with_keys=True))
    assert aug.ran_on == [(THREAD, "side")] * 7
    assert [int(idx[0]) for _, _, _, idx in got] == list(range(7))
    assert [int(lab[0]) for _, lab, _, _ in got] == list(range(7))
    assert len(streams.sides) == 1
    # one event per batch, recorded on the side stream after its work, waited on by the consumer
    assert len(streams.main.waited) == 7 and all(e.stream is streams.sides[0] for e in streams.main.waited)
    for views, *_ in got:
        for v in (views if two_views else (views,)):
            assert v.recorded == [streams.main]  # its memory is the consumer stream's to free


def test_prefetch_thread_raises_in_the_consumer(streams):
    loader = gp.GpuLoader(_batches(6), _Augment(streams, fail_at=3), prefetch=2)
    seen = []
    with pytest.raises(RuntimeError, match="augment failed at 3"):
        for views, _ in loader:
            seen.append(views.key)
    assert seen == [0, 1, 2]


def test_prefetch_thread_stops_when_the_consumer_does(streams):
    it = iter(gp.GpuLoader(map(_batch, itertools.count()), _Augment(streams), prefetch=2))
    assert [next(it)[0].key for _ in range(3)] == [0, 1, 2]
    it.close()  # the fixture checks that the thread ended


def test_no_prefetch_thread_off_cuda_or_without_prefetch(streams):
    for aug, prefetch in ((_Augment(streams, device="cpu"), 2), (_Augment(streams), 0)):
        got = list(gp.GpuLoader(_batches(2), aug, prefetch=prefetch))
        assert [views.key for views, _ in got] == [0, 1]
        assert aug.ran_on == [(threading.current_thread().name, "main")] * 2
    assert streams.sides == []


def test_gpu_augment_pins_the_cuda_device(monkeypatch):
    # the prefetch thread starts on device 0: a bare "cuda" is resolved where it is given
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert gp.GpuAugment(8, device="cuda").device == torch.device("cuda", 3)
    assert gp.GpuAugment(8, device="cuda:1").device == torch.device("cuda", 1)
    assert gp.GpuAugment(8, device="cpu").device == torch.device("cpu")


# --------------------------------------------------------------------------------------------
# the kernel with the CUDA launch's tiles


@pytest.mark.parametrize("layout,interps", [("chw", ("bicubic", "bilinear")), ("hwc", ("bilinear", "bicubic"))])
def test_kernel_with_cuda_tiles_matches_eager(device, monkeypatch, layout, interps):
    from mimfast.kernels import augment

    asked = []  # the launch really takes the CUDA tiles (16 x 32), not the interpreter's one per view
    monkeypatch.setattr(augment, "_blocks",
                        lambda size, size2, dev: asked.append((size, size2)) or (augment._BLOCK_H, augment._BLOCK_W))
    imgs = [im.to(device) for im in _images([(37, 53), (61, 29), (20, 20)], seed=2)]
    given = imgs if layout == "chw" else [im.permute(1, 2, 0).contiguous() for im in imgs]
    packed = gp.pack_images(given, layout)
    boxes, flips = [(3, 5, 30, 41), (0, 0, 61, 29), (2, 1, 17, 18)], [True, False, True]
    size, size2 = 37, 20  # 3 x 2 tiles, then 2 x 1 tiles of the second view
    (mul, add), (mul2, add2) = gp._affines(gp.IMAGENET_MEAN, gp.IMAGENET_STD, "map_pixels")
    out = poison_(torch.empty(3, 3, size, size, device=device))
    out2 = poison_(torch.empty(3, 3, size2, size2, device=device))
    augment.augment_crops(packed.data, gp._meta(packed, boxes, flips), out, mul, add, interps[0], out2=out2,
                          mul2=mul2, add2=add2, interpolation2=interps[1], channels_last=layout == "hwc")
    assert asked == [(size, size2)] and (augment._BLOCK_H, augment._BLOCK_W) == (16, 32)
    r1, r2 = gp.resized_crop_batch(imgs, boxes, flips, size, interpolation=interps[0], second_size=size2,
                                   second_interpolation=interps[1], backend="eager")
    torch.testing.assert_close(out.cpu(), r1.cpu(), atol=1e-4, rtol=0)
    torch.testing.assert_close(out2.cpu(), r2.cpu(), atol=1e-5, rtol=0)
