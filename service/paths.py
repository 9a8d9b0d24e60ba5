"""Server paths never reach a tenant: what every message leaving the service is passed through.

Loaders name files by their display name already; this is the safety net behind them, shared by the API
(its error handlers) and the worker (a job's error and warnings), so a message from deep inside the
library (a data folder, a scratch file, the code's own location in a traceback) is cut to the file name.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.settings import REPO_ROOT, Settings


def server_roots(settings: Settings) -> list[str]:
    """Folders whose paths a tenant must never see: scratch, state, data and the code itself."""
    roots = [settings.var_dir, settings.work_dir, settings.upload_dir, settings.data_root, REPO_ROOT]
    paths = [Path(p) for p in roots if p is not None]
    found = {str(p) for p in paths} | {str(p.resolve()) for p in paths}
    return sorted((r for r in found if r not in ("", "/")), key=len, reverse=True)


def scrub_paths(text: str, roots: list[str]) -> str:
    """``text`` with every path under ``roots`` replaced by its last component (the user's filename for
    an upload): a safety net behind loaders that already name files by their display name."""
    for root in roots:
        pattern = re.escape(root.rstrip("/")) + r"(?:/[^\s'\"`,;:()\[\]{}<>]*)?"
        text = re.sub(pattern, lambda m: Path(m.group(0)).name or "<server path>", text)
    return text
