"""Launching recipes: the command line, and calibrating a plan on real steps."""
