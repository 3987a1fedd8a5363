"""Network namespace set-up: a new net namespace starts with `lo` down; bring it up."""

from bbld.engine.errors import StartError


def preload() -> None:
    """Import pyroute2 once in the engine's caller, so forked layers share it."""
    try:
        import pyroute2  # noqa: F401  (slow to import: about 0.15 s)
    except ImportError as exc:
        raise StartError(f"net namespaces need pyroute2, which does not import: {exc}") \
            from None


def bring_up_loopback() -> None:
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=index, state="up")
    except Exception as exc:  # pyroute2 raises its own NetlinkError types
        raise StartError(f"bringing up the loopback interface: {exc}") from None
