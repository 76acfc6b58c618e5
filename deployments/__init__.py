"""Ways to run the flows beyond `prefect.yaml`: serving them from one process."""
