"""Prefect flows over the DiffColor engine: collection runs, reprocessing, the device pool."""
