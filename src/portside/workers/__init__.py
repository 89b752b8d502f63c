"""Several worker processes serving the same listening sockets, under one supervisor."""
