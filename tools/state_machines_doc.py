"""Write the generated part of docs/state-machines.md from the tables in ``deckard.model.states``.

Run ``python tools/state_machines_doc.py`` after changing a table; ``tests/unit/test_model.py`` fails while the
file is out of date.  The prose around the markers is kept as written.
"""

from __future__ import annotations

from pathlib import Path

from deckard.model.states import render_doc

DOC = Path(__file__).resolve().parent.parent / "docs" / "state-machines.md"


def main() -> None:
    current = DOC.read_text()
    updated = render_doc(current)
    if updated != current:
        DOC.write_text(updated)
        print(f"updated {DOC}")


if __name__ == "__main__":
    main()
