"""Object models, the store, and the metadata sources that feed it: files, kube, cache."""
