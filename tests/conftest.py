"""Suite set-up: run Triton kernels in its CPU interpreter when there is no GPU.

Triton decides interpreted vs compiled when it is first imported, so the variable is set
here, before any test module imports it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
