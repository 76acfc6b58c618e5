"""Constitutions, the prompts built from them, and the shipped personas."""
