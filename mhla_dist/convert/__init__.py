"""Checkpoint conversion: ZeRO/TP checkpoints to one file and back, softmax models into
MHLA, Mc resizing, inspection. CLIs: tools/convert_checkpoint.py, tools/inspect_checkpoint.py.
"""
