"""Flower ServerApp for fedse."""
