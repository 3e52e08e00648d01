"""Launchers: local processes on one machine (the default) and, later, Ray actors."""
