"""An MHLA language model -> a transformers model folder (`trust_remote_code=True`).

    OUT_DIR/
        config.json                 model_type "mhla_lm", auto_map to the two files below,
                                    max_position_embeddings = max_seq_len
        configuration_mhla.py       the transformers config class (torch/transformers only)
        modeling_mhla.py            the model: a compact blocked MHLA, softmax layers (SDPA)
        model.safetensors           the fp32 weights, under our names; past `shard_bytes`
                                    model-0000i-of-0000n.safetensors + the index json
        generation_config.json
        tokenizer.json, tokenizer_config.json   the byte-level tokenizer (a 257 vocabulary)
                                    or the given tokenizer.json

The source is a consolidated `.safetensors` (with its model config), a trainer checkpoint
folder, a run directory (its `model.safetensors`, else its latest checkpoint) or a
universal checkpoint. Vocab-parallel padding never reaches the export: the full state
holds the real vocabulary. transformers itself is needed only to load the result.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from mhla_dist.config import LMConfig

from .files import read_consolidated
from .model_spec import ConversionError, check_state, parameter_layout, read_run_config
from .universal import is_universal, read_universal_weights
from .zero import consolidate_zero_checkpoint

FILES = Path(__file__).parent / "hf_files"
AUTO_MAP = {"AutoConfig": "configuration_mhla.MHLAConfig",
            "AutoModelForCausalLM": "modeling_mhla.MHLAForCausalLM"}
DEFAULT_SHARD_BYTES = 5 * 2**30
EOS_TOKEN = "<|endoftext|>"  # id 256 of the byte-level tokenizer


def load_source(source: str | Path) -> tuple[dict[str, torch.Tensor], LMConfig]:
    """Full fp32 weights and the model config of any SOURCE `export-hf` takes."""
    source = Path(source)
    if source.is_file() and source.suffix == ".safetensors":
        state, cfg = read_consolidated(source)
        if cfg is None:
            raise ConversionError(f"{source} carries no model config (metadata or "
                                  "model_config.json beside it)")
    elif source.is_dir() and is_universal(source):
        state, cfg = read_universal_weights(source), read_run_config(source / "config.yaml")
    elif source.is_dir() and (source / "model.safetensors").is_file():
        return load_source(source / "model.safetensors")
    elif source.is_dir():
        state, cfg = consolidate_zero_checkpoint(source)
    else:
        raise ConversionError(f"{source} is neither a .safetensors file nor a run, checkpoint "
                              "or universal checkpoint folder")
    if not isinstance(cfg, LMConfig):
        raise ConversionError(f"{source} holds a {cfg.kind} model; export-hf exports language "
                              "models")
    state = {k: v.float() for k, v in state.items()}
    check_state(state, parameter_layout(cfg), f"the weights in {source}")
    return state, cfg


def hf_config(cfg: LMConfig) -> dict:
    fields = asdict(cfg)
    for key in ("kind", "activation_checkpointing", "loss_chunk_tokens", "num_blocks",
                "init_std", "embed_init_std", "rope_per_document", "mixing_init"):
        fields.pop(key)
    return {**fields, "model_type": "mhla_lm", "architectures": ["MHLAForCausalLM"],
            "auto_map": AUTO_MAP, "max_position_embeddings": cfg.max_seq_len,
            "num_hidden_layers": cfg.num_layers, "torch_dtype": "float32",
            "tie_word_embeddings": False, "use_cache": True}


def _write_weights(state: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t.contiguous()
        size += nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return names


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what a ByteLevel tokenizer works on)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = dict(zip(keep, map(chr, keep), strict=True)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(out: Path, max_length: int) -> None:
    """mhla-dist's byte-level tokenizer (ids 0..255 the UTF-8 bytes, 256 the end of a
    document) as a `tokenizer.json` that `AutoTokenizer` loads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    if tok.token_to_id(EOS_TOKEN) != 256:
        raise RuntimeError(f"{EOS_TOKEN} got id {tok.token_to_id(EOS_TOKEN)}, not 256")
    tok.save(str(out / "tokenizer.json"))
    _write_tokenizer_config(out, max_length)


def _write_tokenizer_config(out: Path, max_length: int) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
         "model_max_length": max_length}, indent=1))


def _tokenizer(tokenizer: str | None, cfg: LMConfig, out: Path) -> str:
    if tokenizer is None:
        tokenizer = "byte" if cfg.vocab_size == 257 else None
    if tokenizer is None:
        return (f"no tokenizer written (vocab_size={cfg.vocab_size} is not the byte "
                "tokenizer's 257): pass --tokenizer PATH/tokenizer.json")
    if tokenizer == "byte":
        write_byte_tokenizer(out, cfg.max_seq_len)
        return "the byte-level tokenizer"
    path = Path(tokenizer)
    if not path.is_file():
        raise ConversionError(f"--tokenizer {tokenizer}: no such file (give the "
                              "tokenizer.json the data was prepared with, or 'byte')")
    shutil.copyfile(path, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len},
        indent=1))
    return f"the tokenizer {path}"


def export_hf(source: str | Path, out_dir: str | Path, *,
              shard_bytes: int = DEFAULT_SHARD_BYTES, tokenizer: str | None = None) -> str:
    """Write the transformers folder for SOURCE at OUT_DIR (a new or empty folder).
    `tokenizer`: "byte", a `tokenizer.json` path, or None (byte if the vocabulary is 257)."""
    state, cfg = load_source(source)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out} exists and is not empty: export into a new folder")
    if shard_bytes < 1:
        raise ConversionError(f"shard_bytes={shard_bytes} must be >= 1")
    tmp = out.with_name(out.name + ".exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _write_weights(state, tmp, shard_bytes)
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"max_length": cfg.max_seq_len, "use_cache": True}, indent=1))
    for name in ("configuration_mhla.py", "modeling_mhla.py"):
        shutil.copyfile(FILES / name, tmp / name)
    wrote_tokenizer = _tokenizer(tokenizer, cfg, tmp)
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return (f"exported {len(state)} tensors ({cfg.num_layers} layers, softmax layers "
            f"{cfg.softmax_layers or 'none'}) to {out}: {', '.join(files)}; "
            f"{wrote_tokenizer}")
