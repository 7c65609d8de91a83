"""Stateless SYN proxy with a shared rolling-salt cookie (version: pyproject.toml, `synproxy --version`)."""
