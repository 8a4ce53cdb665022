"""Optimizer, learning-rate schedules and losses."""
