"""mkdocs hooks (listed in mkdocs.yml; excluded from the site).

* Fences whose info string is ``python tltorch`` render as Python: Python-Markdown reads
  one word after a fence, and tests/test_docs.py uses the second to know which blocks need
  tltorch.
* The docstrings use Sphinx roles (``:func:`x```); mkdocstrings renders them as the role
  name followed by code, so the role name is dropped and ``~a.b.c`` shortened to ``c``.
"""

from __future__ import annotations

import re

_TLTORCH_FENCE = re.compile(r"^(\s*```)python tltorch[ \t]*$", flags=re.M)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _shorten(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"<code>{target.rsplit('.', 1)[-1] if tilde else target}</code>"


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    return _TLTORCH_FENCE.sub(r"\1python", markdown)


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(_shorten, html)
