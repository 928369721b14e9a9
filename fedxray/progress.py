"""Progress bars as plain text (tqdm's own, not its notebook widget): an executed notebook
(papermill, nbconvert) keeps each bar's last state, where a widget leaves a "0%" placeholder
line per bar. One bar per run; inner steps go in its postfix or in bars that do not stay."""
from __future__ import annotations

import sys
from typing import Iterable, Optional


def bar(iterable: Optional[Iterable] = None, *, desc: str, enabled: bool = True, leave: bool = True, **kw):
    """A tqdm text bar on stdout, updated at most once a second."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=not enabled, leave=leave, file=sys.stdout, mininterval=1.0,
                ncols=110, **kw)
