"""Placeholder replaced below."""
def add_args(p): pass
def add_eval_args(p): pass
