"""The web console in a real browser (headless Chromium) over ``convlog demo --web``.

One demo stack for the module: the rules model plays the reference scenario
(Triage -> L1Billing, then L1Billing -> L2Support on the escalation session),
and the tests read it through the console as a reviewer would.  Screenshots go
to tests/artifacts/web/ (ignored by git); each test prints its path.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.cli.main import main
from services.worker.scenario import ESCALATION_SESSION_ID, SEED_SESSION_ID
from shared.chain import verify
from shared.codec import decode
from shared.messages import AppendItem, Envelope
from shared.routing import handoff_target_of
from shared.signing import Keyring, Signer, sign_item
from tests.support.tamper import rechain
from tests.web.conftest import ARTIFACTS, Demo, LoopThread, screenshot

pytestmark = pytest.mark.timeout(180)


def lane_names(page: Any) -> list[str]:
    return page.eval_on_selector_all(".lane-label", "els => els.map(e => e.textContent)")


def center_x(page: Any, selector: str) -> float:
    box = page.locator(selector).bounding_box()
    return box["x"] + box["width"] / 2


def wait_badge(page: Any, cls: str) -> str:
    page.wait_for_selector(f"#badge.{cls}")
    return page.text_content("#badge")


def user_item(text: str) -> dict[str, Any]:
    return {"agent": "user", "data": {"role": "user", "content": text}}


def test_sessions_page_lists_the_demo_newest_first_and_filters_by_prefix(demo_web: Demo, page: Any) -> None:
    page.goto(demo_web.url + "/")
    page.wait_for_selector("tr[data-sid]")
    sids = page.eval_on_selector_all("tr[data-sid]", "els => els.map(e => e.dataset.sid)")
    demo_sids = [s for s in sids if s.startswith("ticket-")]
    # The escalation is played second, so it is the newer of the two.
    assert demo_sids == [ESCALATION_SESSION_ID, SEED_SESSION_ID]
    row = page.locator(f'tr[data-sid="{ESCALATION_SESSION_ID}"]')
    assert row.locator("td.num").text_content() == "12"
    assert row.locator(".chip").all_text_contents() == ["Triage", "L1Billing", "L2Support"]
    screenshot(page, "sessions")

    page.fill("#prefix", SEED_SESSION_ID[:-1] + "1")
    page.wait_for_function("document.querySelectorAll('tr[data-sid]').length === 1")
    assert page.eval_on_selector("tr[data-sid]", "e => e.dataset.sid") == SEED_SESSION_ID
    page.fill("#prefix", "no-such-prefix")
    page.wait_for_selector("text=No session id starts with no-such-prefix.")

    page.fill("#prefix", "")
    page.wait_for_selector(f'tr[data-sid="{ESCALATION_SESSION_ID}"] a')
    page.click(f'tr[data-sid="{ESCALATION_SESSION_ID}"] a')
    page.wait_for_url(f"**/sessions/{ESCALATION_SESSION_ID}")


def test_a_listing_answered_by_a_proxy_error_page_says_which_status(demo_web: Demo, page: Any) -> None:
    """A listing answered with no JSON (a proxy's 502 page while the console restarts) was
    shown as the parser's complaint ("Could not list sessions: Unexpected token '<' ...
    is not valid JSON"), naming the wrong thing; the session page says the status."""
    page.route("**/api/sessions?*", lambda route: route.fulfill(
        status=502, content_type="text/html", body=b"<h1>502 Bad Gateway</h1>"))
    page.goto(demo_web.url + "/")
    page.wait_for_function("document.getElementById('message').textContent.startsWith('Could not list')")
    assert page.text_content("#message") == "Could not list sessions: HTTP 502"
    screenshot(page, "sessions-proxy-error")


def test_conversation_shows_lanes_handoff_arrows_pairs_and_verifies(demo_web: Demo, page: Any) -> None:
    page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}")
    badge = wait_badge(page, "good")
    assert "chain intact through #12" in badge
    assert lane_names(page) == ["user", "Triage", "L1Billing", "L2Support", "system"]

    # Every card sits in its author's lane.
    for card in page.locator(".card").all():
        agent = card.get_attribute("data-agent")
        box = card.bounding_box()
        lane_x = center_x(page, f'.lane-label[data-lane="{agent}"]')
        assert box["x"] <= lane_x <= box["x"] + box["width"], (agent, box, lane_x)

    # The two handoffs, drawn as arrows from one lane to the next, with the tool's name.
    arrows = page.eval_on_selector_all(
        ".arrow", "els => els.map(e => [e.dataset.from, e.dataset.to, e.dataset.tool, e.textContent])")
    assert [a[:3] for a in arrows] == [
        ["Triage", "L1Billing", "route_to_billing"], ["L1Billing", "L2Support", "escalate_to_senior"]]
    assert "route_to_billing → L1Billing" in arrows[0][3]
    for frm, to, _, _ in arrows:
        box = page.locator(f'.arrow[data-from="{frm}"]').bounding_box()
        assert abs(box["x"] - center_x(page, f'.lane-label[data-lane="{frm}"]')) < 3
        assert abs(box["x"] + box["width"] - center_x(page, f'.lane-label[data-lane="{to}"]')) < 3
    screenshot(page, "conversation")

    # The refund tool call and its output are paired: folding shows them as one row.
    rows_before = page.locator(".row").count()
    refund = page.locator('.card[data-kind="tool call"]', has_text="issue_refund")
    refund.locator(".toggle").click()
    page.wait_for_function(f"document.querySelectorAll('.row').length === {rows_before - 1}")
    folded = page.locator('.card[data-kind="tool call"]', has_text="issue_refund").text_content()
    assert "⟶" in folded and "Refund RF-" in folded
    page.locator('.card[data-kind="tool call"]', has_text="issue_refund").locator(".toggle").click()
    page.wait_for_function(f"document.querySelectorAll('.row').length === {rows_before}")

    # Find: the first item mentioning the refund id, then the next one.
    page.fill("#find", "RF-")
    page.press("#find", "Enter")
    page.wait_for_selector(".row.selected[data-order='9']")
    page.press("#find", "Enter")
    page.wait_for_selector(".row.selected[data-order='10']")

    # Deep link: #9 selects the item and opens its details.
    page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}#9")
    page.wait_for_selector(".row.selected[data-order='9']")
    assert page.text_content("#detail h2").startswith("#9 · L2Support")
    assert "hash verified in this browser" in page.text_content("#detail dl")
    page.click(".row[data-order='9'] .time")  # focus leaves the find box
    page.keyboard.press("j")  # the keyboard walks the rows
    page.wait_for_selector(".row.selected[data-order='10']")
    page.keyboard.press("k")
    page.wait_for_selector(".row.selected[data-order='9']")
    page.check("#tall")  # room for six lines of each item
    page.wait_for_function("document.querySelector(\".row[data-order='9']\")?.offsetHeight === 136")  # the row is re-rendered: absent for a moment
    assert page.locator(".row.selected[data-order='9']").is_visible()
    box = page.locator(".row.selected[data-order='9']").bounding_box()
    assert 0 <= box["y"] < 800 - 136, box  # still on screen
    screenshot(page, "conversation-tall")

    # The export link serves every envelope; it verifies with the Python verifier too.
    href = page.get_attribute("#export", "href")
    body = page.request.get(demo_web.url + href).body()
    envs = [decode(line, Envelope) for line in body.splitlines() if line.strip()]
    assert page.text_content(".row[data-order='9'] .time") == envs[8].created_at[11:23]
    assert [e.item_order for e in envs] == list(range(1, 13))
    assert verify(envs, session_id=ESCALATION_SESSION_ID) is None


