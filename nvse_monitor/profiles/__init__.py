"""Bundled hook profiles (TOML data)."""
