"""Which classes to show by default, and how a class reads in pictures and file names."""

from __future__ import annotations

from typing import Sequence


def default_labels(num_classes: int, max_classes: int = 16) -> list[int]:
    """Every class when there are few (≤ ``max_classes``), else ``max_classes`` evenly spaced ids from the
    first class to the last."""
    k = min(max_classes, num_classes)
    return sorted({round(i * (num_classes - 1) / max(1, k - 1)) for i in range(k)})


def label_text(label: int, class_names: Sequence[str] | None = None) -> str:
    """Human-readable label: the class name when known, else ``class N``."""
    return class_names[label] if class_names else f"class {label}"
