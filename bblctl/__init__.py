"""bblctl: the thin client of bbld. It imports no trio and nothing of the engine.

The commands (start, run, ps, tree, attach, exec, send-args, stop, kill, profile, desktop)
arrive with the daemon; until then `python -m bbld.engine` runs a spec without a daemon.
"""
