"""`vptq generate` and `vptq chat`: text from an original or quantized model (issue 9).

`register(app)` attaches the commands to the main Typer app.
"""

from __future__ import annotations

import typer


def register(main_app: typer.Typer) -> None:
    """Attach `generate` and `chat` to the main app (filled in by the generation work)."""
