"""Latency model, tuner and plan: graph + device profile in, frozen plan out. Pure Python."""
