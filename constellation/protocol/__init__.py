"""Typed, versioned messages between services, and the signed envelope they travel in."""
