"""Checkpoint names, storage locations and checkpoint files. Imports neither Ray nor the model."""
