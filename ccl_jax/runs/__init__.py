"""A run directory: its files (one writer, atomic) and the detector restored from it."""
