"""Installing signed model bundles: the persisted state machine, atomic swap and rollback."""
