"""Not built yet: see services/README.md."""
