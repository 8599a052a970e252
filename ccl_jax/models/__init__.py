"""Flax modules for every network, forward nets and their feedback twins."""
