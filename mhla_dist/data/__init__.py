"""Streaming data on webdataset: LM token shards and video clip shards, resumable."""
