"""Adapter weights on disk: safetensors I/O, adapter loading, merge, fold, Tinker export."""
