"""One folder per method: config, layers or encoder, model, and the method's own algorithms."""