def test_item_times_are_shown_in_utc_whatever_the_reviewers_time_zone(demo_web: Demo, browser: Any) -> None:
    """The README says the console's times are UTC, as stored; an item's details (and
    the sessions list's hover title) gave its time with toLocaleString: in the
    browser's own time zone, unlabelled (15:00:00 for an item of 09:30:00Z in India)."""
    context = browser.new_context(viewport={"width": 1400, "height": 800}, timezone_id="Asia/Kolkata")
    try:
        pg = context.new_page()
        pg.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}#9")
        pg.wait_for_selector(".row.selected[data-order='9']")
        shown = pg.eval_on_selector("#detail dl", "dl => [...dl.children].find(e => e.textContent === 'time')"
                                    ".nextElementSibling.textContent")
        created_at = pg.eval_on_selector("#detail pre.raw", "e => JSON.parse(e.textContent).created_at")
        assert created_at.endswith("Z"), created_at
        assert shown == f"{created_at[:10]} {created_at[11:23]} UTC  ({created_at})", shown
        pg.goto(demo_web.url + "/")
        pg.wait_for_selector(f'tr[data-sid="{ESCALATION_SESSION_ID}"]')
        title = pg.get_attribute(f'tr[data-sid="{ESCALATION_SESSION_ID}"] td[title]', "title")
        assert title.startswith(f"{created_at[:10]} ") and " UTC  (" in title, title
    finally:
        context.close()


def test_item_times_in_rows_are_utc_as_convlog_replay_prints_them(demo_web: Demo, page: Any) -> None:
    """A row's time was cut out of created_at's text: an export whose times carry an
    offset showed the time at that offset (10:30:00.000 for 09:30:00Z), and one
    without a fraction the whole text; `convlog replay` gives UTC's HH:MM:SS.mmm."""
    from services.cli.render import clock

    times = ["2026-03-14T09:30:00.123456Z", "2026-03-14T10:30:00.000+01:00", "2026-03-14T04:00:00.5-05:30",
             "2026-03-14T09:30:00Z", "2026-03-14T23:30:00.250-23:59", "0099-12-31T23:59:59.999999Z",
             "not-a-time", "2026-02-30T00:00:00Z", "2026-03-14T10:30:00+01:60"]
    page.goto(demo_web.url + "/verify")
    got = page.evaluate("async (times) => { const m = await import('/static/common.js');"
                        " return times.map(m.shortTime); }", times)
    assert got == [clock(t) for t in times]
    assert got[:4] == ["09:30:00.123", "09:30:00.000", "09:30:00.500", "09:30:00.000"], got


def said(agent: str, text: str) -> dict[str, Any]:
    """An assistant message (the demo's workers answer only user messages, so these
    sessions stay exactly as written)."""
    return {"agent": agent, "data": {"type": "message", "role": "assistant", "content": text}}


def test_live_tail_shows_a_new_item(demo_web: Demo, log: LoopThread, page: Any) -> None:
    sid = "web-live-1"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    page.wait_for_function("window.__convlog.live === 'on'")
    t0 = time.monotonic()
    log.run(log.client.append(sid, [said("L1Billing", "arrived live")]))
    page.wait_for_selector('.card[data-order="2"]:has-text("arrived live")', timeout=5000)
    seen_after = time.monotonic() - t0
    print(f"live tail: item shown {seen_after * 1000:.0f} ms after the append was sent")
    assert "chain intact through #2" in wait_badge(page, "good")
    assert lane_names(page) == ["user", "Triage", "L1Billing", "system"]  # a new agent got its lane
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "live-tail-ms.txt").write_text(f"{seen_after * 1000:.0f}\n")


