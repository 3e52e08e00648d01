"""Kimi-K2.5 model code: the DeepSeek-V3-style text model (MLA, MoE) and, later, MoonViT."""
