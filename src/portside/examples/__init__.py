"""Example servers built only from portside's public API."""
