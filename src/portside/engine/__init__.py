"""The only code in portside that touches sockets and readiness events."""
