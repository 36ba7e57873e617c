"""Run folders: atomic saving with manifests, resumable checkpoints, and streaming blocks from and to disk."""
