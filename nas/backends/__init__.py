"""Search backends: thin drivers around :func:`nas.pipeline.evaluate`."""
