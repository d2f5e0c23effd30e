"""A griffe extension for the API reference: the docstrings use Sphinx roles
(:class:`Vm`, :meth:`~Vm.run`, ``double backticks``); mkdocstrings shows
Markdown, so roles become inline code (the last dotted part for ``~`` targets)
and reST's double backticks become single ones. Listed in mkdocs.yml."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|attr|data|mod|exc|obj):`(~?)([^`]+)`")
DOUBLE = re.compile(r"``([^`]+)``")


def markdown(text: str) -> str:
    text = ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    return DOUBLE.sub(r"`\1`", text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
