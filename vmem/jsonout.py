"""The one ``default=`` hook vmem passes to :func:`json.dump` / :func:`json.dumps`.

Reports, traces, agent replies and benchmark records hold numpy scalars (a count summed by
numpy is an ``np.int64``, not an ``int``), which :mod:`json` refuses.  :func:`json_default`
turns them into the Python number they hold; anything else unknown is written as its
``str()`` rather than failing a report at the end of a long run.  (Non-finite floats never
reach the hook: :mod:`json` writes them itself, as ``NaN``/``Infinity``.)
"""
from __future__ import annotations

__all__ = ["json_default"]


def json_default(obj):
    """``obj.item()`` for a numpy scalar, else ``str(obj)``."""
    import numpy as np  # lazily: the agent's protocol module imports this before numpy is needed

    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)
