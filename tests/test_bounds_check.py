"""The interpreter's out-of-bounds check (tests/bounds_check.py) catches what it must and lets
legal accesses through: a kernel is only as proven as this check is sharp."""

import pytest
import torch

from tolerance import INTERPRETED

pytestmark = pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's bounds check")

if INTERPRETED:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(src_ptr, dst_ptr, n, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        ok = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs + SHIFT, mask=ok), mask=ok)

    @triton.jit
    def _copy_unmasked(src_ptr, dst_ptr, SRC_SHIFT: tl.constexpr, DST_SHIFT: tl.constexpr):
        tl.store(dst_ptr + DST_SHIFT, tl.load(src_ptr + SRC_SHIFT))  # no mask: create_load / create_store


    @triton.jit
    def _copy_if(src_ptr, dst_ptr, n, FLAG: tl.constexpr, BLOCK: tl.constexpr):
        # a mask combined with a run-time scalar condition: 0 / 1 integers in the interpreter
        cond = tl.program_id(0) < FLAG
        offs = tl.arange(0, BLOCK)
        ok = (offs < n) & cond
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=ok, other=-1.0), mask=offs < n)


def test_masks_combined_with_a_scalar_condition_count_as_masks():
    """Every lane masked off by a scalar False is not an access; with True, lanes past n are still
    off (the mask is read as booleans, not as integer indices)."""
    src, dst = torch.arange(10.0), torch.empty(10)
    _copy_if[(1,)](src[:3], dst, 10, FLAG=0, BLOCK=16)  # lanes 3..9 would read past src: masked off
    assert torch.equal(dst, torch.full((10,), -1.0))
    _copy_if[(1,)](src, dst, 10, FLAG=1, BLOCK=16)
    assert torch.equal(dst, src)
    with pytest.raises(Exception, match="load of 4 bytes .* outside every tensor"):
        _copy_if[(1,)](src[:3], dst, 10, FLAG=1, BLOCK=16)


def test_in_bounds_and_masked_off_accesses_pass():
    src = torch.arange(10.0)
    dst = torch.empty(10)
    _copy[(1,)](src, dst, 10, SHIFT=0, BLOCK=16)  # lanes 10..15 are masked off
    assert torch.equal(dst, src)


@pytest.mark.parametrize("shift", [1, -1])
def test_read_past_either_end_fails(shift):
    big = torch.arange(12.0)
    src = big[1:11]  # in the storage, outside the view: still a bug
    with pytest.raises(Exception, match="load of 4 bytes .* outside every tensor"):
        _copy[(1,)](src, torch.empty(10), 10, SHIFT=shift, BLOCK=16)


def test_write_past_the_end_fails():
    src = torch.arange(10.0)
    dst = torch.empty(12)[:9]
    with pytest.raises(Exception, match="store of 4 bytes .* outside every tensor"):
        _copy[(1,)](src, dst, 10, SHIFT=0, BLOCK=16)


@pytest.mark.parametrize("src_shift,dst_shift,kind", [(-1, 0, "load"), (10, 0, "load"), (0, 9, "store")])
def test_unmasked_accesses_are_checked_too(src_shift, dst_shift, kind):
    """Loads and stores without a mask take the interpreter's create_load / create_store; they
    must meet the same check (they do while those route through the masked versions)."""
    src = torch.arange(12.0)[1:11]
    dst = torch.empty(12)[:9]
    _copy_unmasked[(1,)](src, dst, SRC_SHIFT=0, DST_SHIFT=0)  # in bounds: passes
    assert dst[0] == src[0]
    with pytest.raises(Exception, match=f"{kind} of 4 bytes .* outside every tensor"):
        _copy_unmasked[(1,)](src, dst, SRC_SHIFT=src_shift, DST_SHIFT=dst_shift)
