"""nas: compression-aware neural architecture search."""
