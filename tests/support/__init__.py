"""Helpers for tests that run real components: ports, processes, images."""
