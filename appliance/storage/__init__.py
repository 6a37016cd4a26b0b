"""Received instances: spool files, durable placement, the index, recovery and retention."""
