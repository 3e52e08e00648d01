"""Decode worker: reserves pages, receives prompt KV, runs continuous batching, streams tokens."""
