"""Evaluation: inputs, models, persona metrics, judges, revealed preferences, report."""
