"""A build: its paths, record, lock, stages and summary."""
