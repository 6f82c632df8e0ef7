"""A copy of shards: replication's shell (its durable state for now)."""
