"""The few HTML pages ingest shows people (unsubscribe, opt-in confirmation, form errors)."""

from __future__ import annotations

from html import escape

from starlette.responses import HTMLResponse

_PAGE = """<!doctype html>
<html lang="de"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;
line-height:1.5;color:#222}}button{{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}}</style>
</head><body><h1>{title}</h1>{body}</body></html>"""

_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Frame-Options": "DENY", "Content-Security-Policy":
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"}


def page(title: str, body_html: str, status: int = 200) -> HTMLResponse:
    """``body_html`` must already be escaped; ``title`` is escaped here."""
    return HTMLResponse(_PAGE.format(title=escape(title), body=body_html), status, _HEADERS)


def paragraph(text: str) -> str:
    return f"<p>{escape(text)}</p>"


def confirm_form(action: str, question: str, button: str) -> str:
    """A POST form: a GET from a link scanner must never unsubscribe or opt someone in."""
    return (f"<p>{escape(question)}</p><form method=\"post\" action=\"{escape(action)}\">"
            f"<button type=\"submit\">{escape(button)}</button></form>")


def not_found() -> HTMLResponse:
    return page("Link ungültig / Invalid link",
                paragraph("Dieser Link ist ungültig oder abgelaufen. "
                          "This link is invalid or has expired."), 404)
