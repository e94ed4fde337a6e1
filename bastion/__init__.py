"""Bastion: a reverse proxy and API gateway written in Python."""

__version__ = "0.1.0"
