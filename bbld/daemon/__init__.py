"""bbld's own process (trio): the socket server, the instance registry, its channel to the
forker (forker_link) and to the monitors (registry), its log and history. It never imports
the engine: the namespace work happens in the forker and the monitors (bbld.monitors)."""
