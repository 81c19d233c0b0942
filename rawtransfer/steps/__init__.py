"""The per-file steps of the pipeline, one small module each, in pipeline order:
settle, check, place, pack, hashing. Each is usable and testable on its own."""
