"""Partition workers: routing, two-phase commit, packages, blocks, the block log."""
