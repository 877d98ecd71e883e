"""`typhon improve ...` commands (registered on `typhon.cli.improve_app`); heavy imports happen
inside the commands so that `typhon --help` stays fast."""

from __future__ import annotations