def test_a_live_tail_that_failed_is_not_reconnected_in_a_loop(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """When the console's follower fails (the log refused the read), the stream ends with a
    ``failed`` event (tests/web/test_console_http.py): the page reconnected to it every
    second, showing "reconnecting" for good.  It now stops and says why."""
    sid = "web-live-failed"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    tails: list[str] = []
    page.on("request", lambda r: tails.append(r.url) if "/live?" in r.url else None)
    page.route("**/live?*", lambda route: route.fulfill(
        status=200, content_type="text/event-stream",
        body=b'retry: 300\n: following\n\nevent: failed\ndata: {"error":"forbidden: reads refused"}\n\n'))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    page.wait_for_function("window.__convlog.live === 'failed'")
    page.wait_for_timeout(1500)  # five reconnects' worth at the stream's retry of 0.3 s
    assert len(tails) == 1, tails
    assert page.text_content("#live") == "✗ live tail stopped"
    assert page.text_content("#message") == "The live tail stopped: forbidden: reads refused"


def test_a_live_item_the_log_does_not_hold_is_replaced_by_the_logs(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """An envelope published on the items subject with a chain-valid hash (a loose NATS
    configuration) is shown until the log's item of that order arrives; the console's
    follower then sends the log's item of that order again (README: the live tail takes
    the log's items from there).  The page dropped it (not after its last order): it kept
    the forgery with a ✓ and then called the log's next item a broken chain."""
    from shared.chain import item_hash

    sid = "web-live-replaced"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    page.wait_for_function("window.__convlog.live === 'on'")
    [first] = log.run(log.client.items(sid))
    fields = dict(session_id=sid, item_order=2, item_id="forged-2", agent="Triage", kind="item",
                  data={"type": "message", "role": "assistant", "content": "a forgery"},
                  created_at="2026-03-14T09:30:00.000000Z")
    forged = Envelope(**fields, hash=item_hash(**fields, prev_hash=first.hash))  # type: ignore[arg-type]
    js = log.client.nc.jetstream()
    log.run(js.publish(log.client.subjects.items(sid), msgspec.json.encode(forged)))
    page.wait_for_selector('.card[data-order="2"]:has-text("a forgery")')
    log.run(log.client.append(sid, [said("L1Billing", "the log's second")]))
    log.run(log.client.append(sid, [said("L1Billing", "the log's third")]))
    page.wait_for_selector('.card[data-order="3"]:has-text("the log\'s third")')
    page.wait_for_selector('.card[data-order="2"]:has-text("the log\'s second")')
    assert "chain intact through #3" in wait_badge(page, "good")
    assert page.eval_on_selector_all(".row", "els => els.map(e => e.dataset.order)") == ["1", "2", "3"]


def test_a_live_tail_refused_by_a_proxy_is_opened_again(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """An answer that is no event stream (a proxy's 502 while the console restarts) closes
    an EventSource for good: the page showed "reconnecting" for ever and never tailed
    again.  It now opens a new tail after what it holds: nothing skipped, nothing twice."""
    sid = "web-live-502"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    tails: list[str] = []

    def once_refused(route: Any) -> None:
        tails.append(route.request.url)
        if len(tails) == 1:
            route.fulfill(status=502, content_type="text/html", body=b"<h1>502 Bad Gateway</h1>")
        else:
            route.continue_()

    page.route("**/live?*", once_refused)
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    page.wait_for_function("window.__convlog.live === 'reconnecting'")
    log.run(log.client.append(sid, [said("L1Billing", "arrived meanwhile")]))
    page.wait_for_function("window.__convlog.live === 'on'", timeout=15_000)
    log.run(log.client.append(sid, [said("L1Billing", "arrived live")]))
    page.wait_for_selector('.card[data-order="3"]:has-text("arrived live")')
    assert page.eval_on_selector_all(".row", "els => els.map(e => e.dataset.order)") == ["1", "2", "3"]
    assert "chain intact through #3" in wait_badge(page, "good")
    assert len(tails) == 2 and tails[1].endswith("/live?after=1"), tails


# Page Visibility as the browser reports it, set from the test: a hidden tab (another tab
# in front, a minimized window) is what a reviewer with many console tabs has.
def _verified_tab(context: Any, url: str, errors: list[str], *, init_script: str | None = None) -> Any:
    """A new tab of ``context`` on the session page ``url``, once its chain verified;
    its page errors go to ``errors``."""
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    if init_script is not None:
        pg.add_init_script(init_script)
    pg.goto(url)
    wait_badge(pg, "good")
    return pg


HIDDEN_TAB = """
(() => {
  let state = "hidden";
  Object.defineProperty(Document.prototype, "visibilityState", { configurable: true, get: () => state });
  Object.defineProperty(Document.prototype, "hidden", { configurable: true, get: () => state === "hidden" });
  window.__show = (shown) => { state = shown ? "visible" : "hidden"; document.dispatchEvent(new Event("visibilitychange")); };
})();
"""


def rows(page: Any) -> list[str]:
    return page.eval_on_selector_all(".row", "els => els.map(e => e.dataset.order)")


def test_hidden_tabs_release_their_live_tails_so_an_eighth_tab_loads_and_goes_live(
        demo_web: Demo, log: LoopThread, browser: Any) -> None:
    """Each session page held its live tail (one HTTP/1.1 connection) open, and Chromium
    opens at most 6 connections to one server: with six console tabs open the seventh
    tab never even loaded, with no word why.  A hidden tab now closes its tail and opens
    it again, after what it holds, when shown: nothing skipped, nothing twice."""
    sid = "web-live-tabs"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    context = browser.new_context(viewport={"width": 1400, "height": 800}, bypass_csp=True)
    errors: list[str] = []
    tails: list[str] = []
    try:
        pages = []
        for n in range(8):
            pages.append(_verified_tab(context, f"{demo_web.url}/sessions/{sid}", errors,
                                       init_script=HIDDEN_TAB if n < 7 else None))
        last = pages[-1]
        last.wait_for_function("window.__convlog.live === 'on'")
        for pg in pages[:-1]:
            assert pg.evaluate("window.__convlog.live") == "paused"
            assert pg.text_content("#live") == "❚❚ paused (tab hidden)"
        log.run(log.client.append(sid, [said("L1Billing", "second, while hidden")]))
        last.wait_for_selector('.card[data-order="2"]:has-text("second, while hidden")')
        log.run(log.client.append(sid, [said("L1Billing", "third, while hidden")]))
        last.wait_for_selector('.card[data-order="3"]')

        # A hidden tab shown again shows what came meanwhile, once, and goes on live.
        first = pages[0]
        first.on("request", lambda r: tails.append(r.url) if "/live?" in r.url else None)
        assert rows(first) == ["1"]
        first.evaluate("window.__show(true)")
        first.wait_for_function("window.__convlog.live === 'on'")
        first.wait_for_selector('.card[data-order="3"]:has-text("third, while hidden")')
        assert tails == [f"{demo_web.url}/sessions/{sid}/live?after=1"]
        log.run(log.client.append(sid, [said("L1Billing", "fourth, live")]))
        first.wait_for_selector('.card[data-order="4"]:has-text("fourth, live")')
        assert rows(first) == ["1", "2", "3", "4"]
        assert first.text_content("#count").startswith("4 items")
        assert "chain intact through #4" in wait_badge(first, "good")

        # The tab in front hidden: its tail closes; shown again, it resumes after #4.
        first.evaluate("window.__show(false)")
        first.wait_for_function("window.__convlog.live === 'paused'")
        log.run(log.client.append(sid, [said("L1Billing", "fifth, while hidden")]))
        last.wait_for_selector('.card[data-order="5"]')
        first.wait_for_timeout(500)
        assert rows(first) == ["1", "2", "3", "4"]  # no tail while hidden
        first.evaluate("window.__show(true)")
        first.wait_for_selector('.card[data-order="5"]:has-text("fifth, while hidden")')
        first.wait_for_function("window.__convlog.live === 'on'")
        assert tails[1:] == [f"{demo_web.url}/sessions/{sid}/live?after=4"], tails
        assert rows(first) == ["1", "2", "3", "4", "5"]
        assert first.text_content("#count").startswith("5 items")
        assert "chain intact through #5" in wait_badge(first, "good")
        screenshot(first, "hidden-tab-shown-again")
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the pages: {errors}"


def test_seven_visible_tabs_all_load_and_the_later_ones_wait_their_turn_to_go_live(
        demo_web: Demo, log: LoopThread, browser: Any) -> None:
    """Tabs a reviewer keeps in view (windows side by side) are not hidden, and each held
    its live tail: six of them took all 6 connections Chromium opens to one server, so the
    seventh tab never loaded (a blank page, no word why) and neither did any other request
    of the console.  The tabs now share a few tail slots (Web Locks): every page loads, a
    tab beyond them says it waits, and it goes live when a live tab is closed."""
    sid = "web-live-visible-tabs"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    context = browser.new_context(viewport={"width": 1400, "height": 800}, bypass_csp=True)
    errors: list[str] = []
    try:
        pages = []
        for _ in range(7):
            pages.append(_verified_tab(context, f"{demo_web.url}/sessions/{sid}", errors))  # the seventh timed out
        for pg in pages:
            pg.wait_for_function("['on', 'waiting'].includes(window.__convlog.live)")
        live = [pg for pg in pages if pg.evaluate("window.__convlog.live") == "on"]
        waiting = [pg for pg in pages if pg not in live]
        assert len(live) == 4 and len(waiting) == 3, [pg.evaluate("window.__convlog.live") for pg in pages]
        assert waiting[0].text_content("#live") == "○ waiting for a connection"
        assert "close or hide one" in waiting[0].text_content("#message")
        # A plain request still gets a connection (it waited for good when 6 tails held them).
        t0 = time.monotonic()
        listed = pages[0].evaluate("fetch('/api/sessions?limit=5').then((r) => r.status)")
        assert listed == 200 and time.monotonic() - t0 < 5
        log.run(log.client.append(sid, [said("L1Billing", "second, to the live tabs")]))
        for pg in live:
            pg.wait_for_selector('.card[data-order="2"]:has-text("second, to the live tabs")')
        screenshot(waiting[0], "visible-tab-waiting-for-a-tail")

        # A live tab closed: its slot goes to a waiting tab, which resumes after what it holds.
        live[0].close()
        waiting[0].wait_for_function("window.__convlog.live === 'on'")
        waiting[0].wait_for_selector('.card[data-order="2"]:has-text("second, to the live tabs")')
        assert waiting[0].text_content("#message") == ""
        log.run(log.client.append(sid, [said("L1Billing", "third, live")]))
        waiting[0].wait_for_selector('.card[data-order="3"]:has-text("third, live")')
        assert rows(waiting[0]) == ["1", "2", "3"]
        assert "chain intact through #3" in wait_badge(waiting[0], "good")
        assert [pg.evaluate("window.__convlog.live") for pg in waiting[1:]] == ["waiting", "waiting"]
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the pages: {errors}"


def test_a_live_tail_that_cannot_connect_says_so(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """A tail the browser holds back (no connection to the server free) showed nothing at
    all: no "live", no "reconnecting", no message.  After 10 s the page now says it is not
    connected and why that may be; once the tail opens, the message goes."""
    sid = "web-live-stalled"
    log.run(log.client.append(sid, [said("Triage", "first message")]))
    held: list[Any] = []
    page.route("**/live?*", lambda route: held.append(route))  # never answered: held back
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    assert page.text_content("#live") == "○ connecting"
    page.wait_for_function("window.__convlog.live === 'stalled'", timeout=15_000)
    assert page.text_content("#live") == "○ not connected"
    assert "The live tail has not connected" in page.text_content("#message")
    assert "close or hide other console tabs" in page.text_content("#message")
    held[0].continue_()
    page.wait_for_function("window.__convlog.live === 'on'")
    assert page.text_content("#message") == ""


def _tampered(body: bytes, order: int, how: str) -> bytes:
    lines = [json.loads(x) for x in body.splitlines() if x.strip()]
    if how == "edit":
        lines[order - 1]["data"]["content"] = "I never asked for a refund."
    elif how == "remove":
        del lines[order - 1]
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def test_badge_turns_red_on_a_tampered_export(demo_web: Demo, page: Any, tmp_path: Any) -> None:
    url = f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}"
    real = page.request.get(f"{url}/export.jsonl").body()

    # A server that edits item #7 (the user's refund request) before sending it.
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=_tampered(real, 7, "edit")))
    page.goto(url)
    badge = wait_badge(page, "bad")
    assert "chain broken at #7" in badge and "hash does not match" in badge
    assert page.get_attribute(".row[data-order='6'] .vmark", "class") == "vmark ok"
    assert page.get_attribute(".row[data-order='7'] .vmark", "class") == "vmark bad"
    screenshot(page, "tampered-export")

    # ... and one that drops item #4: the gap is named.
    page.unroute("**/export.jsonl")
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=_tampered(real, 4, "remove")))
    page.goto(url)
    assert "chain broken at #4: expected item_order 4, found 5" in wait_badge(page, "bad")

    # ... and one whose stream turns to garbage after item #6: nothing after it is trusted.
    page.unroute("**/export.jsonl")
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=b"\n".join(real.splitlines()[:6]) + b"\n{oops\n"))
    page.goto(url)
    assert "chain broken at #7: the export is unreadable after #6" in wait_badge(page, "bad")

    # A chain alone cannot show its newest items were dropped; the head hash the
    # reviewer holds (from a receipt, or `convlog replay`) can.
    head = json.loads(real.splitlines()[-1])["hash"]
    page.unroute("**/export.jsonl")
    page.goto(f"{url}?head={head[:16]}")
    assert "chain intact through #12" in wait_badge(page, "good")
    page.wait_for_selector("#held.good")
    assert page.text_content("#held") == "✓ holds your head #12"
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=b"\n".join(real.splitlines()[:11]) + b"\n"))
    page.route("**/live?*", lambda route: route.abort())  # nor does it tail what it dropped
    page.goto(f"{url}?head={head}")
    assert "chain intact through #11" in wait_badge(page, "good")
    page.wait_for_selector("#held.bad")
    assert page.text_content("#held") == f"✗ your head {head[:8]}… is not in this chain"
    assert "rewritten, or its newest items were cut off" in page.get_attribute("#held", "title")
    screenshot(page, "head-not-held")

    # The reviewer's own file, checked on /verify without the server's data.
    f = tmp_path / "export.jsonl"
    f.write_bytes(_tampered(real, 10, "edit"))
    page.unroute("**/export.jsonl")
    page.unroute("**/live?*")
    page.goto(f"{demo_web.url}/verify")
    page.set_input_files("#file", str(f))
    assert "chain broken at #10" in wait_badge(page, "bad")
    f.write_bytes(real)
    page.goto(f"{demo_web.url}/verify")
    page.set_input_files("#file", str(f))
    assert "chain intact through #12" in wait_badge(page, "good")


