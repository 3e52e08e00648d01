"""Prefill worker: computes a prompt's MLA latents and first token, pushes the KV to decode."""
