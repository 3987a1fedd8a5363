"""BBL: nested unprivileged sandboxes. `bbld` holds the spec, the engine and the daemon."""

__version__ = "0.1.0"