INJECTIONS = [
    "<script>window.__pwned = 1</script>",
    '<img src="x" onerror="window.__pwned = 2">',
    "**bold** [click](javascript:window.__pwned=3) <b>html</b> &lt;escaped&gt;",
]


def test_injected_content_renders_as_inert_text(demo_web: Demo, log: LoopThread, page: Any) -> None:
    sid = "web-inject-1"
    agent = '<img src=x onerror="window.__pwned=4">'
    log.run(log.client.append(sid, [
        said("L1Billing", INJECTIONS[0]),
        {"agent": agent, "data": {"type": "message", "role": "assistant",
                                  "content": [{"type": "output_text", "text": INJECTIONS[1]}]}},
        said("L1Billing", INJECTIONS[2]),
    ]))
    # A user's message too (the rules model answers it, quoting it back: more of the same).
    log.run(log.client.append(sid, [user_item(INJECTIONS[1] + " " + INJECTIONS[0])]))
    for path in (f"/sessions/{sid}", "/"):
        page.goto(demo_web.url + path)
        page.wait_for_selector(".card[data-order='4'], tr[data-sid]")
        page.wait_for_timeout(200)  # let any handler that would fire, fire
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#canvas img, #canvas script, #canvas b, #rows img, #rows b").count() == 0
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    texts = page.locator(".card .text").all_text_contents()
    assert texts[:4] == [*INJECTIONS, INJECTIONS[1] + " " + INJECTIONS[0]]
    assert page.locator(".lane-label").all_text_contents()[:3] == ["user", "L1Billing", agent]
    page.click(".card[data-order='2']")
    assert INJECTIONS[1] in page.text_content("#detail pre.content")
    assert page.evaluate("window.__pwned") is None
    screenshot(page, "injection")


def test_data_with_a_tostring_key_is_shown_and_hides_no_later_item(
        demo_web: Demo, log: LoopThread, page: Any) -> None:
    """The log accepts any JSON object as data; one whose field is an object with a
    "toString" key that is no function made String() throw while drawing its row, so
    that row and every later row on screen stayed blank under a green badge."""
    sid = "rev-tostring"
    log.run(log.client.append(sid, [
        said("Triage", "before"),
        {"agent": "Triage", "data": {"type": {"toString": 0}}},
        {"agent": "Triage", "data": {"type": "message", "role": {"toString": 1}, "content": "odd role"}},
        {"agent": "Triage", "data": {"type": "message", "role": "assistant",
                                     "content": [{"type": "output_text", "text": {"toString": 2}}]}},
        {"agent": "Triage", "data": {"type": "function_call", "name": {"toString": None}, "call_id": "c1",
                                     "arguments": {"toString": 3}}},
        {"agent": "Triage", "data": {"type": "function_call_output", "call_id": "c1",
                                     "output": '{"assistant": "L1Billing"}'}},
        *[said("Triage", f"after {i}") for i in range(3)],
    ]))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    assert "chain intact through #9" in wait_badge(page, "good")
    page.wait_for_selector(".row[data-order='9']")
    rows = page.eval_on_selector_all(".row", "els => els.map(e => Number(e.dataset.order))")
    assert rows == list(range(1, 10))
    texts = page.locator(".card .text").all_text_contents()
    assert texts[:4] == ["before", '{"type":{"toString":0}}', "odd role", '{"toString":2}']
    assert texts[4] == '{"toString":null}({"toString":3})' and texts[-1] == "after 2"
    assert page.eval_on_selector(".arrow", "e => e.dataset.tool") == '{"toString":null}'


def test_retracted_and_cleared_items_are_struck_and_the_agents_view_hides_them(
        demo_web: Demo, log: LoopThread, page: Any) -> None:
    sid = "web-retract-1"
    log.run(log.client.append(sid, [said("Triage", "one"), said("Triage", "two (retracted)")]))
    log.run(log.client.append(sid, [{"agent": "Triage", "kind": "retract", "data": {"target": 2}}]))
    log.run(log.client.append(sid, [said("L1Billing", "three (cleared)")]))
    log.run(log.client.append(sid, [{"agent": "system", "kind": "clear", "data": {}},
                                    said("L1Billing", "four")]))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    struck = page.eval_on_selector_all(".card.struck", "els => els.map(e => e.dataset.order)")
    assert struck == ["1", "2", "4"]
    assert "retracted by #3" in page.text_content(".card[data-order='2']")
    assert "cleared by #5" in page.text_content(".card[data-order='4']")
    assert page.eval_on_selector(".card[data-order='2'] .text",
                                 "e => getComputedStyle(e).textDecorationLine") == "line-through"
    screenshot(page, "struck")
    page.check("#agents-saw")
    page.wait_for_function("document.querySelectorAll('.row').length === 1")
    assert page.locator(".card .text").all_text_contents() == ["four"]
    page.uncheck("#agents-saw")
    page.wait_for_function("document.querySelectorAll('.row').length === 6")


