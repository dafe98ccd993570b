"""Adapters that put the gradient gate inside other training frameworks."""
