"""Spatial data engine: synthetic scenes, questions, traces, writers and dataset readers."""
