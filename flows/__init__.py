"""Prefect flows: each reads as the list of the pipeline's stages."""
