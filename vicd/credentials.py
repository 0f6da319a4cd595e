"""Credentials for the services plugins talk to (vCenter, NSX Manager).

One rule everywhere: given values first, then two environment variables,
then a file (``user:password`` on one line, or user and password on two).
The caller keeps them out of every message it builds.
"""

from __future__ import annotations

import os
from pathlib import Path

from vicd.errors import InvalidParameter


def load_credentials(label: str, user: str, password: str, env_prefix: str,
                     credentials_file: str, sources: str) -> tuple[str, str]:
    """``(user, password)``; ``label`` names the plugin in errors (``vsphere``, ``nsx``),
    ``sources`` says where the credentials may come from when none are found."""
    user = user or os.environ.get(f"{env_prefix}_USER", "")
    password = password or os.environ.get(f"{env_prefix}_PASSWORD", "")
    if (not user or not password) and credentials_file:
        try:
            lines = Path(credentials_file).read_text().splitlines()
        except OSError as e:
            raise InvalidParameter(f"{label}: cannot read credentials_file {credentials_file}: "
                                   f"{e.strerror}") from None
        if len(lines) == 1 and ":" in lines[0]:
            u, _, p = lines[0].partition(":")
        else:
            u, p = (lines + ["", ""])[:2]
        user, password = user or u.strip(), password or p.strip()
    if not user or not password:
        raise InvalidParameter(f"{label}: no credentials ({sources})")
    return user, password
