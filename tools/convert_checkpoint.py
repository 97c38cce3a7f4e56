"""Convert checkpoints in and out of mhla-dist.

    # a DeepSpeed checkpoint (any ZeRO stage, any TP/CP layout) -> one file (+ model_config.json)
    # (out.st: any OUTPUT.safetensors path)
    python tools/convert_checkpoint.py zero-to-safetensors runs/x/checkpoints/step00001000 out.st
    python tools/convert_checkpoint.py zero-to-safetensors runs/x out.st --tag step00000500 \
        --dtype bf16
    # a DeepSpeed checkpoint -> a universal checkpoint, to resume at another DP x CP x TP
    # layout or ZeRO stage with the optimizer state carried over (resume=runs/x/universal)
    python tools/convert_checkpoint.py to-universal runs/x/checkpoints/step00001000 \
        runs/x/universal
    # a Hugging Face Llama (safetensors + config.json) -> the MHLA LM
    python tools/convert_checkpoint.py import-llama hf/llama/ out/mhla.safetensors --block-size 256
    # a trained MHLA LM -> a transformers folder (AutoModelForCausalLM, trust_remote_code)
    python tools/convert_checkpoint.py export-hf runs/lm out/hf
    # a facebookresearch DiT (.pt/.pth, or safetensors) -> the MHLA DiT (a preset, or sizes
    # read from the shapes plus num_heads=)
    python tools/convert_checkpoint.py import-dit DiT-XL-2-256x256.pt out/dit.safetensors \
        --preset xl2
    python tools/convert_checkpoint.py import-dit ckpt.pt out/dit.safetensors num_heads=16 \
        block_grid=[1,4,4] pos_embed=learned
    # a diffusers WanTransformer3DModel folder (Wan2.1 T2V) -> the MHLA DiT (arch wan); the
    # clip comes from a preset or frames=/height=/width=/block_grid= (softmax_layers=all: Wan)
    python tools/convert_checkpoint.py import-wan Wan2.1-T2V-1.3B-Diffusers/transformer \
        out/wan.safetensors --preset wan2.1-1.3b
    # resize the learned Mc for a new max_seq_len / block size
    python tools/convert_checkpoint.py resize-mixing in.safetensors out.safetensors max_seq_len=8192

Train from saved weights at any layout with `init.weights=PATH` (a .safetensors file, a
checkpoint folder or a universal checkpoint folder) and `init.optimizer=carry|reset`;
`resume=PATH` continues a run (a universal checkpoint: at any layout).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

import yaml

from mhla_dist.convert.files import DTYPES
from mhla_dist.convert.model_spec import ConversionError


def _zero(args) -> str:
    from mhla_dist.convert.zero import zero_to_safetensors

    out = zero_to_safetensors(args.checkpoint, args.output, tag=args.tag, dtype=args.dtype)
    return f"wrote {out} and {out.with_name('model_config.json')}"


def _universal(args) -> str:
    from mhla_dist.convert.universal import to_universal

    out = to_universal(args.checkpoint, args.output, tag=args.tag, workers=args.workers)
    return (f"wrote {out}; resume it at any layout with resume={out} (optimizer carried "
            f"over), or start a new run from it with init.weights={out}")


def _export_hf(args) -> str:
    from mhla_dist.convert.export_hf import export_hf

    text = export_hf(args.source, args.output, shard_bytes=int(args.shard_gb * 2**30),
                     tokenizer=args.tokenizer)
    return (f"{text}\nload it with transformers.AutoModelForCausalLM.from_pretrained("
            f"{str(args.output)!r}, trust_remote_code=True)")


def _llama(args) -> str:
    from mhla_dist.convert.import_llama import import_llama

    rep = import_llama(args.source, args.output, hf_config=args.config, dtype=args.dtype,
                       block_size=args.block_size, max_seq_len=args.max_seq_len,
                       output_gate=args.output_gate, feature_map=args.feature_map,
                       per_head_mixing=args.per_head_mixing, softmax_layers=args.softmax_layers)
    return rep.to_text() + f"\nwrote {args.output}"


def _key_values(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConversionError(f"{item!r} is not key=value (e.g. max_seq_len=8192)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _dit(args) -> str:
    from mhla_dist.convert.import_dit import import_dit

    rep = import_dit(args.source, args.output, preset=args.preset, dtype=args.dtype,
                     checkpoint_key=args.checkpoint_key, **_key_values(args.overrides))
    return rep.to_text() + f"\nwrote {args.output}"


def _wan(args) -> str:
    from mhla_dist.convert.import_wan import import_wan

    rep = import_wan(args.source, args.output, preset=args.preset, dtype=args.dtype,
                     **_key_values(args.overrides))
    return rep.to_text() + f"\nwrote {args.output}"


def _resize(args) -> str:
    from mhla_dist.convert.mixing_resize import resize_checkpoint_mixing

    overrides = _key_values(args.overrides)
    if not overrides:
        raise ConversionError("give what changes, e.g. max_seq_len=8192 or block_grid=[2,4,4]")
    rep = resize_checkpoint_mixing(args.source, args.output, overrides, dtype=args.dtype)
    return rep.to_text() + f"\nwrote {args.output}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    z = sub.add_parser("zero-to-safetensors", help="DeepSpeed ZeRO/TP checkpoint -> one file")
    z.add_argument("checkpoint", help="a checkpoint tag folder, its checkpoints/ parent or "
                   "the run directory")
    z.add_argument("output", help="the .safetensors file to write")
    z.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    z.set_defaults(run=_zero)
    u = sub.add_parser("to-universal", help="DeepSpeed ZeRO/TP checkpoint -> DeepSpeed "
                       "universal checkpoint (any layout, optimizer state kept)")
    u.add_argument("checkpoint", help="a checkpoint tag folder, its checkpoints/ parent or "
                   "the run directory")
    u.add_argument("output", help="the folder to create")
    u.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    u.add_argument("--workers", type=int, default=1,
                   help="processes for DeepSpeed's converter (default 1)")
    u.set_defaults(run=_universal)
    ll = sub.add_parser("import-llama", help="HF Llama safetensors -> MHLA LM weights")
    ll.add_argument("source", help="a .safetensors file or a folder of them (with config.json)")
    ll.add_argument("output")
    ll.add_argument("--config", default=None, help="the HF config.json (default: beside source)")
    ll.add_argument("--block-size", type=int, default=64)
    ll.add_argument("--max-seq-len", type=int, default=None,
                    help="default: max_position_embeddings")
    ll.add_argument("--feature-map", default="relu")
    ll.add_argument("--softmax-layers", default=None,
                    help="layers that stay softmax attention: 'all' or indices like 0,3 "
                         "(default: every layer becomes MHLA)")
    ll.add_argument("--output-gate", action="store_true",
                    help="add the SiLU output gate (random init; off keeps the source's output)")
    ll.add_argument("--per-head-mixing", action="store_true")
    ll.set_defaults(run=_llama)
    d = sub.add_parser("import-dit", help="facebookresearch DiT checkpoint -> MHLA DiT weights")
    d.add_argument("source", help="a .pt/.pth state dict (bare or under 'ema'/'model') or "
                   "a .safetensors file")
    d.add_argument("output")
    d.add_argument("--preset", default=None, help="s2, b2, xl2, ... (default: sizes from the "
                   "shapes; then give num_heads=)")
    d.add_argument("--checkpoint-key", default=None,
                   help="entry of a training checkpoint (default: 'ema', else 'model')")
    d.add_argument("overrides", nargs="*", help="DiTConfig keys, e.g. num_heads=16 "
                   "block_grid=[1,4,4] pos_embed=learned softmax_layers=[0]")
    d.set_defaults(run=_dit)
    w = sub.add_parser("import-wan", help="diffusers WanTransformer3DModel -> MHLA DiT "
                       "weights (arch wan)")
    w.add_argument("source", help="the transformer folder (config.json + safetensors)")
    w.add_argument("output")
    w.add_argument("--preset", default=None, help="e.g. wan2.1-1.3b (default: sizes from "
                   "config.json; then give frames= height= width= block_grid=)")
    w.add_argument("overrides", nargs="*", help="DiTConfig keys, e.g. block_grid=[3,5,4] "
                   "softmax_layers=all (or [0,1]) per_head_mixing=true")
    w.set_defaults(run=_wan)
    e = sub.add_parser("export-hf", help="an MHLA LM -> a transformers folder "
                       "(trust_remote_code=True)")
    e.add_argument("source", help="a run directory, a checkpoint or universal folder, or a "
                   "consolidated .safetensors")
    e.add_argument("output", help="a new folder")
    e.add_argument("--shard-gb", type=float, default=5.0,
                   help="weights past this size are sharded, with an index (default 5)")
    e.add_argument("--tokenizer", default=None,
                   help="'byte', or the tokenizer.json the data was prepared with (default: "
                        "byte for a 257-token vocabulary)")
    e.set_defaults(run=_export_hf)
    r = sub.add_parser("resize-mixing", help="resize every Mc for a new block layout")
    r.add_argument("source", help="consolidated .safetensors (with its model config)")
    r.add_argument("output")
    r.add_argument("overrides", nargs="*", help="model keys: max_seq_len=, block_size=, "
                   "num_blocks= (LM) or block_grid=[fb,hb,wb] (DiT)")
    r.set_defaults(run=_resize)
    for s in (z, ll, d, w, r):
        s.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        print(args.run(args))
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