def test_folding_all_pairs_never_hides_a_retract_or_shows_a_retracted_output(
        demo_web: Demo, log: LoopThread, page: Any) -> None:
    # A tool call and its output fold into one row (the call's card): an output retracted
    # while its call stays visible showed in that unstruck row, with no "retracted by", and
    # in "What the agents saw" too; an output whose call alone was retracted vanished from
    # that view, though the agents still see it.
    sid = "web-retract-pair"

    def call(cid: str, name: str) -> dict[str, Any]:
        return {"agent": "Triage", "data": {"type": "function_call", "call_id": cid, "name": name,
                                            "arguments": "{}"}}

    def output(cid: str, text: str) -> dict[str, Any]:
        return {"agent": "Triage", "data": {"type": "function_call_output", "call_id": cid, "output": text}}

    log.run(log.client.append(sid, [call("c1", "lookup"), output("c1", "secret (retracted)"),
                                    call("c2", "refund"), output("c2", "refunded (kept)"),
                                    call("c3", "note"), output("c3", "noted")]))
    log.run(log.client.append(sid, [{"agent": "Triage", "kind": "retract", "data": {"target": 2}},
                                    {"agent": "Triage", "kind": "retract", "data": {"target": 3}}]))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    page.check("#collapse")  # fold every pair
    page.wait_for_selector(".toggle[aria-label='unfold']")  # the plain pair, 5 and 6, is one row
    struck = page.eval_on_selector_all(".card.struck", "els => els.map(e => e.dataset.order)")
    texts = page.locator(".card:not(.struck) .text").all_text_contents()
    assert not any("secret" in t for t in texts), f"the retracted output shows unstruck: {texts}"
    assert "2" in struck and "3" in struck, f"struck rows: {struck}"
    page.check("#agents-saw")
    page.wait_for_function("document.querySelectorAll('.row').length === 3")
    seen = page.locator(".card .text").all_text_contents()
    assert seen == ["lookup({})", "refunded (kept)", "note({})  ⟶  noted"], seen


def test_ten_thousand_items_first_screen_and_verify_times(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """Measured, not asserted: the figures go to the README (and are printed here)."""
    sid = "web-big-10k"
    words = "the quick brown fox jumps over the lazy dog " * 4
    for start in range(0, 10_000, 500):
        items = [said(("Triage", "L1Billing", "L2Support")[(start + k) % 3], f"{start + k + 1}: {words}")
                 for k in range(500)]
        log.run(log.client.append(sid, items))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    assert "chain intact through #10000" in wait_badge(page, "good")
    figures = page.evaluate("({first: window.__convlog.firstScreenMs, loaded: window.__convlog.loadedMs, "
                            "verified: window.__convlog.verifiedMs})")
    rows = page.locator(".row").count()
    print(f"10,000 items: first screen {figures['first']} ms, all received {figures['loaded']} ms, "
          f"verified {figures['verified']} ms, "
          f"{rows} rows in the DOM")
    assert rows < 60  # virtualized: only what is on screen (plus a small overscan)
    screenshot(page, "10k-top")
    page.reload()  # once more, warm
    assert "chain intact through #10000" in wait_badge(page, "good")
    warm = page.evaluate("({first: window.__convlog.firstScreenMs, loaded: window.__convlog.loadedMs, "
                         "verified: window.__convlog.verifiedMs})")
    print(f"10,000 items, reloaded: first screen {warm['first']} ms, all received {warm['loaded']} ms, "
          f"verified {warm['verified']} ms")
    (ARTIFACTS / "10k-figures.json").write_text(json.dumps({"cold": {**figures, "dom_rows": rows}, "warm": warm}))
    page.goto(f"{demo_web.url}/sessions/{sid}#9999")
    page.wait_for_selector(".row.selected[data-order='9999']")
    assert page.locator(".row").count() < 60
    assert "9999: the quick" in page.text_content(".card[data-order='9999']")


CANONICAL_CASES: list[Any] = [
    {"b": 1, "a": [True, False, None], "c": {"z": "", "y": "é"}},
    [0.1, 1.5, -0.0, 120.0, 1e21, 1e-7, 123456789012345.6, 2**53 - 1, -(2**53 - 1), 5e-324],
    {"\u20ac": 1, "\U0001f600": 2, "\ufb01": 3, "a": 4, "A": 5, "": 6},  # UTF-16 key order
    ["\u0000\u0001\u001f", "\"\\/", "\u2028\u2029", "\u007f", "tab\tnl\ncr\r", "😀 non-BMP"],
    {"data": {"content": [{"type": "output_text", "text": "<script>x</script>", "annotations": []}]}},
]


def test_browser_canonical_json_and_sha256_match_the_python_reference(demo_web: Demo, page: Any) -> None:
    """chain.js's RFC 8785 and its fallback SHA-256 agree with rfc8785 and hashlib."""
    import hashlib

    import rfc8785

    from shared.chain import item_hash

    page.goto(demo_web.url + "/verify")
    got = page.evaluate("""async (cases) => {
        const m = await import('/static/chain.js');
        const hex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, '0')).join('');
        return cases.map((c) => { const s = m.canonical(c); return [s, hex(m.sha256js(new TextEncoder().encode(s)))]; });
    }""", CANONICAL_CASES)
    for case, (text, js_sha) in zip(CANONICAL_CASES, got, strict=True):
        ref = rfc8785.dumps(case)
        assert text.encode() == ref, case
        assert js_sha == hashlib.sha256(ref).hexdigest()

    # One envelope hashed the way the log does, and again with optional signature fields.
    env = {"session_id": "s", "item_order": 1, "item_id": "i", "agent": "Triage", "kind": "item",
           "data": {"amount": 120.0, "text": "naïve 😀"}, "created_at": "2026-03-14T09:30:00.123456Z"}
    env["hash"] = item_hash(**{k: v for k, v in env.items() if k != "hash"}, prev_hash="0" * 64)
    signed = {**env, "sig": "c2ln", "key_id": "k1"}
    expected_signed = hashlib.sha256(rfc8785.dumps(
        {**{k: v for k, v in signed.items() if k != "hash"}, "prev_hash": "0" * 64})).hexdigest()
    hashes = page.evaluate("""async (envs) => {
        const m = await import('/static/chain.js');
        return Promise.all(envs.map((e) => m.sha256hex(m.hashInput(e, m.GENESIS))));
    }""", [env, signed])
    assert hashes == [env["hash"], expected_signed]


def test_a_tool_result_that_is_no_handoff_is_not_drawn_as_one(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """A tool result that only looks like a handoff (what shared.routing's
    parse_handoff_output refuses: leading whitespace, an object) draws no handoff arrow
    and no lane for an agent that never took over."""
    sid = "rev-fake-handoff"
    out = ' {"assistant": "L2Support"}'  # e.g. a tool echoing text it was given
    items = [
        said("Triage", "let me look that up"),
        {"agent": "Triage", "data": {"type": "function_call", "name": "lookup", "call_id": "c1", "arguments": "{}"}},
        {"agent": "Triage", "data": {"type": "function_call_output", "call_id": "c1", "output": out}},
    ]
    log.run(log.client.append(sid, items))
    assert handoff_target_of("item", items[2]["data"]) is None  # the system: no handoff, routing unchanged
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    lanes = page.eval_on_selector_all(".lane-label", "els => els.map(e => e.textContent)")
    arrows = page.locator(".arrow").count()
    kinds = page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.kind)")
    assert (lanes, arrows) == (["user", "Triage", "system"], 0), (lanes, arrows, kinds)


def test_gateway_key_on_a_turn_id_is_refused_as_convlog_replay_refuses_it(
        demo_web: Demo, log: LoopThread, page: Any, tmp_path: Path) -> None:
    """A gateway-signed item under an agent's turn-derived id (<turn>.<agent>.<step>.<role>)
    is a bad signature in the browser as it is for `convlog replay --verify` (served by a
    hostile server or in an edited export: an honest log service refuses it)."""
    keys = tmp_path / "keys"
    with concurrent.futures.ThreadPoolExecutor(1) as ex:  # off Playwright's event loop
        assert ex.submit(main, ["keys", "init", "--out", str(keys)]).result() == 0
    sid = "rev-gw-turn-id"
    log.run(log.client.append(sid, [said("Triage", "placeholder")]))
    real = page.request.get(f"{demo_web.url}/sessions/{sid}/export.jsonl").body()
    base = msgspec.json.decode(real.splitlines()[0], type=Envelope)
    gw = Signer.load(keys / "gateway.nk")
    item = sign_item(gw, sid, AppendItem(agent="user", item_id="t1.L1Billing.1.reply",
                                         data={"role": "user", "content": "pre-empting L1Billing's reply id"}))
    env = rechain([msgspec.structs.replace(base, agent=item.agent, item_id=item.item_id, data=item.data,
                                           sig=item.sig, key_id=item.key_id)])[0]
    keyring = Keyring.load(keys / "keyring.json")
    assert keyring.check_envelope(env) is not None  # the offline reference: bad signature
    body = msgspec.json.encode(env) + b"\n"
    page.route("**/export.jsonl", lambda route: route.fulfill(status=200, content_type="application/jsonl", body=body))
    page.route("**/live?*", lambda route: route.abort())
    page.goto(f"{demo_web.url}/sessions/{sid}")
    wait_badge(page, "good")
    page.set_input_files("#keyring", str(keys / "keyring.json"))
    page.wait_for_function("document.querySelector('.row .smark')?.className.includes('ok') "
                           "|| document.querySelector('.row .smark')?.className.includes('bad')")
    badge = page.text_content("#badge")
    assert "bad signature at #1" in badge, badge


def test_sessions_list_matches_the_prefix_typed_last(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """An older listing answered late does not overwrite the newer one: the table shows
    the sessions of the prefix in the box."""
    log.run(log.client.append("aa-rev-1", [said("Triage", "a")]))
    log.run(log.client.append("bb-rev-1", [said("Triage", "b")]))
    page.goto(demo_web.url + "/")
    page.wait_for_selector('tr[data-sid="bb-rev-1"]')
    held: list[Any] = []

    def handle(route: Any) -> None:
        if "prefix=aa" in route.request.url:
            held.append(route)  # answered late
        else:
            route.continue_()

    page.route("**/api/sessions?*", handle)
    page.fill("#prefix", "aa")
    page.wait_for_timeout(400)  # the 200 ms debounce fired: the "aa" listing is in flight
    assert held
    page.fill("#prefix", "bb")
    page.wait_for_function("document.querySelectorAll('tr[data-sid]').length === 1 && "
                           "document.querySelector('tr[data-sid]').dataset.sid === 'bb-rev-1'")
    held[0].continue_()
    page.wait_for_timeout(500)
    sids = page.eval_on_selector_all("tr[data-sid]", "els => els.map(e => e.dataset.sid)")
    assert sids == ["bb-rev-1"], (page.input_value("#prefix"), sids)


def _python_verdict(path: Path, sid: str) -> str | None:
    """What ``convlog replay --file PATH --verify`` says of an export: the first problem."""
    import io

    from services.cli.replay import Replayer, envelopes_from_file

    r = Replayer(io.StringIO(), quiet=True)
    r.run_sync(envelopes_from_file(path, sid), sid)
    return None if r.problem is None else str(r.problem)


def _verify_file(demo_web: Demo, page: Any, path: Path, cls: str) -> str:
    page.goto(f"{demo_web.url}/verify")
    page.set_input_files("#file", str(path))
    return wait_badge(page, cls)


def test_an_item_that_cannot_be_canonicalized_is_named_where_it_is(
        demo_web: Demo, page: Any, tmp_path: Path) -> None:
    """A number JSON has no RFC 8785 form for (1e400) in item #10 breaks the chain at #10,
    in the browser as in `convlog replay --verify` -- not at the first item read with it."""
    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    lines = real.splitlines()
    lines[9] = lines[9].replace(b'"data":{', b'"data":{"n":1e400,', 1)
    assert b"1e400" in lines[9]
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith("item_order 10: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #10" in badge, badge
    assert page.get_attribute(".row[data-order='9'] .vmark", "class") == "vmark ok"


def test_the_pages_scripts_are_checked_with_the_console_at_each_load(demo_web: Demo, page: Any) -> None:
    """The scripts and stylesheet were served with no Cache-Control, so Chromium kept them
    fresh for a tenth of their age since modified (heuristic freshness) and ran them from
    its cache without asking: after an upgrade of convlog, a reviewer's browser went on
    running the old scripts -- the old checks of the chain and signatures -- for days (a
    page on an install 30 days old: 3 days).  Each load now asks the console (no-cache: a
    304 while unchanged).  The files are aged as an install is; their times are put back."""
    import os

    from services.web.app import STATIC

    files = [f for f in STATIC.iterdir() if f.is_file()]
    times = {f: (f.stat().st_atime_ns, f.stat().st_mtime_ns) for f in files}
    month_ago = time.time() - 30 * 86400
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    urls: dict[str, str] = {}
    cached: list[str] = []
    cdp.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
    cdp.on("Network.requestServedFromCache", lambda e: cached.append(urls.get(e["requestId"], "?")))
    try:
        for f in files:
            os.utime(f, (month_ago, month_ago))
        for _ in range(2):  # the second load is the one that could come from the cache
            urls.clear()
            cached.clear()
            page.goto(f"{demo_web.url}/sessions/{SEED_SESSION_ID}")
            wait_badge(page, "good")
    finally:
        for f, (atime, mtime) in times.items():
            os.utime(f, ns=(atime, mtime))
    asked = {u.rsplit("/", 1)[1] for u in urls.values() if "/static/" in u}
    assert {"session.js", "chain.js", "signing.js", "model.js", "common.js", "style.css"} <= asked, asked
    assert not [u for u in cached if "/static/" in u], cached


def test_a_session_that_did_not_load_gets_no_green_badge(demo_web: Demo, page: Any) -> None:
    """The export failed (the log service down: 503): the page said "Could not load
    the session" beside a green "no items to verify" badge, the badge of an empty,
    intact session.  Nothing was verified, so the badge says so, not green."""
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=b'{"error": {"code": "unavailable", "message": "no log service answered"}}'))
    page.route("**/live?*", lambda route: route.abort())
    page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}")
    page.wait_for_function("document.getElementById('message').textContent.includes('Could not load')")
    page.wait_for_function("document.getElementById('badge').textContent.includes('did not load')")
    assert page.get_attribute("#badge", "class") == "badge working"
    assert page.text_content("#badge") == "nothing verified: the session did not load"
    assert "no log service answered" in page.text_content("#message")
    screenshot(page, "did-not-load")


