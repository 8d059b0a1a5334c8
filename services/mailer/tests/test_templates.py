"""Templates: personalisation, dynamic blocks, locales, layouts, MJML, the sandbox, the shipped
templates; tracked links; the send-time policy (pure, no I/O). Message bytes and DKIM:
test_message.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leadwerk_mailer.domain.message import add_pixel, track_links
from leadwerk_mailer.domain.policy import refusal
from leadwerk_mailer.domain.templates import Renderer, RenderError, Template, parse
from leadwerk_mailer.templates import shipped_templates
from leadwerk_platform.settings import repository_root

NOW = datetime(2026, 11, 21, 10, tzinfo=UTC)


def template(**fields: Any) -> Template:
    return Template.model_validate({"id": "t", **fields})


def test_personalisation_with_defaults_escapes_html_but_not_the_subject() -> None:
    t = template(locales={"de": {
        "subject": "Hallo {{ first_name | default('zusammen') }} & Co",
        "html": "<p>Hallo {{ first_name | default('zusammen') }}, {{ company.name }}</p>"}})
    renderer = Renderer()
    anna = renderer.render(t, None, {"first_name": "<Anna>", "company": {"name": "A&B"}})
    assert anna.subject == "Hallo <Anna> & Co"
    assert "Hallo &lt;Anna&gt;, A&amp;B" in anna.html
    nobody = renderer.render(t, None, {})
    assert nobody.subject == "Hallo zusammen & Co"
    assert "Hallo zusammen, </p>" in nobody.html  # a missing value renders empty
    assert nobody.text.startswith("Hallo zusammen")  # text part derived from the HTML


@pytest.mark.parametrize(("values", "expected"), [
    ({"grade": "A", "locale": "en-GB"}, "demo for you"),
    ({"grade": "C", "tags": ["webinar"], "locale": "en"}, "see you at the webinar"),
    ({"grade": "C", "locale": "de-AT"}, "Standard"),
    ({"stage": "mql"}, "Standard"),
])
def test_dynamic_blocks_take_the_first_matching_variant_in_the_locale(
        values: dict[str, Any], expected: str) -> None:
    t = template(locales={"de": {"html": "<p>{{ blocks.offer }}</p>"},
                          "en": {"html": "<p>{{ blocks.offer }}</p>"}},
                 blocks={"offer": [
                     {"when": {"grade": "A"}, "content": {"de": "Demo", "en": "demo for you"}},
                     {"when": {"tags": {"contains": "webinar"}},
                      "content": {"de": "Bis zum Webinar", "en": "see you at the webinar"}},
                     {"content": "Standard"}]})
    assert expected in Renderer().render(t, None, values).html


def test_locale_variants_fall_back_to_german_then_the_first() -> None:
    t = template(locales={"en": {"subject": "Hello", "html": "x"},
                          "de": {"subject": "Hallo", "html": "x"}})
    renderer = Renderer()
    assert renderer.render(t, None, {"locale": "en-US"}).subject == "Hello"
    assert renderer.render(t, None, {"locale": "fr"}).subject == "Hallo"
    only_english = template(locales={"en": {"subject": "Hello", "html": "x"}})
    assert renderer.render(only_english, None, {"locale": "fr"}).locale == "en"


def test_mjml_in_a_layout_becomes_responsive_html_with_inlined_css_and_no_web_fonts() -> None:
    layout = template(id="frame", kind="layout", locales={"de": {"mjml": (
        "<mjml><mj-head><mj-style inline=\"inline\">.hi { color: #ff0000; }</mj-style></mj-head>"
        "<mj-body>{{ content }}</mj-body></mjml>")}})
    t = template(layout="frame", locales={"de": {"subject": "s", "mjml": (
        "<mj-section><mj-column><mj-text css-class=\"hi\">Hallo {{ first_name }}</mj-text>"
        "</mj-column></mj-section>")}})
    out = Renderer().render(t, layout, {"first_name": "Anna"})
    assert "Hallo Anna" in out.html
    assert "@media" in out.html  # MJML's responsive rules kept in <style>
    assert "color: #ff0000" in out.html.replace("color:#ff0000", "color: #ff0000")
    assert "googleapis" not in out.html
    assert out.text == "Hallo Anna"


def test_the_sandbox_keeps_templates_away_from_python_internals() -> None:
    renderer = Renderer()
    for attempt in ("{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}",
                    "{{ first_name.__class__ }}", "{{ self.__init__ }}"):
        out = renderer.render(template(locales={"de": {"html": f"<p>[{attempt}]</p>"}}), None,
                              {"first_name": "Anna"})
        assert "[]" in out.html, (attempt, out.html)
    with pytest.raises(RenderError, match=r"^SecurityError: .* is unsafe"):
        renderer.render(template(locales={"de": {"html": "{{ x.mro() }}"}}), None, {"x": str})


def test_validation_names_every_problem_with_its_location() -> None:
    renderer = Renderer()
    broken = template(layout="missing", locales={"de": {"subject": "{{ oops", "html": "x"}})
    problems = {p.location: p.message for p in renderer.check(broken, {})}
    assert problems["locales.de.subject"].startswith("template syntax")
    assert problems["layout"] == "no layout 'missing'"
    _, problems_ = parse({"id": "Bad Id", "locales": {"de": {"html": "x", "mjml": "y"}}})
    assert {p.location for p in problems_} == {"id", "locales.de"}


def test_the_shipped_templates_render_in_german_and_english() -> None:
    shipped = [Template.model_validate(d) for _, d in
               shipped_templates(repository_root() / "config" / "templates")]
    layouts = {t.id: t for t in shipped if t.kind == "layout"}
    ids = {t.id for t in shipped}
    assert ids >= {"welcome", "welcome-follow-up", "whitepaper-info", "event-invitation",
                   "event-invitation-reminder", "mql-alert", "sla-breach", "wake-up",
                   "trial-ending", "optin-confirmation", "default"}
    renderer = Renderer()
    for t in shipped:
        assert renderer.check(t, layouts) == [], t.id
    welcome = next(t for t in shipped if t.id == "welcome")
    out = renderer.render(welcome, layouts["default"], {
        "first_name": "Anna", "grade": "A", "owner": "anna.berger@example.de",
        "unsubscribe_url": "https://in.example/t/u/tok"})
    assert out.subject == "Willkommen, Anna!"
    assert "persönliche Demo" in out.html
    assert "https://in.example/t/u/tok" in out.html


def test_links_are_tracked_except_marked_ones_and_a_pixel_is_added() -> None:
    html = ('<html><body><a href="https://x.de/a?b=1&amp;c=2">x</a> '
            '<a class="btn" href=\'http://y.de\'>y</a> <a href="mailto:z@x.de">z</a> '
            '<a href="https://u.example/t/u/tok" data-lw-notrack>abmelden</a></body></html>')
    seen: list[tuple[str, int]] = []

    def tracked(url: str, index: int) -> str:
        seen.append((url, index))
        return f"https://t.example/c/{index}"

    rewritten, count = track_links(html, tracked)
    assert count == 2
    assert seen == [("https://x.de/a?b=1&c=2", 1), ("http://y.de", 2)]
    assert 'href="https://t.example/c/1"' in rewritten
    assert "href='https://t.example/c/2'" in rewritten
    assert 'href="mailto:z@x.de"' in rewritten
    assert 'href="https://u.example/t/u/tok" data-lw-notrack' in rewritten
    assert add_pixel(rewritten, "https://t.example/o/1").endswith(
        '<img src="https://t.example/o/1" width="1" height="1" alt="" '
        'style="display:block;border:0;width:1px;height:1px" /></body></html>')


@pytest.mark.parametrize(("command", "suppression", "consent", "expected"), [
    ({"class": "marketing", "to": "a@x.de"}, None, "confirmed", None),
    ({"class": "marketing", "to": "a@x.de"}, None, "granted", None),
    ({"class": "marketing", "to": "a@x.de"}, None, None, "no_consent"),
    ({"class": "marketing", "to": "a@x.de"}, None, "pending", "consent_pending"),
    ({"class": "marketing", "to": "a@x.de"}, None, "withdrawn", "no_consent"),
    ({"class": "marketing", "to": "a@x.de"}, "unsubscribed", "confirmed", "unsubscribed"),
    ({"class": "transactional", "to": "a@x.de"}, "unsubscribed", None, None),
    ({"class": "transactional", "to": "a@x.de"}, "hard_bounce", None, "hard_bounce"),
    ({"class": "internal", "to": "rep@x.de"}, None, None, None),
    ({"class": "marketing", "to": None}, None, "confirmed", "no_address"),
    ({"class": "marketing", "to": "a@x.de", "not_after": "2026-11-21T09:00:00+00:00"},
     None, "confirmed", "expired"),
])
def test_the_send_time_policy(command: dict[str, Any], suppression: str | None,
                              consent: str | None, expected: str | None) -> None:
    assert refusal(command, NOW, suppression=suppression, consent=consent,
                   require_consent=True) == expected


def render_fresh(t: Template, layout: Template | None, values: dict[str, Any]) -> Any:
    """Through the whole pipeline: a renderer that has never seen a stencil."""
    return Renderer().render(t, layout, values)


def test_stencils_give_exactly_what_the_whole_pipeline_gives() -> None:
    shipped = {t.id: t for t in (Template.model_validate(d) for _, d in shipped_templates(
        repository_root() / "config" / "templates"))}
    renderer = Renderer()
    people = [{"first_name": f"Anna {n}", "grade": "AB"[n % 2], "owner": f"rep{n}@example.de",
               "unsubscribe_url": f"https://in.example/t/u/eyJ3Ijo{n}.aGFsbG8.s-_{n}"}
              for n in range(8)]
    people += [{"first_name": "O'Brien & <Söhne>", "grade": "A"},  # escaped: not stencilled
               {"first_name": "12. Mai", "owner": "- x"},  # Markdown-sensitive in the text
               {"first_name": "Zoë-Marie van der Berg", "grade": "B", "company_name": "ACME"}]
    for values in people:
        for template_id in ("welcome", "event-invitation", "optin-confirmation"):
            t = shipped[template_id]
            layout = shipped[t.layout] if t.layout else None
            assert renderer.render(t, layout, values) == render_fresh(t, layout, values), (
                template_id, values)
    usable = [v for v in renderer._stencils.values() if isinstance(v, tuple)]
    assert usable  # the welcome mail's shape was seen often enough to be kept


def test_a_stencil_that_the_pipeline_would_treat_differently_is_not_used() -> None:
    # A link whose text is its own target: the text part writes such a link as <url> only
    # when the target looks like a URL, which a marker does not. Found out, never used.
    t = template(locales={"de": {"subject": "s", "html": (
        '<p>Hallo {{ name }}: <a href="{{ link }}">{{ link }}</a></p>')}})
    renderer = Renderer()
    for n in range(5):
        values = {"name": f"Anna {n}", "link": f"https://x.example/{n}"}
        out = renderer.render(t, None, values)
        assert out == render_fresh(t, None, values)
        assert f"<https://x.example/{n}>" in out.text
    assert not [v for v in renderer._stencils.values() if isinstance(v, tuple)]


def test_values_in_attributes_other_than_link_targets_are_left_alone() -> None:
    t = template(locales={"de": {"subject": "s", "mjml": (
        '<mjml><mj-body><mj-section padding="{{ pad }}"><mj-column><mj-text color="{{ colour }}">'
        "Hallo {{ name }}</mj-text></mj-column></mj-section></mj-body></mjml>")}})
    renderer = Renderer()
    for n, (pad, colour) in enumerate([("10px", "red"), ("20px", "blue"), ("10px", "green"),
                                       ("30px", "red"), ("10px", "red")]):
        values = {"name": f"Anna {n}", "pad": pad, "colour": colour}
        assert renderer.render(t, None, values) == render_fresh(t, None, values)


WORDS = st.text(st.sampled_from("AaZzÄöß019 .,@-_&<'#;\\*+"), min_size=0, max_size=14)
SHIPPED = {t.id: t for t in (Template.model_validate(d) for _, d in shipped_templates(
    repository_root() / "config" / "templates"))}
WARM = Renderer()


@settings(max_examples=80, deadline=None)
@given(first_name=WORDS, owner=WORDS, company=WORDS, grade=st.sampled_from(["A", "B"]))
def test_any_values_render_as_the_whole_pipeline_renders_them(first_name: str, owner: str,
                                                              company: str, grade: str) -> None:
    """Values that qualify for a stencil and values that do not, through a renderer that has
    kept stencils from earlier examples: always what a fresh renderer gives."""
    values = {"first_name": first_name, "owner": owner, "company_name": company, "grade": grade,
              "unsubscribe_url": f"https://in.example/t/u/{first_name.encode().hex()}x"}
    t = SHIPPED["welcome"]
    for _ in range(3):  # seen, checked, used
        assert WARM.render(t, SHIPPED["default"], values) == render_fresh(
            t, SHIPPED["default"], values)
