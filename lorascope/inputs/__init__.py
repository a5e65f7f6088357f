"""Inputs to planning: dataset counting and synthetic tasks with known information content."""
