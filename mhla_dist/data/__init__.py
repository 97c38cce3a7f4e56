"""Streaming data on webdataset: LM token shards and video clip shards, resumable.

```python
from mhla_dist.data import lm_loader, shift_tokens, cp_slice

loader = lm_loader("data/train-{000000..000099}.tar", seq_len=4096, batch_size=8,
                   dp_rank=topo.dp_rank, dp_size=topo.dp_size, num_workers=2, seed=1234)
for batch in loader:                       # {"tokens", "doc_ids"}: [B, seq_len + 1]
    local = cp_slice(batch, cp_rank, cp_size)   # input_ids, labels, doc_ids: [B, seq_len/CP]
                                                # cu_seqlens: global offsets [num_docs + 1]
state = loader.state_dict()                # after a restore: the same next batches
```
Shards are split by DP rank, then by loader worker; every TP and CP rank of one DP replica
passes the same `dp_rank` and gets the same batches. See `loader.py` for the resume state
and what happens when the DP size changes, `samples.py` for the shard formats.
"""

from mhla_dist.data.default_corpus import CorpusInfo, build_default_corpus, default_documents
from mhla_dist.data.lm import (
    IGNORE_INDEX,
    TokenWindows,
    cp_slice,
    document_offsets,
    lm_loader,
    shift_tokens,
)
from mhla_dist.data.loader import BatchSource, StreamingLoader, to_device
from mhla_dist.data.samples import decode_clip, decode_document
from mhla_dist.data.shards import expand_urls, read_shard
from mhla_dist.data.stats import BadDataEvent, DataStats, NoValidDataError
from mhla_dist.data.stream import epoch_shards
from mhla_dist.data.synthetic_video import synthetic_clip, write_synthetic_video
from mhla_dist.data.tokenizer import (
    BYTE_VOCAB_SIZE,
    EOS_ID,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
)
from mhla_dist.data.vae import VideoVAE, load_vae
from mhla_dist.data.video import ClipBatches, video_loader
from mhla_dist.data.writing import ShardSink, ShardSummary, clip_sample, token_sample

__all__ = [
    "BYTE_VOCAB_SIZE", "EOS_ID", "IGNORE_INDEX", "BadDataEvent", "BatchSource", "ByteTokenizer",
    "ClipBatches", "CorpusInfo", "DataStats", "NoValidDataError", "ShardSink", "ShardSummary",
    "StreamingLoader", "TokenWindows", "Tokenizer", "VideoVAE", "build_default_corpus",
    "clip_sample", "cp_slice", "decode_clip", "decode_document", "default_documents",
    "document_offsets", "epoch_shards", "expand_urls", "load_tokenizer", "load_vae", "lm_loader",
    "read_shard", "shift_tokens", "synthetic_clip", "to_device", "token_sample", "video_loader",
    "write_synthetic_video",
]
