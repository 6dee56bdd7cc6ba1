"""The gateway's self-contained HTML pages (/status, /account): one file each of page, style and script.

The files live in producers/gateway/static/ and are read once. The style and the script are inlined into the page
(one request, no asset routes) and the Content-Security-Policy admits exactly those two texts by their sha256:
an injected script or style would not run, and data comes from this origin only. The scripts build everything
with textContent/createElement, because wallets, versions, device names and request ids come from others.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi.responses import HTMLResponse


def _static(name: str) -> str:
    return resources.files("producers.gateway").joinpath("static", name).read_text(encoding="utf-8")


def csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def inline(template: str, **parts: str) -> str:
    """The template with each {{name}} replaced by its text (each placeholder must be there exactly once)."""
    for name, text in parts.items():
        placeholder = "{{" + name + "}}"
        if template.count(placeholder) != 1:
            raise ValueError(f"the page must contain {placeholder} exactly once")
        template = template.replace(placeholder, text)
    return template


@dataclass(frozen=True)
class Page:
    html: str
    csp: str

    @classmethod
    def load(cls, name: str) -> Page:
        """static/<name>.html with <name>.css and <name>.js inlined, and the CSP that admits only those."""
        style, script = _static(f"{name}.css"), _static(f"{name}.js")
        html = inline(_static(f"{name}.html"), **{f"{name}.css": style, f"{name}.js": script})
        csp = (f"default-src 'none'; script-src {csp_hash(script)}; style-src {csp_hash(style)}; "
               "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return cls(html, csp)

    def response(self, *, no_store: bool = False) -> HTMLResponse:
        headers = {"Content-Security-Policy": self.csp, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer"}
        if no_store:
            headers["Cache-Control"] = "no-store"
        return HTMLResponse(self.html, headers=headers)