def test_a_session_that_came_only_by_the_live_tail_is_not_called_fully_checked(
        demo_web: Demo, log: LoopThread, page: Any) -> None:
    """The export failed (503) and the page then took every item from the live tail
    (after #0): the badge turned plain green "chain intact", as for a loaded export, though
    none of the log's signed heads was loaded, so nothing checked the tail was whole (and
    the "Could not load" message was gone with the first item).  It now warns so."""
    sid = "web-live-unloaded"
    log.run(log.client.append(sid, [said("Triage", "first message"), said("L1Billing", "second")]))
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=b'{"error": {"code": "unavailable", "message": "no log service answered"}}'))
    page.goto(f"{demo_web.url}/sessions/{sid}")
    page.wait_for_selector('.card[data-order="2"]')
    page.wait_for_function("window.__convlog.live === 'on'")
    text = wait_badge(page, "warn")
    assert page.get_attribute("#badge", "class") == "badge warn"
    assert text.startswith("⚠ chain intact through #2"), text
    assert "the export did not load: these items came by the live tail, no signed head was checked" in text
    assert rows(page) == ["1", "2"]


@pytest.mark.parametrize("bad", [b"{oops", b"null", b"[1, 2]"])
def test_a_file_with_a_line_that_is_not_json_breaks_at_that_item(
        demo_web: Demo, page: Any, tmp_path: Path, bad: bytes) -> None:
    """On /verify, an export whose line 7 is not a JSON object is intact through #6 and broken
    at #7, as `convlog replay --verify` and the session page say -- not broken at #1."""
    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    lines = real.splitlines()
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"\n".join([*lines[:6], bad, *lines[7:]]) + b"\n")
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith("item_order 7: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #7" in badge and "line 7 is not a JSON object" in badge, badge
    assert page.get_attribute(".row[data-order='6'] .vmark", "class") == "vmark ok"

    # The session page, from a server that sends the same lines, says the same.
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=f.read_bytes()))
    page.route("**/live?*", lambda route: route.abort())
    page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}")
    badge = wait_badge(page, "bad")
    assert "chain broken at #7: the export is unreadable after #6: line 7 is not a JSON object" in badge, badge


