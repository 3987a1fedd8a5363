"""bbld, the per-user daemon (trio): the socket server and, later, the instance registry."""
