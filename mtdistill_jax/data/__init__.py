"""Data: official dataset readers, the native memory-mapped dataset format and samplers (no learner code)."""