def test_an_integer_json_parse_rounds_is_refused_as_convlog_replay_refuses_it(
        demo_web: Demo, log: LoopThread, page: Any, tmp_path: Path) -> None:
    """An export whose float 1e20 was edited into the integer 100000000000000000001: JSON.parse
    rounds it back to 1e20, so the hash -- and the head the reviewer holds -- still matched in
    the browser, while `convlog replay --verify` (and the log service at input) refuse an
    integer beyond 2^53-1 (RFC 8785 cannot hash it exactly)."""
    sid = "rev-big-int"
    log.run(log.client.append(sid, [said("Triage", "one"), {"agent": "Triage", "data": {
        "type": "message", "role": "assistant", "content": "refund", "amount": 1e20}}, said("Triage", "three")]))
    real = page.request.get(f"{demo_web.url}/sessions/{sid}/export.jsonl").body()
    lines = real.splitlines()
    assert b'"amount":1e20' in lines[1]
    lines[1] = lines[1].replace(b'"amount":1e20', b'"amount":100000000000000000001')
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    assert (_python_verdict(f, sid) or "").startswith("item_order 2: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #2" in badge, badge

    # The session page, from a server that sends the edited export, says the same.
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=f.read_bytes()))
    page.route("**/live?*", lambda route: route.abort())
    page.goto(f"{demo_web.url}/sessions/{sid}")
    assert "chain broken at #2" in wait_badge(page, "bad")


def test_a_lone_surrogate_is_refused_as_convlog_replay_refuses_it(
        demo_web: Demo, page: Any, tmp_path: Path) -> None:
    """A string holding half a surrogate pair ("\\ud800") is not Unicode text: RFC 8785 (the
    rfc8785 package, msgspec, `convlog replay --verify`) refuses it, but JSON.stringify writes
    it as an escape, so an export chained over that escape verified in the browser."""
    import hashlib

    import rfc8785

    env = {"session_id": "rev-lone", "item_order": 1, "item_id": "i1", "agent": "Triage", "kind": "item",
           "data": {"type": "message", "role": "assistant", "content": "LONE"},
           "created_at": "2026-03-14T09:30:00.123456Z"}
    # The hash as JSON.stringify's escape would have it.
    text = rfc8785.dumps({**env, "prev_hash": "0" * 64}).replace(b"LONE", b"x\\ud800")
    env["data"]["content"] = "x\ud800"
    env["hash"] = hashlib.sha256(text).hexdigest()
    f = tmp_path / "export.jsonl"
    f.write_bytes(json.dumps(env).encode() + b"\n")
    assert b"x\\ud800" in f.read_bytes()
    assert (_python_verdict(f, "rev-lone") or "").startswith("item_order 1: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #1" in badge and "cannot be canonicalized" in badge, badge


@pytest.mark.parametrize("extra", [b'"prev_hash":"0000000000000000000000000000000000000000000000000000000000000000"',
                                   b'"__proto__":{"approved_by":"CFO"}'])
def test_a_field_beside_the_envelope_breaks_the_chain_as_in_convlog_replay(
        demo_web: Demo, page: Any, tmp_path: Path, extra: bytes) -> None:
    """A field the hash does not cover is tampering (`convlog replay --verify` refuses it),
    but hashInput overwrote a line's own "prev_hash" with the chain's and copied a
    "__proto__" field into the prototype, where canonical never saw it: such a line verified."""
    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    lines = real.splitlines()
    lines[1] = lines[1][:-1] + b"," + extra + b"}"
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith("item_order 2: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #2" in badge, badge



def test_an_object_holding_a_name_twice_is_refused_as_convlog_replay_refuses_it(
        demo_web: Demo, page: Any, tmp_path: Path) -> None:
    """A name written twice in an item's data, the first one new text: JSON.parse keeps the
    last value, so the hash -- and every later hash, the head the reviewer holds, a signed
    head -- still matched and the page said "chain intact", while `convlog replay --verify`
    refuses the line (the hash covers only the last value; the first is text a reader of
    the line sees)."""
    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    lines = real.splitlines()
    name = next(iter(json.loads(lines[1])["data"]))
    lines[1] = lines[1].replace(b'"data":{', b'"data":{' + json.dumps(name).encode() + b':"approved by the CFO",', 1)
    assert b"approved by the CFO" in lines[1]
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith("item_order 2: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #2" in badge and "more than once" in badge, badge
    assert page.get_attribute(".row[data-order='1'] .vmark", "class") == "vmark ok"

    # The session page, from a server that sends the same lines, says the same.
    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=f.read_bytes()))
    page.route("**/live?*", lambda route: route.abort())
    page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}")
    assert "chain broken at #2" in wait_badge(page, "bad")


@pytest.mark.parametrize("edit", [{"note": "approved by the CFO"}, {"kind": "approval"}, {"agent": ["CFO"]},
                                  {"created_at": None}, {"item_id": None}, {"item_order": 2.0}])
def test_a_line_that_is_no_envelope_breaks_the_chain_as_in_convlog_replay(
        demo_web: Demo, page: Any, tmp_path: Path, edit: dict[str, Any]) -> None:
    """An item with a field beside the envelope's, a kind that is none, an agent that is no
    string, a field missing or an item_order written 2.0 (JSON.parse reads it as 2, and it
    hashes as 2), chained again from there: `convlog replay --verify` refuses it (it is no
    envelope), but the page only hashed what it found and said "chain intact" over an item
    shown with that field."""
    import hashlib

    import rfc8785

    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    envs = [json.loads(x) for x in real.splitlines() if b'"signed_head"' not in x]
    for k, v in edit.items():
        if v is None:
            del envs[1][k]
        else:
            envs[1][k] = v
    prev = "0" * 64
    for e in envs:
        e["hash"] = hashlib.sha256(rfc8785.dumps(
            {**{k: v for k, v in e.items() if k != "hash"}, "prev_hash": prev})).hexdigest()
        prev = e["hash"]
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in envs))
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith("item_order 2: ")
    badge = _verify_file(demo_web, page, f, "bad")
    why = "item_order is written 2.0, not as an integer" if "item_order" in edit else "not an envelope"
    assert "chain broken at #2: " in badge and why in badge, badge
    assert page.get_attribute(".row[data-order='1'] .vmark", "class") == "vmark ok"


@pytest.mark.parametrize("how", ["byte order mark", "no-break space line", "not UTF-8"])
def test_a_file_read_as_convlog_replay_reads_it(demo_web: Demo, page: Any, tmp_path: Path, how: str) -> None:
    """/verify read the file with file.text(): a leading byte order mark was dropped, a line of
    U+00A0 (or U+2028, U+FEFF) skipped as blank, and a byte that is no UTF-8 read as U+FFFD
    and hashed as such, so the page said "chain intact" where `convlog replay --verify`
    refuses that line."""
    import hashlib

    import rfc8785

    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    lines = [x for x in real.splitlines() if b'"signed_head"' not in x]
    if how == "byte order mark":
        body, order = b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n", 1
    elif how == "no-break space line":
        body, order = b"\n".join([*lines[:3], "\u00a0".encode(), *lines[3:]]) + b"\n", 4
    else:  # an item whose text held U+FFFD, chained again, the character written as the byte 0xff
        envs = [json.loads(x) for x in lines]
        envs[1]["data"]["note"] = "\ufffd"
        prev = "0" * 64
        for e in envs:
            e["hash"] = hashlib.sha256(rfc8785.dumps(
                {**{k: v for k, v in e.items() if k != "hash"}, "prev_hash": prev})).hexdigest()
            prev = e["hash"]
        body = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in envs)
        assert body.count("\ufffd".encode()) == 1
        body, order = body.replace("\ufffd".encode(), b"\xff"), 2
    f = tmp_path / "export.jsonl"
    f.write_bytes(body)
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith(f"item_order {order}: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert f"chain broken at #{order}" in badge, badge
    if how != "not UTF-8":  # the session page, from a server that sends the same bytes, says the same
        page.route("**/export.jsonl", lambda route: route.fulfill(
            status=200, content_type="application/jsonl", body=body))
        page.route("**/live?*", lambda route: route.abort())
        page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}")
        assert f"chain broken at #{order}" in wait_badge(page, "bad")

