"""Local models: the on-disk store, loaded versions, and their inference workers."""
