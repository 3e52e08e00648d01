"""Vision worker: MoonViT image encoding with an embedding cache keyed by image content hash."""
