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

from collections.abc import Mapping
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

    def _compiled(self, source: str, *, escape: bool) -> Any:
        key = (escape, source)
        if key not in self._cache:
            if len(self._cache) > 2000:
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
        html = body
        if variant.mjml is not None:
            try:
                # No web fonts: a Google Fonts import would tell Google who opened the mail.
                html = mjml.mjml2html(body, fonts={}, disable_comments=True)
            except Exception as error:
                raise RenderError(f"MJML: {error}") from error
        html = self._inliner.inline(html)
        text = self._render(variant.text, values, escape=False) if variant.text is not None \
            else self._text.handle(html).strip()
        return Rendered(subject, html, text, locale)

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


def parse(document: Mapping[str, Any]) -> tuple[Template | None, list[Problem]]:
    try:
        return Template.model_validate(document), []
    except ValidationError as error:
        return None, [Problem(".".join(str(p) for p in e["loc"]) or "(document)", e["msg"])
                      for e in error.errors()]
