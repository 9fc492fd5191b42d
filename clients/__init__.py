"""Flower ClientApp for fedse."""
