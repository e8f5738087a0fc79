"""Data: official dataset readers and samplers (no learner code)."""
