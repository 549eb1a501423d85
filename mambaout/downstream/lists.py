"""What the fine-tuning datasets share: batching samples of different sizes, and naming many files in an error."""
from __future__ import annotations

from typing import Any


def collate_lists(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """A batch of samples of different sizes: each field as the list of the samples' values."""
    return {key: [item[key] for item in items] for key in items[0]}


def preview(items: list, limit: int = 5) -> str:
    """The first ``limit`` items, and how many there are in all when that is more."""
    shown = ", ".join(str(item) for item in items[:limit])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > limit else shown
