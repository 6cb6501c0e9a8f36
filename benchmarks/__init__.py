"""Benchmarks: `python -m benchmarks.NAME` prints JSON comparing qtrain with the HF + peft + bitsandbytes anchor."""
