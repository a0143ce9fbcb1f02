"""The Hub side of a run: model cards (render, update after evaluation) and pushing folders (docs/hub.md)."""
