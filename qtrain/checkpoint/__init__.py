"""Adapter I/O in PEFT format and atomic writes."""
