"""Packed documents (`cu_seqlens`): `mhla` of a packed batch equals `mhla_reference` run on
every document alone, by an explicit loop here: outputs and the gradients of q, k, v and
mixing (whose gradient is the sum over documents)."""

import itertools

import pytest
import torch

from mhla_kernels import check_cu_seqlens, document_layout, mhla, mhla_reference
from mhla_kernels.packing import slot_size_for
from tests.kernels.inputs import make_inputs
from tests.numerics import rel_err

CASES = list(itertools.product([True, False], [True, False], [False, True]))
IDS = [f"{'causal' if c else 'noncausal'}-{'norm' if n else 'unnorm'}-"
       f"{'perhead' if p else 'shared'}" for c, n, p in CASES]


def random_offsets(total: int, row: int, max_len: int, seed: int) -> torch.Tensor:
    """Offsets over `total` tokens with every row boundary, documents of 1..max_len
    tokens, length-1 documents forced in."""
    g = torch.Generator().manual_seed(seed)
    cuts = {0, total, *range(0, total, row)}
    pos = 0
    while pos < total:
        pos += int(torch.randint(1, max_len + 1, (1,), generator=g))
        cuts.add(min(pos, total))
    cuts |= {5, 6, row - 1}  # documents of one token
    return torch.tensor(sorted(cuts))


def per_document(q, k, v, mixing, block_size, cu, **kw):
    """The ground truth: `mhla_reference` of every document alone, concatenated."""
    b, n = q.shape[:2]
    flat = [x.reshape(1, b * n, *x.shape[2:]) for x in (q, k, v)]
    bounds = cu.tolist()
    outs = [mhla_reference(*(x[:, s:e] for x in flat), mixing, block_size, **kw)
            for s, e in zip(bounds[:-1], bounds[1:], strict=False)]
    return torch.cat(outs, 1).view(b, n, *v.shape[2:])


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("block_size", [1, 4, 7])
@pytest.mark.parametrize("case", range(len(CASES)), ids=IDS)
def test_packed_equals_per_document_reference(case, block_size, batch):
    causal, normalize, per_head = CASES[case]
    n = 45
    q, k, v, mixing = make_inputs(batch, n, 2, 4, 3, block_size, per_head=per_head,
                                  seed=case)
    cu = random_offsets(batch * n, n, max_len=3 * block_size + 2, seed=case + block_size)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, mixing)]
    kw = dict(causal=causal, normalize=normalize)
    out = mhla(*leaves[:3], leaves[3], block_size, cu_seqlens=cu, **kw)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, mixing)]
    ref = per_document(*ref_leaves[:3], ref_leaves[3], block_size, cu, **kw)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(mhla_reference(q, k, v, mixing, block_size, cu_seqlens=cu, **kw), ref) < 1e-12
    do = torch.randn(ref.shape, dtype=ref.dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, leaves, do)
    want = torch.autograd.grad(ref, ref_leaves, do)
    for name, a, b in zip("q k v mixing".split(), got, want, strict=True):
        assert rel_err(a, b, floor=1e-6) < 1e-11, name


def test_one_document_is_plain_mhla_and_documents_do_not_mix():
    q, k, v, mixing = make_inputs(2, 40, 2, 4, 4, 8, seed=1)
    whole = torch.tensor([0, 40, 80])
    plain = mhla(q, k, v, mixing, 8, causal=True)
    assert rel_err(mhla(q, k, v, mixing, 8, causal=True, cu_seqlens=whole), plain) < 1e-13
    # Changing the second document changes nothing in the first (non-causal too).
    cu = torch.tensor([0, 13, 40, 80])
    v2 = v.clone()
    v2[0, 13:] += 1.0
    for causal in (True, False):
        a = mhla(q, k, v, mixing, 8, causal=causal, cu_seqlens=cu)
        b = mhla(q, k, v2, mixing, 8, causal=causal, cu_seqlens=cu)
        assert torch.equal(a[0, :13], b[0, :13]) and torch.equal(a[1], b[1])


def test_bfloat16_matches_float64_truth():
    q, k, v, mixing = make_inputs(1, 300, 2, 16, 16, 32, per_head=True, seed=4)
    cu = random_offsets(300, 300, max_len=90, seed=2)
    truth = per_document(q, k, v, mixing, 32, cu, causal=True)
    out = mhla(*(x.bfloat16() for x in (q, k, v)), mixing.float(), 32, causal=True,
               cu_seqlens=cu)
    assert out.dtype == torch.bfloat16 and rel_err(out, truth) < 1e-2


