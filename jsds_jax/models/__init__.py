"""Flax Linen modules: frozen towers, the trained tail, CMC; weight converters."""