def test_older_clicked_twice_before_the_page_comes_moves_one_page(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """A double click on "Older →" (the second click before the next page has come)
    moves one page, not one page shown under the numbers of the next: the rows and
    "51–100 of N" agree, and "← Newer" goes back to the first page."""
    for k in range(120):
        log.run(log.client.append(f"pg-{k:03d}", [said("Triage", "x")]))
    page.goto(demo_web.url + "/")
    page.fill("#prefix", "pg-")
    page.wait_for_function("document.getElementById('total').textContent === '120 sessions' && "
                           "document.querySelector('tr[data-sid]').dataset.sid === 'pg-119'")
    held: list[Any] = []
    page.route("**/api/sessions?*cursor=*", lambda route: held.append(route))
    page.dblclick("#older")
    page.wait_for_timeout(300)
    for route in held:
        route.continue_()
    page.wait_for_function("document.querySelector('tr[data-sid]').dataset.sid === 'pg-069' && "
                           "document.getElementById('message').textContent === ''")
    assert page.text_content("#page-info") == "51–100 of 120"
    page.click("#newer")
    page.wait_for_function("document.querySelector('tr[data-sid]').dataset.sid === 'pg-119' && "
                           "document.getElementById('message').textContent === ''")
    assert page.text_content("#page-info") == "1–50 of 120"
    assert page.is_disabled("#newer")


def test_a_second_file_replaces_the_first_on_the_verify_page(demo_web: Demo, log: LoopThread, page: Any,
                                                             tmp_path: Path) -> None:
    """/verify keeps no row, lane or open item of the file checked before: a second file
    whose items only ``system`` wrote showed the first file's rows (their content, under
    the second file's badge) and its agent lanes (``#2`` stays selected: the new file's); a second file that is no JSONL at all
    left the first file's rows too, and updating their marks threw."""
    first = tmp_path / "first.jsonl"
    first.write_bytes(page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body())
    log.run(log.client.append("sys-only-1", [said("system", f"note {k}") for k in range(3)]))
    second = tmp_path / "second.jsonl"
    second.write_bytes(page.request.get(f"{demo_web.url}/sessions/sys-only-1/export.jsonl").body())
    assert len(second.read_bytes().splitlines()) == 3

    _verify_file(demo_web, page, first, "good")
    page.wait_for_selector(".row")
    page.click(".row[data-order='2']")
    assert not page.is_hidden("#detail")
    page.set_input_files("#file", str(second))
    page.wait_for_function("document.querySelector('#badge').textContent.includes('chain intact through #3')")
    page.wait_for_timeout(300)
    assert lane_names(page) == ["user", "system"]
    cards = page.eval_on_selector_all(".row .card", "els => els.map(e => [e.dataset.agent, e.textContent])")
    assert [a for a, _ in cards] == ["system"] * 3, cards
    assert all(f"note {k}" in text for k, (_, text) in enumerate(cards)), cards
    assert page.text_content("#detail h2").startswith("#2 · system · "), page.text_content("#detail h2")

    page.set_input_files("#file", str(first))
    wait_badge(page, "good")
    not_json = tmp_path / "notes.txt"
    not_json.write_bytes(b"not an export\n")
    page.set_input_files("#file", str(not_json))
    wait_badge(page, "bad")
    page.wait_for_timeout(300)
    assert page.eval_on_selector_all(".row", "els => els.length") == 0


def test_an_export_line_naming_an_unreadable_envelope_breaks_the_chain_there(
        demo_web: Demo, page: Any, tmp_path: Path) -> None:
    """The console's export of a log edited by hand holds, where a stored envelope does
    not decode, a line naming its order: /verify and the session page break the chain
    there, as `convlog replay --file --verify` does (the export's own test is in
    test_console_http.py; this one checks that the browser names that line)."""
    real = page.request.get(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}/export.jsonl").body()
    lines = real.splitlines()
    lines[2] = b'{"item_order":3,"unreadable":"the stored envelope does not decode: malformed JSON"}'
    f = tmp_path / "export.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    assert (_python_verdict(f, ESCALATION_SESSION_ID) or "").startswith("item_order 3: ")
    badge = _verify_file(demo_web, page, f, "bad")
    assert "chain broken at #3: not an envelope" in badge, badge
    assert page.get_attribute(".row[data-order='2'] .vmark", "class") == "vmark ok"

    page.route("**/export.jsonl", lambda route: route.fulfill(
        status=200, content_type="application/jsonl", body=f.read_bytes()))
    page.route("**/live?*", lambda route: route.abort())
    page.goto(f"{demo_web.url}/sessions/{ESCALATION_SESSION_ID}")
    badge = wait_badge(page, "bad")
    assert "chain broken at #3: not an envelope" in badge, badge
    assert page.get_attribute(".row[data-order='4'] .vmark", "class") != "vmark ok"  # the rest is shown


def test_the_agents_of_long_sessions_complete_without_a_click(demo_web: Demo, log: LoopThread, page: Any) -> None:
    """A listing scans long sessions for their agents within a shared budget (10,000
    envelopes) and marks the rows not scanned to their end "…"; the next listings scan
    on, but the page never listed again by itself: the agents stayed short (the last
    agent of each session missing) until the reviewer clicked Refresh.  The page now
    lists again while a row is so marked: the agents complete with no click, the rows
    are replaced without a "loading…" in between, and the filter, the page and the
    focused row's link stay."""
    n, long = 3, 4_000  # 12,000 envelopes: a first listing scans 3,333 of each
    for k in range(n):
        items = [said("Triage", "hi")] + [said("user", f"m{i}") for i in range(long - 2)] + [said(f"Closer{k}", "bye")]
        log.run(log.client.append(f"scan-{k}", items))
    # The page's first listing (all sessions) is not let through: it would scan them too.
    page.route(lambda url: url.endswith("/api/sessions?limit=50"), lambda route: route.abort())
    page.goto(demo_web.url + "/")
    page.wait_for_selector("text=Could not list sessions")
    listings: list[str] = []
    page.on("request", lambda r: listings.append(r.url) if "/api/sessions?" in r.url else None)
    page.evaluate(HIDDEN_TAB)  # the tab is hidden (until window.__show(true))
    page.fill("#prefix", "scan-")
    page.wait_for_function("document.getElementById('page-info').textContent === '1–3 of 3' && "
                           "document.getElementById('message').textContent === ''")
    partial = page.eval_on_selector_all('tr[data-sid] td:last-child', "els => els.map(e => e.textContent)")
    assert partial == ["Triage…"] * n, partial  # the first listing's budget: not to their ends
    # Hidden, the tab does not list again; shown, it does.
    page.wait_for_timeout(1_500)
    assert len(listings) == 1, listings
    assert page.eval_on_selector_all('tr[data-sid] td:last-child', "els => els.map(e => e.textContent)") == partial
    page.focus('tr[data-sid="scan-1"] a')
    page.evaluate("""() => {
      window.__loading = 0;
      new MutationObserver(() => { if (document.getElementById('message').textContent) window.__loading++; })
        .observe(document.getElementById('message'), { childList: true, characterData: true, subtree: true });
    }""")
    page.evaluate("window.__show(true)")
    page.wait_for_function("[...document.querySelectorAll('tr[data-sid] td:last-child')]"
                           ".every(e => /^TriageCloser\\d$/.test(e.textContent))", timeout=8_000)
    assert page.evaluate("window.__loading") == 0  # no "loading…" flashed
    assert page.input_value("#prefix") == "scan-"
    assert page.text_content("#page-info") == "1–3 of 3"
    assert page.evaluate("document.activeElement.closest('tr')?.dataset.sid") == "scan-1"