def test_layout_counts_segments_and_slots():
    # Documents 0-5 (ragged: 4 + 1), 5-6, 6-20 (4 + 4 + 4 + 2); blocks of 4.
    layout = document_layout(torch.tensor([0, 5, 6, 20]), 1, 20, 4)
    assert layout.num_slots == 7 and layout.max_doc_blocks == 4
    assert layout.row_doc.tolist() == [0, 0, 1, 2, 2, 2, 2]
    assert layout.row_block.tolist() == [0, 1, 0, 0, 1, 2, 3]
    # Under CP = 2 (10 tokens each): rank 0 holds 0-4, 4-5, 5-6 and document 2's block 0
    # (6-10); rank 1 its blocks 1-3 (10-14, 14-18, 18-20) and one padding slot.
    r0 = document_layout(torch.tensor([0, 5, 6, 20]), 1, 10, 4, cp_size=2, cp_rank=0)
    r1 = document_layout(torch.tensor([0, 5, 6, 20]), 1, 10, 4, cp_size=2, cp_rank=1)
    assert r0.num_slots == r1.num_slots == 4
    assert r0.row_doc.tolist() == [0, 0, 1, 2] and r1.row_doc.tolist() == [2, 2, 2, -1]
    # A rank boundary inside a block: documents 0-7, 7-20; document 1's block 0 (7-11) is
    # cut at 10 into 7-10 (rank 0) and 10-11 (rank 1).
    cut = document_layout(torch.tensor([0, 7, 20]), 1, 10, 4, cp_size=2, cp_rank=1)
    assert cut.row_doc.tolist() == [1, 1, 1, 1] and cut.row_block.tolist() == [0, 1, 2, 3]
    first = document_layout(torch.tensor([0, 7, 20]), 1, 10, 4, cp_size=2, cp_rank=0)
    assert first.row_doc.tolist() == [0, 0, 1, -1] and first.row_block.tolist()[:3] == [0, 1, 0]


def test_long_document_refused_with_its_size():
    q, k, v, mixing = make_inputs(1, 40, 1, 4, 4, 8, seed=0)  # mixing 5 x 5: 40 tokens
    with pytest.raises(ValueError, match="6 blocks of 4.*at most 20 tokens"):
        mhla(q, k, v, mixing, 4, cu_seqlens=torch.tensor([0, 24, 40]))


@pytest.mark.parametrize("offsets, message", [
    ([0, 10, 10, 40], r"strictly increasing.*cu_seqlens\[1\]=10, cu_seqlens\[2\]=10"),
    ([0, 20, 12, 40], r"strictly increasing.*cu_seqlens\[1\]=20, cu_seqlens\[2\]=12"),
    ([0, 10, 39], "must end at the 40 tokens.*got 39"),
    ([3, 10, 40], "must start at 0, got 3"),
    ([[0, 40]], r"shape \(1, 2\)"),
])
def test_bad_offsets_name_the_values(offsets, message):
    q, k, v, mixing = make_inputs(1, 40, 1, 4, 4, 8, seed=0)
    with pytest.raises(ValueError, match=message):
        mhla(q, k, v, mixing, 8, cu_seqlens=torch.tensor(offsets))


def test_offsets_must_hold_row_boundaries_and_integers():
    with pytest.raises(ValueError, match=r"row boundary.*\[20\] are missing"):
        check_cu_seqlens(torch.tensor([0, 15, 40]), 40, 20)
    with pytest.raises(TypeError, match="integers"):
        check_cu_seqlens(torch.tensor([0.0, 40.0]), 40)
    assert check_cu_seqlens(torch.tensor([0, 20, 40], dtype=torch.int32), 40, 20).dtype \
        == torch.int64


@pytest.mark.parametrize("slot_size", [8, 4, 2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_slots_smaller_than_blocks_are_virtual_blocks(causal, slot_size):
    """Segments cut into slots of a divisor of C still read `Mc` of their real block."""
    q, k, v, mixing = make_inputs(2, 45, 2, 4, 3, 8, per_head=True, seed=5)
    cu = random_offsets(90, 45, max_len=30, seed=1)
    layout = document_layout(cu, 2, 45, 8, slot_size=slot_size)
    assert layout.slot_size == slot_size and layout.max_doc_blocks <= 6
    leaves = [x.clone().requires_grad_() for x in (q, k, v, mixing)]
    out = mhla(*leaves, 8, causal=causal, cu_seqlens=layout)
    ref = per_document(q, k, v, mixing, 8, cu, causal=causal)
    assert rel_err(out, ref) < 1e-12
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, mixing)]
    ref = per_document(*ref_leaves, 8, cu, causal=causal)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref)),
                    strict=True):
        assert rel_err(a, b, floor=1e-6) < 1e-11
    with pytest.raises(ValueError, match="slot_size=3 must divide block_size=8"):
        document_layout(cu, 2, 45, 8, slot_size=3)


def test_slot_size_trades_padding_against_the_mix():
    # 200-token documents: a block of 512 pads each by 312 tokens, a slot of 256 by 56
    # (and smaller slots pad no less); with whole blocks of 256 nothing is to be saved.
    lengths = torch.full((80,), 200)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    assert slot_size_for(cu, 512, 64) == 256 and slot_size_for(cu, 256, 64) == 256
    # One long document: nothing is padded, whole blocks are best.
    assert slot_size_for(torch.tensor([0, 16384]), 256, 64) == 256
    # Very short documents: small slots.
    assert slot_size_for(torch.arange(0, 16385, 16), 256, 64) == 16
