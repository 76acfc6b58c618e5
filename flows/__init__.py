"""Prefect flows: each validates its config, locks the build and runs the plan (character.build.plan)
with the Prefect tasks."""
