"""The modality worklist and MPPS: their store, the MPPS rules and daily housekeeping."""
