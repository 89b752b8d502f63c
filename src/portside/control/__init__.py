"""The control socket: a small versioned JSON protocol to pause, resume, stop and inspect."""
