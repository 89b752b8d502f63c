"""Sans-IO protocol code: pure functions of bytes, tested without sockets."""
