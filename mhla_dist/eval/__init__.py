"""Evaluations of the language models: synthetic recall tasks (MQAR, `mqar.py`)."""
