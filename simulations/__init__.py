"""Simulation and comparison runners."""
