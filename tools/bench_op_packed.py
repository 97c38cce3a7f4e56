"""The packed-documents rows of `tools/bench_op.py --packed`.

    python tools/bench_op.py --packed                 # N = 4K..32K, ~300-token documents
    python tools/bench_op.py --packed --ns 16384 --doc-len 300 --block-size 64

Causal MHLA forward+backward of one packed window with `cu_seqlens` (documents of random
lengths, mean `--doc-len`, uniform in [1, 2 * doc-len)) against the same N unpacked, at
the same block size. Each variant is measured alone in a fresh process (time and peak
memory), and the ratio packed / unpacked is measured side by side in one more process,
alternating the two (`measure_pair`); the layout is built inside every timed call, as a
model builds it once per forward. Target on CPU: the ratio at N = 16K at most 1.5.
"""

from __future__ import annotations

import logging

log = logging.getLogger("bench_op")


def document_offsets(n: int, mean_len: int, seed: int = 0):
    """Offsets of documents of random lengths in `[1, 2 * mean_len)` packed into `n`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * mean_len, (2 * n // mean_len + 2,), generator=g)
    ends = torch.cumsum(lengths, 0)
    ends = ends[ends < n]
    return torch.cat([torch.zeros(1, dtype=torch.int64), ends, torch.tensor([n])])


def packed_sweep(args, run_child) -> list[dict]:
    base = dict(device=args.device, dtype=args.dtype, batch=1, heads=args.heads,
                dim=args.dim, causal=True, repeats=args.repeats, doc_len=args.doc_len)
    rows = []
    for n in args.ns:
        for c in args.packed_blocks:
            common = dict(base, sweep=f"packed C={c}", n=n, block_size=c,
                          num_docs=len(document_offsets(n, args.doc_len)) - 1)
            for variant in ("mhla-packed", "mhla-torch"):
                spec = dict(common, variant=variant)
                result = run_child(spec, args.timeout)
                rows.append({**spec, **result})
                log.info("%-12s %-12s N=%-6d %s", spec["sweep"], variant, n,
                         result.get("status"))
            pair = dict(common, variant="packed vs unpacked",
                        variants=["mhla-packed", "mhla-torch"])
            rows.append({**pair, **run_child(pair, args.timeout)})
    for r in rows:
        if r["variant"] == "mhla-packed" and r.get("status") == "ok":
            pair = next((x for x in rows if "variants" in x and x.get("status") == "ok"
                         and (x["n"], x["sweep"]) == (r["n"], r["sweep"])), None)
            plain = next((x for x in rows if x["variant"] == "mhla-torch"
                          and x.get("status") == "ok"
                          and (x["n"], x["sweep"]) == (r["n"], r["sweep"])), None)
            if pair:
                r["over_unpacked_fwd"] = pair["fwd_ratio"]
                r["over_unpacked_fwdbwd"] = pair["fwdbwd_ratio"]
            if plain:
                r["peak_over_unpacked"] = r["peak_bytes"] / max(plain["peak_bytes"], 1)
    return rows


def packed_targets(rows) -> dict:
    out = {}
    for r in rows:
        if r["variant"] == "mhla-packed" and r["n"] == 16384 and "over_unpacked_fwdbwd" in r:
            out[f"packed_over_unpacked_fwdbwd_16k_{r['sweep'].split()[1]}"] = {
                "value": r["over_unpacked_fwdbwd"], "limit": 1.5}
    for t in out.values():
        t["met"] = t["value"] <= t["limit"]
    return out


def packed_table(rows) -> str:
    head = (f"{'sweep':<13}{'variant':<13}{'N':>7}{'docs':>6}{'fwd ms':>10}{'fwd+bwd ms':>12}"
            f"{'peak MiB':>10}  packed/unpacked (side by side)")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "variants" in r:
            continue
        ok = r.get("status") == "ok"
        cells = (f"{r['fwd_ms']:>10.1f}{r['fwdbwd_ms']:>12.1f}{r['peak_bytes'] / 2**20:>10.0f}"
                 if ok else f"{'-':>10}{'-':>12}{'-':>10}")
        ratio = (f"  fwd {r['over_unpacked_fwd']:.2f} fwd+bwd {r['over_unpacked_fwdbwd']:.2f}"
                 f" peak {r.get('peak_over_unpacked', float('nan')):.2f}"
                 if "over_unpacked_fwd" in r else ("" if ok else f"  {r.get('status')}"))
        lines.append(f"{r['sweep']:<13}{r['variant']:<13}{r['n']:>7}{r['num_docs']:>6}"
                     f"{cells}{ratio}")
    return "\n".join(lines)
