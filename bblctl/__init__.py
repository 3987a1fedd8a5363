"""bblctl: the thin client of bbld. It imports no trio, no msgspec and nothing of the engine
(bblctl.client speaks Varlink with the standard library); see bblctl.__main__ for the commands.
"""
