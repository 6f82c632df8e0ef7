"""The indexer: the history index in PostgreSQL, which follows the workers' logs."""
