"""bblctl: the thin client of bbld. It imports no trio and nothing of the engine.

`bblctl.client` connects to bbld (starting it when nothing listens) and makes Varlink calls.
The commands (start, run, ps, tree, attach, exec, send-args, stop, kill, profile, desktop)
arrive with the daemon's instance methods; until then `python -m bbld.engine` runs a spec
without a daemon.
"""
