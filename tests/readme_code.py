"""The README's code blocks, for the tests that run them (so the README cannot drift from the
library)."""
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_block_after(marker: str) -> str:
    """The first fenced ```python block after the line that starts with ``marker``."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    start = text.index("\n" + marker)
    m = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    if m is None:
        raise ValueError(f"README.md: no python block after {marker!r}")
    return m.group(1)
