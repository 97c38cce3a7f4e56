"""The files `export-hf` writes beside an exported model: its transformers configuration
and modeling code. They import torch and transformers only (never this package), so an
exported folder loads wherever transformers does (`trust_remote_code=True`)."""
