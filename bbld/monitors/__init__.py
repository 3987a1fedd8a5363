"""The forker and the monitors: synchronous processes forked from one interpreter with the
engine imported (bbld.monitors.forker), one monitor per instance (bbld.monitors.monitor) with
its control socket (bbld.monitors.control). They import the engine, never trio."""
