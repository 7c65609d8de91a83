"""Stateless SYN proxy with a shared rolling-salt cookie."""

__version__ = "0.1.0"
