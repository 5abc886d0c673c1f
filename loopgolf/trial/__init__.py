"""One configuration, end to end: data, model, artifact, training. Knows nothing of Ray."""
