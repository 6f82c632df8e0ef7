"""Replication across the guild: every shard's log copied at every operator."""
