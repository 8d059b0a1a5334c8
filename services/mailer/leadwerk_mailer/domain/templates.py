"""Email templates and their rendering (pure).

A template has one variant per locale (subject, MJML or HTML, optionally a text part), may sit
in a layout (a template of kind ``layout`` whose body holds ``{{ content }}``), and may name
dynamic blocks: variants chosen by the first matching condition on the contact (traits, score,
grade, stage, tags; the condition language of scoring rules and journeys).

Jinja2 runs sandboxed (``ImmutableSandboxedEnvironment``): a template author reaches the values
given to the template and nothing of Python. Missing values render empty, so
``{{ first_name | default('zusammen') }}`` works as marketers expect.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import css_inline
import html2text
import mjml
from jinja2 import ChainableUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import Markup
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from leadwerk_platform.conditions import Condition, all_hold

DEFAULT_LOCALE = "de"
#: Compiled templates kept at most (then the cache starts afresh).
CACHE_SIZE = 2000
#: Stencils kept at most (each holds a rendered mail, about 20 KB).
STENCILS = 500
_UNSEEN, _SEEN, _UNUSABLE = object(), object(), object()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Strict):
    """One locale of a template: the subject and the body as MJML or HTML."""

    subject: str = ""
    mjml: str | None = None
    html: str | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _one_body(self) -> Variant:
        if (self.mjml is None) == (self.html is None):
            raise ValueError("a variant has exactly one body: mjml or html")
        return self

    @property
    def body(self) -> str:
        return self.mjml if self.mjml is not None else str(self.html)


class BlockVariant(_Strict):
    when: dict[str, Condition] = Field(default_factory=dict)
    #: The content, or one per locale.
    content: str | dict[str, str]


class Template(_Strict):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str = ""
    version: int = 0
    kind: Literal["email", "layout"] = "email"
    layout: str | None = None
    #: Rewrite links to the click redirect and add the open pixel (marketing mail).
    tracking: bool = True
    locales: dict[str, Variant] = Field(min_length=1)
    blocks: dict[str, list[BlockVariant]] = Field(default_factory=dict)
    #: Sample values for previews (``POST /api/templates/{id}/preview`` without a contact).
    sample: dict[str, Any] = Field(default_factory=dict)

    def variant(self, locale: object) -> tuple[str, Variant]:
        """The variant for a contact's locale (``de-AT`` → ``de``), else the default locale,
        else the first one."""
        wanted = str(locale or "").lower().replace("_", "-")
        for candidate in (wanted, wanted.split("-")[0], DEFAULT_LOCALE):
            if candidate in self.locales:
                return candidate, self.locales[candidate]
        first = next(iter(self.locales))
        return first, self.locales[first]


@dataclass(frozen=True)
class Problem:
    location: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"location": self.location, "message": self.message}


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str
    text: str
    locale: str


class RenderError(ValueError):
    """A template that cannot be rendered for this contact (a bug in the template)."""


class Renderer:
    """Compiles templates once (cached by source) and renders them for a contact."""

    def __init__(self) -> None:
        self._html = ImmutableSandboxedEnvironment(autoescape=True, undefined=ChainableUndefined)
        self._plain = ImmutableSandboxedEnvironment(autoescape=False,
                                                    undefined=ChainableUndefined)
        self._cache: dict[tuple[bool, str], Any] = {}
        # Keep <style> (MJML's media queries make it responsive); never fetch remote CSS.
        self._inliner = css_inline.CSSInliner(keep_style_tags=True,
                                              load_remote_stylesheets=False)
        self._text = html2text.HTML2Text()
        self._text.body_width = 0
        self._text.ignore_images = True
        self._text.ignore_tables = True  # MJML lays out with tables: keep only their text
        #: Per stencil: seen once, unusable, or the pipeline's output for it.
        self._stencils: dict[tuple[bool, bool, str], tuple[str, str] | object] = {}
        self._marks = Marks()

    def _compiled(self, source: str, *, escape: bool) -> Any:
        key = (escape, source)
        if key not in self._cache:
            if len(self._cache) > CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = (self._html if escape else self._plain).from_string(source)
        return self._cache[key]

    def _render(self, source: str, context: Mapping[str, Any], *, escape: bool) -> str:
        try:
            return str(self._compiled(source, escape=escape).render(context))
        except TemplateError as error:  # SecurityError is one: the sandbox said no
            raise RenderError(f"{type(error).__name__}: {error}") from error

    def render(self, template: Template, layout: Template | None,
               context: Mapping[str, Any]) -> Rendered:
        """Subject, HTML (MJML compiled, CSS inlined) and text for ``context`` (the contact's
        traits and values, plus links such as ``unsubscribe_url``)."""
        locale, variant = template.variant(context.get("locale") or context.get("language"))
        values = dict(context)  # sample values are for previews only, never real mail
        values["locale"] = locale
        values["blocks"] = self._blocks(template, locale, values)
        subject = " ".join(self._render(variant.subject, values, escape=False).split())
        body = self._render(variant.body, values, escape=True)
        if layout is not None:
            _, frame = layout.variant(locale)
            if (frame.mjml is None) != (variant.mjml is None):
                raise RenderError(f"layout {layout.id} and template {template.id} "
                                  "must both be MJML or both HTML")
            # ``body`` is the autoescaped output of the template: safe to place as markup.
            content = Markup(body)  # noqa: S704
            body = self._render(frame.body, {**values, "content": content}, escape=True)
        derive_text = variant.text is None
        html, text = self._finish(body, context, mjml=variant.mjml is not None,
                                  derive_text=derive_text)
        if not derive_text:
            text = self._render(str(variant.text), values, escape=False)
        return Rendered(subject, html, text, locale)

    def _pipeline(self, body: str, *, mjml_body: bool, derive_text: bool) -> tuple[str, str]:
        """MJML (if it is), CSS inlined, and the text part derived from the HTML."""
        html = body
        if mjml_body:
            try:
                # No web fonts: a Google Fonts import would tell Google who opened the mail.
                html = mjml.mjml2html(body, fonts={}, disable_comments=True)
            except Exception as error:
                raise RenderError(f"MJML: {error}") from error
        html = self._inliner.inline(html)
        return html, self._text.handle(html).strip() if derive_text else ""

    def _finish(self, body: str, context: Mapping[str, Any], *, mjml: bool,
                derive_text: bool) -> tuple[str, str]:
        """:meth:`_pipeline` for a rendered body, through a stencil where one is known.

        Most of a personalised mail is the same for every contact: the rendered body differs
        only where a personal value (a name, an address, a link) stands. The stencil is the
        body with each such value replaced by a marker; the pipeline's output for the stencil,
        with the values put back, is the output for the body, because MJML, the CSS inliner and
        the text conversion copy such text as it is (:func:`stencil` says which values and
        places qualify). That is checked, not assumed: the second time a stencil is seen (a
        shape that occurs once is not worth the work), both the body and the stencil go
        through the pipeline, and the stencil's output is kept only if the two agree;
        otherwise the stencil is remembered as unusable and such bodies take the pipeline."""
        found = stencil(body, _personal_values(context), self._marks)
        if found is None:
            return self._pipeline(body, mjml_body=mjml, derive_text=derive_text)
        shape, values = found
        key = (mjml, derive_text, shape)
        cached = self._stencils.get(key, _UNSEEN)
        if isinstance(cached, tuple):
            return self._marks.fill(cached[0], values), self._marks.fill(cached[1], values)
        result = self._pipeline(body, mjml_body=mjml, derive_text=derive_text)
        if cached is _UNSEEN:
            outcome: tuple[str, str] | object = _SEEN
        elif cached is _SEEN:
            try:
                output = self._pipeline(shape, mjml_body=mjml, derive_text=derive_text)
            except RenderError:
                output = ("", "")
            agrees = (self._marks.fill(output[0], values),
                      self._marks.fill(output[1], values)) == result
            outcome = output if agrees else _UNUSABLE
        else:
            return result
        if len(self._stencils) >= STENCILS:
            self._stencils.clear()
        self._stencils[key] = outcome
        return result

    def _blocks(self, template: Template, locale: str,
                values: Mapping[str, Any]) -> dict[str, Markup]:
        chosen: dict[str, Markup] = {}
        for name, variants in template.blocks.items():
            for option in variants:
                if all_hold(option.when, values):
                    content = option.content if isinstance(option.content, str) else \
                        option.content.get(locale, next(iter(option.content.values()), ""))
                    html = self._render(content, values, escape=True)  # autoescaped
                    chosen[name] = Markup(html)  # noqa: S704
                    break
            else:
                chosen[name] = Markup("")
        return chosen

    def check(self, template: Template, layouts: Mapping[str, Template]) -> list[Problem]:
        """Every part compiles, the layout exists and matches, a sample render works."""
        problems: list[Problem] = []
        parts = [(f"locales.{loc}.{field}", getattr(variant, field))
                 for loc, variant in template.locales.items()
                 for field in ("subject", "mjml", "html", "text")
                 if getattr(variant, field) is not None]
        parts += [(f"blocks.{name}.{i}.content", text)
                  for name, variants in template.blocks.items()
                  for i, option in enumerate(variants)
                  for text in ([option.content] if isinstance(option.content, str)
                               else option.content.values())]
        for location, source in parts:
            try:
                self._compiled(source, escape=True)
            except TemplateError as error:
                problems.append(Problem(location, f"template syntax: {error}"))
        layout = None
        if template.layout is not None:
            layout = layouts.get(template.layout)
            if layout is None or layout.kind != "layout":
                problems.append(Problem("layout", f"no layout {template.layout!r}"))
        if template.kind == "layout" and not any("content" in v.body
                                                 for v in template.locales.values()):
            problems.append(Problem("locales", "a layout places {{ content }}"))
        if problems or template.kind == "layout":
            return problems
        for locale in template.locales:
            try:
                self.render(template, layout, {**template.sample, "locale": locale})
            except RenderError as error:
                problems.append(Problem(f"locales.{locale}", str(error)))
        return problems


#: A personal value that may be stencilled in text: a word starting with a letter, then words
#: of letters and digits joined by single spaces, dots, commas, hyphens or @. No step of the
#: pipeline escapes or interprets such text (Markdown escapes in the text part need a digit,
#: ``-``, ``+`` or a backslash at the start, HTML needs ``&<>"'``).
_PLAIN = re.compile(r"[^\W\d_][^\W_]*(?:[ .,@-][^\W_]+)*")
#: A personal value that may be stencilled as a whole link target (``href``, ``src``).
_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#@!$+,;=%-]+")
_PIECES = re.compile(r"(<[^>]*>)")
_LINK_TARGET = re.compile(r"""(\s(?:href|src)\s*=\s*)(["'])([^"'<>]*)\2""", re.IGNORECASE)
#: Elements whose text is not text (CSS, scripts): never stencilled.
_RAW = re.compile(r"<(/?)(mj-style|style|script)\b", re.IGNORECASE)
_MIN_VALUE = 3
_MAX_VALUES = 50


def _personal_values(context: Mapping[str, Any]) -> Iterator[str]:
    """The strings (and integers) among the values given to a template, nested ones too."""
    stack: list[Any] = [context]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, str):
            yield item
        elif isinstance(item, int) and not isinstance(item, bool):
            yield str(item)


class Marks:
    """Markers ``lw<nonce>m<number>z``: ASCII letters and digits (MJML escapes other characters
    in attributes), with a random nonce so that no template text contains one by chance."""

    def __init__(self) -> None:
        self.prefix = f"lw{secrets.token_hex(8)}m"
        self._pattern = re.compile(re.escape(self.prefix) + r"(\d+)z")

    def renumber(self, shape: str, values: list[str]) -> tuple[str, list[str]] | None:
        """The markers of ``shape`` numbered in order of appearance, and the values in that
        order; ``None`` without any marker."""
        order: list[str] = []
        seen: dict[int, int] = {}

        def number(match: re.Match[str]) -> str:
            first = int(match[1])
            if first not in seen:
                seen[first] = len(order)
                order.append(values[first])
            return f"{self.prefix}{seen[first]}z"

        renumbered = self._pattern.sub(number, shape)
        return (renumbered, order) if order else None

    def fill(self, shape: str, values: list[str]) -> str:
        """A stencil's output with the values back in place of their markers."""
        return self._pattern.sub(lambda m: values[int(m[1])], shape) \
            if self.prefix in shape else shape


def stencil(body: str, candidates: Iterator[str],
            marks: Marks) -> tuple[str, list[str]] | None:
    """``body`` with every qualifying personal value replaced by a marker, and the values in
    marker order; ``None`` when nothing qualifies. Plain values are replaced in text only (not
    inside tags, nor in ``<style>`` or ``<mj-style>``) and only as whole words; link values
    only as the whole target of an ``href`` or ``src``. Markers are numbered in the order they
    appear, so bodies of the same shape give the same stencil whatever the values."""
    plain, links = set(), set()
    for value in candidates:
        if len(value) < _MIN_VALUE or value not in body:  # most traits are not in the mail
            continue
        if _PLAIN.fullmatch(value):
            plain.add(value)
        elif _URL.fullmatch(value):
            links.add(value)
    if (not plain and not links) or len(plain) + len(links) > _MAX_VALUES:
        return None
    words = sorted(plain, key=lambda v: (-len(v), v))  # a longer value before its parts
    values = [*words, *sorted(links)]
    number = {value: index for index, value in enumerate(values)}

    def link(match: re.Match[str]) -> str:
        head, quote, target = match.groups()
        return f"{head}{quote}{marks.prefix}{number[target]}z{quote}" if target in links \
            else match[0]

    pieces = _PIECES.split(body)
    raw = False
    for index, piece in enumerate(pieces):
        if index % 2:  # a tag
            opening = _RAW.match(piece)
            if opening:
                raw = not opening[1]
            elif links:
                pieces[index] = _LINK_TARGET.sub(link, piece)
        elif words and not raw and piece:
            text = piece
            for value in words:
                if value in text:
                    text = _mark_word(text, value, f"{marks.prefix}{number[value]}z")
            pieces[index] = text
    return marks.renumber("".join(pieces), values)


def _mark_word(text: str, value: str, marker: str) -> str:
    """``value`` replaced by ``marker`` where it stands as a whole word: not inside a word,
    not as an entity's name (``&amp;``) or number."""
    out, start, at = [], 0, text.find(value)
    while at >= 0:
        end = at + len(value)
        before, after = text[at - 1:at], text[end:end + 1]
        if not (before and (before.isalnum() or before in "_&#")) \
                and not (after and (after.isalnum() or after in "_;")):
            out += [text[start:at], marker]
            start = end
        at = text.find(value, at + 1)
    return "".join([*out, text[start:]]) if out else text


def parse(document: Mapping[str, Any]) -> tuple[Template | None, list[Problem]]:
    try:
        return Template.model_validate(document), []
    except ValidationError as error:
        return None, [Problem(".".join(str(p) for p in e["loc"]) or "(document)", e["msg"])
                      for e in error.errors()]
