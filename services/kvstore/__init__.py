"""Tiers of shared KV blocks: process memory, then Redis, then recompute."""
