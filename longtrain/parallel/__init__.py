"""Model-agnostic distributed code: process groups, collectives, attention entry point."""
