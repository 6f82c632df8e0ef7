"""Services: thin shells (NATS, HTTP, storage) around the pure core in ``constellation``."""
