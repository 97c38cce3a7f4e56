"""Checkpoint conversion: ZeRO/TP checkpoints to one file and back, softmax models into MHLA, Mc resizing, inspection."""
