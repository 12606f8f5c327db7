"""The CPU data path on real image folders, against torchvision's ``ImageFolder`` and
``pil_loader`` (what the official MAE / BEiT pipelines read ImageNet with): the file list and
labels, the decoded pixels for every image mode ImageNet-style folders hold, unreadable files,
empty and misplaced data, tiny images, and the seeding of the per-sample augmentation."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS as TV_IMG_EXTENSIONS, pil_loader

from mimfast.data.builtin import ShapesDataset, render_shape_image
from mimfast.data.datasets import IMG_EXTENSIONS, ImageFiles, SeededTransform, build_dataset, sample_seed
from mimfast.data.sampler import ResumableSampler


def _pixels(h, w, c=3, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 200, w, dtype=np.float64)[None, :, None] + rng.integers(0, 50, (h, w, c))
    return base.clip(0, 255).astype(np.uint8)


def _save(path, mode="RGB", size=(24, 18), fmt=None, seed=0, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode in ("RGB", "RGBA", "CMYK"):
        im = Image.fromarray(_pixels(h, w, len(mode), seed), mode)
    elif mode in ("L", "P", "1"):
        im = Image.fromarray(_pixels(h, w, 1, seed)[..., 0], "L")
        im = im.convert(mode) if mode != "P" else im.quantize(16)
    else:
        raise ValueError(mode)
    im.save(path, format=fmt, **kw)
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_16bit_rgb(path, h=6, w=5):
    rows = np.random.default_rng(1).integers(0, 65536, (h, w, 3)).astype(">u2")
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    return path


def _reference(path) -> torch.Tensor:
    return torch.from_numpy(np.array(pil_loader(path))).permute(2, 0, 1)


def _rel(samples, root):
    return [(os.path.relpath(p, root), label) for p, label in samples]


# --------------------------------------------------------------------------------------------
# the file list


def test_extensions_are_torchvisions():
    assert IMG_EXTENSIONS == TV_IMG_EXTENSIONS


def test_tree_lists_what_imagefolder_lists(tmp_path):
    root = tmp_path / "train"
    _save(root / "n02" / "b.JPEG", fmt="JPEG")
    _save(root / "n02" / "a.Jpg", fmt="JPEG")
    _save(root / "n02" / "C.PNG")
    _save(root / "n02" / "sub" / "x.png")
    _save(root / "n02" / "sub b" / "x.png")  # ' ' < '/' < '-': os.walk's sorted dirpaths
    _save(root / "n02" / "sub-b" / "x.bmp")
    _save(root / "n02" / "sub" / "deeper" / "y.webp", fmt="WEBP")
    _save(root / "n02" / ".ipynb_checkpoints" / "z.png")  # hidden below a class: read, as torchvision
    (root / "n02" / "notes.txt").write_text("not an image")
    (root / "n02" / "x.jpg.bak").write_text("not an image")
    _save(root / "N01" / "t.TIFF", fmt="TIFF")  # upper case sorts first
    _save(root / "N01" / "p.ppm")
    _save(root / "n10" / "q.pgm", mode="L")
    (root / "n03_empty").mkdir()  # keeps its label (torchvision: allow_empty=True)
    _save(root / "at_the_root.jpg", fmt="JPEG")  # ignored in a tree, as torchvision
    os.symlink(root / "n02", root / "n04_link")  # a symlinked class folder
    os.symlink(root / "N01" / "p.ppm", root / "n10" / "linked.ppm")  # a symlinked file
    ours = ImageFiles(root)
    ref = ImageFolder(str(root), allow_empty=True)
    assert ours.classes == ref.classes == ["N01", "n02", "n03_empty", "n04_link", "n10"]
    assert ours.samples == ref.samples
    assert [label for _, label in ours.samples] == [t for _, t in ref.samples]
    assert len(ours) == 20
    # a path given with a trailing slash or as a str lists the same
    assert _rel(ImageFiles(str(root) + os.sep).samples, root) == _rel(ours.samples, root)


def test_hidden_top_level_folders_are_not_classes(tmp_path):
    """A documented difference: ImageFolder makes ``.ipynb_checkpoints`` a class (and, empty,
    stops on it); here hidden folders at the top are left out."""
    _save(tmp_path / "a" / "x.png")
    _save(tmp_path / ".cache" / "y.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    ds = ImageFiles(tmp_path)
    assert ds.classes == ["a"] and _rel(ds.samples, tmp_path) == [("a/x.png", 0)]
    assert ImageFolder(str(tmp_path), allow_empty=True).classes == [".cache", ".ipynb_checkpoints", "a"]


def test_flat_folder(tmp_path):
    for name in ("b.JPEG", "a.png", "c.WebP"):
        _save(tmp_path / name, fmt={"JPEG": "JPEG", "png": "PNG", "WebP": "WEBP"}[name.split(".")[1]])
    (tmp_path / "readme.md").write_text("x")
    ds = ImageFiles(tmp_path)
    assert ds.classes == [] and _rel(ds.samples, tmp_path) == [("a.png", -1), ("b.JPEG", -1), ("c.WebP", -1)]


def test_listing_is_sorted_and_fixed_per_instance(tmp_path):
    for name in ("a", "c", "e"):
        _save(tmp_path / "k" / f"{name}.png")
    first = ImageFiles(tmp_path)
    before = list(first.samples)
    assert _rel(ImageFiles(tmp_path).samples, tmp_path) == _rel(before, tmp_path)  # re-listing: same order
    _save(tmp_path / "k" / "b.png")  # a file added mid-run: this instance does not see it
    assert first.samples == before and len(first) == 3
    later = ImageFiles(tmp_path)  # a resumed run: the new file at its sorted place
    assert [os.path.basename(p) for p, _ in later.samples] == ["a.png", "b.png", "c.png", "e.png"]


# --------------------------------------------------------------------------------------------
# errors for empty or misplaced data


def test_no_data_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFiles(tmp_path / "missing")
    _save(tmp_path / "one.png")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFiles(tmp_path / "one.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFiles(empty)
    (empty / "a").mkdir()
    (empty / "b").mkdir()
    (empty / "b" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFiles(empty)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset(str(empty), 32, None)


def test_images_at_the_root_of_a_tree_are_named_in_the_error(tmp_path):
    """A flat folder with a stray sub-folder is read as a tree: the error says where the images
    are instead of claiming there are none."""
    for i in range(3):
        _save(tmp_path / f"img{i}.jpg", fmt="JPEG")
    (tmp_path / "thumbnails").mkdir()
    with pytest.raises(FileNotFoundError, match="directly under it are not read when it has sub-folders"):
        ImageFiles(tmp_path)


# --------------------------------------------------------------------------------------------
# pixels


def test_pixels_are_pil_loaders_for_every_mode(tmp_path):
    """convert("RGB") of every mode, no EXIF rotation, no JPEG draft: the bytes torchvision's
    loader gives (the recipe's input)."""
    d = tmp_path / "c"
    files = [
        _save(d / "rgb.jpg", size=(300, 200), fmt="JPEG", quality=90),  # bigger than any draft scale
        _save(d / "progressive.jpg", fmt="JPEG", progressive=True),
        _save(d / "gray.png", mode="L"),
        _save(d / "gray.jpg", mode="L", fmt="JPEG"),
        _save(d / "palette.png", mode="P"),
        _save(d / "palette_gif_like.bmp", mode="P", fmt="BMP"),
        _save(d / "one_bit.png", mode="1"),
        _save(d / "rgba.png", mode="RGBA"),
        _save(d / "cmyk.JPEG", mode="CMYK", fmt="JPEG"),
        _save(d / "png_named.JPEG", fmt="PNG"),  # as ImageNet's n02105855_2933.JPEG
        _save(d / "lossless.webp", fmt="WEBP", lossless=True),
        _save(d / "t.tif", mode="RGBA", fmt="TIFF"),
        _png_16bit_rgb(d / "rgb16.png"),
    ]
    p = d / "gray16.png"
    Image.fromarray(np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1500).save(p)
    files.append(p)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the loader must not apply it
    p = d / "exif_rotated.jpg"
    Image.fromarray(_pixels(18, 24)).save(p, exif=exif.tobytes())
    files.append(p)
    modes = {f.name: Image.open(f).mode for f in files}
    assert {"L", "P", "1", "RGBA", "CMYK", "I;16", "RGB"} <= set(modes.values()), modes
    ds = ImageFiles(tmp_path)
    assert len(ds) == len(files)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning, no unclosed file (ResourceWarning)
        for i, (path, _) in enumerate(ds.samples):
            img, label = ds[i]
            ref = _reference(path)
            assert img.dtype == torch.uint8 and img.shape[0] == 3, path
            assert torch.equal(img, ref), path
    k = [os.path.basename(p) for p, _ in ds.samples].index("exif_rotated.jpg")
    assert ds[k][0].shape == (3, 18, 24)  # stored orientation, as pil_loader
    assert ds.skipped == 0


# --------------------------------------------------------------------------------------------
# unreadable files


def _bad_files(d):
    buf = io.BytesIO()
    Image.fromarray(_pixels(40, 50)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(_pixels(40, 50)).save(buf, "PNG")
    png = buf.getvalue()
    d.mkdir(parents=True, exist_ok=True)
    (d / "a_trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "b_trunc.png").write_bytes(png[: len(png) // 2])
    (d / "c_empty.jpg").write_bytes(b"")
    (d / "d_text.jpg").write_text("<html>404</html>")
    (d / "e_appledouble.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    bomb = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(bytes(64))) + _png_chunk(b"IEND", b""))
    (d / "f_bomb.png").write_bytes(bomb)
    os.symlink(d / "gone.jpg", d / "g_broken_link.jpg")
    return ["a_trunc.jpg", "b_trunc.png", "c_empty.jpg", "d_text.jpg", "e_appledouble.jpg", "f_bomb.png",
            "g_broken_link.jpg"]


def test_unreadable_files_are_skipped_and_named(tmp_path):
    bad = _bad_files(tmp_path / "k")
    _save(tmp_path / "k" / "z_good.png")
    ds = ImageFiles(tmp_path)
    assert len(ds) == len(bad) + 1
    for i, name in enumerate(bad):
        with pytest.warns(UserWarning) as rec:
            img, label = ds[i]
        assert torch.equal(img, _reference(str(tmp_path / "k" / "z_good.png")))  # the next good one
        messages = [str(r.message) for r in rec]
        assert any(name in m and "skipping unreadable image" in m for m in messages), messages
    with pytest.raises(OSError):  # torchvision's loader raises on each of them
        pil_loader(str(tmp_path / "k" / "a_trunc.jpg"))


def test_a_run_of_unreadable_files_stops_with_an_error_in_workers(tmp_path):
    """Skipping is bounded: all-unreadable data ends the epoch with an error, not a hang, also
    from DataLoader workers."""
    _bad_files(tmp_path / "k")
    ds = ImageFiles(tmp_path, max_skips=5)
    loader = DataLoader(ds, batch_size=2, num_workers=2, timeout=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="5 unreadable images in a row"):
            list(loader)


# --------------------------------------------------------------------------------------------
# tiny images and the recipe's transforms


def test_images_smaller_than_the_crop(tmp_path):
    from mimfast.data.two_view import TwoViewTransform
    from mimfast.train.pretrain import mae_transform

    for i, size in enumerate([(1, 1), (1, 300), (300, 1), (5, 7), (31, 33)]):
        _save(tmp_path / "k" / f"{i}.png", size=size, seed=i)
    ds = build_dataset(str(tmp_path), 32, mae_transform(32), seed=1)
    two = SeededTransform(ds.dataset, TwoViewTransform(32, 16), seed=1)
    for i in range(len(ds)):
        img, _ = ds[(0, i)]
        assert img.shape == (3, 32, 32) and torch.isfinite(img).all()
        patches, tokens = two[(0, i)][0]
        assert patches.shape == (3, 32, 32) and tokens.shape == (3, 16, 16)
        assert torch.isfinite(patches).all() and tokens.min() >= 0.1 - 1e-6 and tokens.max() <= 0.9 + 1e-6


# --------------------------------------------------------------------------------------------
# seeding


def _folder(tmp_path, n=10):
    for i in range(n):
        _save(tmp_path / ("a" if i % 2 else "b") / f"{i:02d}.png", size=(20 + i, 30 - i), seed=i)
    return tmp_path


def test_augmentation_does_not_depend_on_workers(tmp_path):
    from mimfast.train.pretrain import mae_transform

    ds = build_dataset(str(_folder(tmp_path)), 16, mae_transform(16), seed=3)

    def epoch(workers, start=0):
        sampler = ResumableSampler(len(ds), seed=3, with_epoch=True)
        sampler.set_epoch(1, start=start)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=workers, timeout=60 if workers else 0,
                            persistent_workers=workers > 0)
        return torch.cat([imgs for imgs, _ in loader])

    torch.manual_seed(0)
    one = epoch(0)
    torch.rand(7)  # the caller's RNG state does not matter
    assert torch.equal(epoch(2), one)
    assert torch.equal(epoch(2, start=4), one[4:])  # resumed mid-epoch
    state = torch.random.get_rng_state()
    ds[(1, 3)]
    assert torch.equal(torch.random.get_rng_state(), state)  # restored


def test_seeded_transform_leaves_the_cuda_generators_alone(tmp_path):
    """Loading in the training process (``--num-workers 0``) must not reseed the CUDA RNG the
    model draws dropout / drop-path from: ``torch.manual_seed`` would, on every sample."""
    ds = SeededTransform(ShapesDataset(4, img_size=16), lambda img: img.float() + torch.rand(1), seed=2)
    with mock.patch("torch.cuda.manual_seed_all") as cuda_seed, mock.patch("torch.cuda.manual_seed") as one:
        ds[(0, 1)]
    assert cuda_seed.call_count == 0 and one.call_count == 0


def test_seeded_transform_stream_and_any_seed():
    """The per-sample stream is torch.manual_seed((seed * 1_000_003 + epoch) * 10_000_019 +
    index) as before; seeds whose product passes 64 bits (dates, 2**31 - 1) work too."""
    draw = SeededTransform(ShapesDataset(4, img_size=16), lambda img: torch.rand(3), seed=5)
    torch.manual_seed((5 * 1_000_003 + 2) * 10_000_019 + 3)
    assert torch.equal(draw[(2, 3)][0], torch.rand(3))
    for seed in (2**31 - 1, 20240601, 1234567890, -1):
        ds = SeededTransform(ShapesDataset(4, img_size=16), lambda img: torch.rand(3), seed=seed)
        a = ds[(0, 1)][0]
        assert torch.equal(ds[(0, 1)][0], a) and not torch.equal(ds[(0, 2)][0], a)
        assert 0 <= sample_seed(seed, 0, 1) < 2**64
    # a negative seed in range: the same generator state torch.manual_seed gave it
    neg = SeededTransform(ShapesDataset(4, img_size=16), lambda img: torch.rand(3), seed=-1)
    torch.manual_seed((-1 * 1_000_003 + 0) * 10_000_019 + 2)
    assert torch.equal(neg[(0, 2)][0], torch.rand(3))


def test_sampler_any_seed():
    for seed in (2**62, 2**63 + 5, -3):
        s = ResumableSampler(10, seed=seed)
        assert sorted(s.indices()) == list(range(10))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 2)  # ordinary seeds: the same permutation as before
    s = ResumableSampler(10, seed=7)
    s.set_epoch(2)
    assert s.indices() == torch.randperm(10, generator=g).tolist()


@pytest.mark.parametrize("n, world", [(1, 4), (2, 5), (3, 8), (5, 3), (7, 7), (10, 4)])
def test_sampler_pads_as_distributed_sampler(n, world):
    """Every rank gets ``len(sampler)`` indices, repeating the order as DistributedSampler does
    when there are fewer samples than ranks."""
    from torch.utils.data.distributed import DistributedSampler

    for rank in range(world):
        ours = ResumableSampler(n, shuffle=False, rank=rank, world_size=world)
        ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert list(ours) == list(ref) and len(list(ours)) == len(ours) == len(ref)
        shuffled = ResumableSampler(n, seed=1, rank=rank, world_size=world)
        assert len(list(shuffled)) == len(shuffled)


def test_builtin_shapes_take_a_negative_seed():
    a, label = render_shape_image(3, 16, seed=-1)
    b, _ = render_shape_image(3, 16, seed=2**64 - 1)
    assert np.array_equal(a, b) and 0 <= label < 8
    img, _ = ShapesDataset(4, img_size=16, seed=-5)[2]
    assert img.shape == (3, 16, 16)
    assert np.array_equal(render_shape_image(3, 16, seed=4)[0], render_shape_image(3, 16, seed=4)[0])


def test_channels_last_load_gives_the_transforms_the_same_pixels(tmp_path):
    """``ImageFiles.load`` hands out a (3, H, W) view of the decoder's (H, W, 3) memory (the
    fast layout for torchvision's uint8 resize): MAE's and BEiT's transforms give exactly what
    they give on a contiguous copy."""
    from mimfast.data.two_view import TwoViewTransform
    from mimfast.train.pretrain import mae_transform

    for i, size in enumerate([(500, 375), (97, 301), (640, 480)]):
        _save(tmp_path / "c" / f"{i}.JPEG", size=size, seed=i)
    ds = ImageFiles(tmp_path)
    for transform in (mae_transform(64), TwoViewTransform(64, 32)):
        ds.transform = transform
        torch.manual_seed(0)
        item = ds[0][0]
        assert all(t.is_contiguous() for t in (item if isinstance(item, tuple) else (item,)))
        for i in range(len(ds)):
            img = ds.load(i)
            assert img.shape[0] == 3 and torch.equal(img, torch.from_numpy(np.array(pil_loader(ds.samples[i][0])))
                                                      .permute(2, 0, 1))
            torch.manual_seed(i)
            got = transform(img)
            torch.manual_seed(i)
            want = transform(img.contiguous())
            for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert torch.equal(g, w)
