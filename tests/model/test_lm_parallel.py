"""The MHLA LM at CP = 2, TP = 2 and TP = 2 x CP = 2 equals the single-process model with
the same full weights: the global loss and every parameter gradient (TP shards gathered,
CP contributions summed -- what the DP x CP reduction does), on plain and on packed
batches (global document offsets; documents and blocks cut by the CP boundary)."""

import pytest
import torch
import torch.distributed as dist

from tests.model.lm_helpers import tiny_lm_config, token_batch
from tests.numerics import rel_err
from tests.parallel.harness import run_ranks

CASES = {"mhla": {}, "hybrid-perhead": {"softmax_layers": [1], "per_head_mixing": True},
         # A vocabulary that TP does not divide: padded rows, vocab-parallel untied head.
         "untied-ragged-vocab": {"tie_embeddings": False, "vocab_size": 51}}
# Two rows of 64 tokens; at CP = 2 the boundary (32, 96) cuts the documents 21-40 (inside
# its block 29-37) and 70-128; length-1 documents at 0 and 70.
OFFSETS = torch.tensor([0, 1, 21, 40, 64, 70, 71, 128])


def lm_rank_fn(rank, world, tp, cp, sp=False):
    from mhla_dist.model.lm import MHLALanguageModel
    from mhla_dist.parallel import build_topology
    from mhla_dist.parallel.tp_state import full_grads, full_state_dict, load_full_state_dict

    topo = build_topology(tp=tp, cp=cp)
    solo = [dist.new_group([r]) for r in range(world)][rank]
    tokens, targets = token_batch()
    n = tokens.shape[1] // cp
    sl = slice(topo.cp_rank * n, (topo.cp_rank + 1) * n)
    errs = {}
    # Packed documents on the hybrid case only: its MHLA and softmax layers both see them.
    runs = [*((case, None) for case in CASES.items()),
            (("hybrid-perhead", CASES["hybrid-perhead"]), OFFSETS)]
    for (name, overrides), docs in runs:
        name = name if docs is None else f"{name}-documents"
        cfg = tiny_lm_config(**overrides)
        torch.manual_seed(0)
        model = MHLALanguageModel(cfg, tp_group=topo.tp_group, cp_group=topo.cp_group,
                                  sequence_parallel=sp).double()
        ref = MHLALanguageModel(cfg, tp_group=solo, cp_group=solo).double()
        load_full_state_dict(ref, full_state_dict(model, topo.tp_group), solo)
        total, count = model.loss(tokens[:, sl], targets[:, sl], cu_seqlens=docs)
        global_count = count.clone()
        dist.all_reduce(global_count, group=topo.cp_group)
        (total / global_count).backward()
        ref_total, ref_count = ref.loss(tokens, targets, cu_seqlens=docs)
        (ref_total / ref_count).backward()
        loss_sum = total.detach().clone()
        dist.all_reduce(loss_sum, group=topo.cp_group)
        errs[f"{name}/loss"] = rel_err(loss_sum / global_count, ref_total.detach() / ref_count)
        ref_grads = full_grads(ref, solo)
        for pname, g in full_grads(model, topo.tp_group).items():
            dist.all_reduce(g, group=topo.cp_group)
            errs[f"{name}/d{pname}"] = rel_err(g, ref_grads[pname], floor=1e-8)
    return errs


@pytest.mark.parametrize("tp,cp,sp", [(1, 2, False), (2, 1, False), (2, 2, False),
                                       (4, 1, False), (2, 1, True), (2, 2, True)],
                         ids=["cp2", "tp2", "tp2xcp2", "tp4", "tp2-sp", "tp2xcp2-sp"])
def test_parallel_lm_equals_single_process(tp, cp, sp):
    """`sp`: sequence parallelism, the residual stream sharded over TP between regions."""
    for rank, errs in enumerate(run_ranks(lm_rank_fn, tp * cp, tp, cp, sp)):
        assert len(errs) > 30 and any("documents" in k for k in errs)
        bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def vocab_rank_fn(rank, world):
    from mhla_dist.model.lm import MHLALanguageModel, token_loss
    from mhla_dist.parallel import build_topology
    from mhla_dist.parallel.tp_state import full_grads, full_state_dict, load_full_state_dict

    topo = build_topology(tp=world)
    solo = [dist.new_group([r]) for r in range(world)][rank]
    cfg = tiny_lm_config(vocab_size=51, tie_embeddings=False)
    torch.manual_seed(0)
    model = MHLALanguageModel(cfg, tp_group=topo.tp_group).double()
    torch.manual_seed(0)
    ref = MHLALanguageModel(cfg, tp_group=solo).double()
    full = full_state_dict(model, topo.tp_group)
    tokens, targets = token_batch(vocab=51)
    logits = model(tokens)
    loss = model.loss(tokens, targets)[0]
    loss.backward()
    prompt = tokens[:, :5]
    out = {"shapes": {k: tuple(v.shape) for k, v in full.items()},
           "same_init": all(torch.equal(full[k], v) for k, v in ref.named_parameters()),
           "local_rows": model.embed.weight.shape[0],
           "pad_grad": model.head.weight.grad[51 - model.head.start:],  # rank 1: row 51
           "logits_err": rel_err(logits, ref(tokens)),
           "generated": model.generate(prompt, 6, temperature=0),
           "ref_generated": ref.generate(prompt, 6, temperature=0)}
    # Training through the gathered logits (not the fused loss): the same gradients, with
    # and without sequence parallelism.
    load_full_state_dict(ref, full, solo)
    ref.zero_grad()
    token_loss(ref(tokens), targets)[0].backward()
    want = full_grads(ref, solo)
    for sp in (False, True):
        torch.manual_seed(0)
        m = MHLALanguageModel(cfg, tp_group=topo.tp_group, sequence_parallel=sp).double()
        token_loss(m(tokens), targets)[0].backward()
        got = full_grads(m, topo.tp_group)
        out[f"residual_len_sp{sp}"] = m.hidden_states(tokens).shape[1]
        out[f"logit_grad_err_sp{sp}"] = max(rel_err(got[k], want[k], floor=1e-8) for k in want)
    return out


def test_vocab_parallel_shards_pads_and_gathers():
    """TP = 2 with a 51-token vocabulary: 26 rows per rank (one padding row on the last),
    the full weights are 51 rows and equal the single-process model's for the same seed,
    the gathered logits and greedy generation equal it, the padding row gets no gradient."""
    for rank, out in enumerate(run_ranks(vocab_rank_fn, 2)):
        assert out["shapes"]["embed.weight"] == (51, 32) == out["shapes"]["head.weight"]
        assert out["same_init"] and out["local_rows"] == 26
        assert out["logits_err"] < 1e-12
        assert torch.equal(out["generated"], out["ref_generated"])
        assert out["logit_grad_err_spFalse"] < 1e-10 and out["logit_grad_err_spTrue"] < 1e-10
        assert (out["residual_len_spFalse"], out["residual_len_spTrue"]) == (64, 32)
        if rank == 1:
            assert out["pad_grad"].shape[0] == 1 and not out["pad_grad"].any()
