"""The HTML cost report: its content on both backends, and a real browser
(Debian's headless Chromium) drawing it."""
import datetime
import os
import pathlib
import shutil
import struct
import subprocess
import zlib
from html import escape

import pytest
from click.testing import CliRunner

import psai
from psai import PsAgent, PsModelUsageItem
from psai.cli import cli
from psai._demo import seed
from psai.report import PALETTE, _money, html
from psai.reports import cost_reports

from conftest import IN_CI, make_backend

ROOT = pathlib.Path(__file__).resolve().parent.parent


def spread_over_days(clock, days=5):
    """The demo's calls ``days`` days ago, and more on each day since,
    recorded on those days (the clock moved, nothing backdated)."""
    today = clock().replace(hour=12, minute=0, second=0, microsecond=0)
    clock.set(today - datetime.timedelta(days=days - 1))
    models, agents, _ = seed()
    plan = [("Researcher", "OpenAI GPT-4 Large"), ("Writer", "Anthropic Claude Sonnet"),
            ("Summarizer", "Anthropic Claude Haiku"), ("Writer", "Google Gemini Pro")]
    for day in range(1, days):
        clock.set(today - datetime.timedelta(days=days - 1 - day))
        for index, (agent, model) in enumerate(plan):
            psai.record_usage(models[model], agents[agent], tokens_in=20_000 * (day + index), tokens_out=2_000 * day)
    return models, agents


def test_the_page_shows_totals_charts_trees_and_unpriced_usage(db, clock):
    models, agents = spread_over_days(clock)
    # A call whose stored prices are unusable (as another tool may write one): called out, never 0.
    psai.record_usage(models["OpenAI GPT-4o mini"], agents["Writer"], tokens_in=777, tokens_out=0)
    item = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).get()
    data = dict(item.data, pricing=dict(item.data["pricing"], configuredPrices={"currency": "USD"}))
    # Written by another tool: a row of its own, a moment later (the same moment would be an edit in
    # place to the rollups' check on PostgreSQL, what `psai rollup verify` finds: test_rollups).
    moment = item.created_at + datetime.timedelta(microseconds=1)
    PsModelUsageItem.insert(user_id=item.user_id, model_id=item.model_id, agent_id=item.agent_id,
                            connector_id=item.connector_id, created_at=moment, updated_at=moment,
                            data=data).execute()
    PsModelUsageItem.delete().where(PsModelUsageItem.id == item.id).execute()
    page = html("agent", database="postgresql://me:sekr1t@db.example:5432/ps")
    total = sum(r["cost"] for r in psai.cost_report("model") if r["cost"] is not None)
    assert "%s USD" % "{:,.2f}".format(total) in page
    assert "Cost per day (USD), by model" in page and page.count("<rect ") >= 5 * 3
    assert "Anthropic Claude Sonnet" in page and "Google Gemini Pro" in page
    # The tree: the Writer's row holds its sub-agent's cost too.
    tree = {r["agent_name"]: r for r in psai.cost_report("tree") if r["currency"] == "USD"}
    alone = {r["agent_name"]: r for r in psai.cost_report("agent") if r["currency"] == "USD"}
    assert tree["Writer"]["cost"] == alone["Writer"]["cost"] + alone["Summarizer"]["cost"]
    assert "\u2003Summarizer" in page
    assert "Unpriced usage" in page and "777" in page
    assert "sekr1t" not in page and "postgresql://me:***@db.example:5432/ps" in page
    # Self-contained: nothing to fetch, nothing to run.
    for marker in ("<script", "http://", "https://", "@import", "url("):
        assert marker not in page, marker
    assert "prefers-color-scheme: dark" in page and "@media print" in page


def test_report_html_from_the_command_line(db, backend, tmp_path):
    seed()
    out = tmp_path / "report.html"
    result = CliRunner().invoke(cli, ["--database", backend.url, "usage", "report", "--by", "tree",
                                      "--since", "2020-01-01", "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "By tree" in page and "from 2020-01-01" in page and "TOTAL" in result.stdout
    assert "Database: %s " % escape(psai.redact_url(backend.url)) in page
    bad = CliRunner().invoke(cli, ["--database", backend.url, "usage", "report", "--html",
                                   str(tmp_path / "missing" / "r.html")])
    assert bad.exit_code == 1 and not (tmp_path / "missing").exists()


def test_demo_shows_selection_cost_and_the_page(backend, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = backend.url
    first = CliRunner().invoke(cli, ["--database", url, "demo"])
    assert first.exit_code == 0, first.output
    lines = first.stdout.splitlines()
    assert len(lines) < 20
    assert any("Summarizer" in line and "falls back to small" in line for line in lines)
    assert any(line.startswith("TOTAL") for line in lines) and "recorded 6 calls" in first.stdout
    assert lines[-1] == "report page: %s" % (tmp_path / "psai-report.html")
    again = CliRunner().invoke(cli, ["--database", url, "demo"])
    assert again.exit_code == 0
    total = [line for line in lines if line.startswith("TOTAL")]
    assert total == [line for line in again.stdout.splitlines() if line.startswith("TOTAL")]  # nothing doubled
    psai.connect(url)
    assert (psai.PsAiModel.select().count(), PsAgent.select().count(), PsModelUsageItem.select().count()) == (5, 3, 6)


# -- whose the calls were ---------------------------------------------------------------------------

def attributed_calls(clock, sessions=20):
    """Calls of two users over ``sessions`` sessions, tagged by team (and some by env), on two days;
    plus one call with none of it."""
    models, agents, _ = seed()
    clock.set(clock() - datetime.timedelta(days=1))
    for number in range(sessions):
        if number == sessions // 2:
            clock.set(clock() + datetime.timedelta(days=1))
        tags = {"team": ("search", "ads")[number % 2]}
        if number % 3 == 0:
            tags["env"] = "prod"
        psai.record_usage(models["OpenAI GPT-4 Large"], agents["Writer"], tokens_in=1000 * (number + 1),
                          tokens_out=100, user=("alice", "bob")[number % 2], session="s%02d" % number, tags=tags)
    psai.record_usage(models["OpenAI GPT-4 Large"], None, tokens_in=5, tokens_out=1)
    return models, agents


@pytest.mark.parametrize("rolled_up", [True, False])
def test_cost_reports_groups_and_filters_by_attribution_as_cost_report(db, clock, rolled_up):
    attributed_calls(clock)
    if not rolled_up:
        psai.rollups.disable(db)
    groupings = ["model", "tree", "user", "session", "tag:team", "tag:env", "agent,model", "tag:team,model",
                 "day,user"]
    for filters in ({}, {"user": "alice"}, {"tags": {"env": "prod"}, "agent": "Writer"},
                    {"session": "s03", "provider": "openai"}):
        reports, daily = cost_reports(groupings, **filters)
        for by in groupings:
            assert reports[by] == psai.cost_report(by, **filters), (by, filters)
        assert sum(row["calls"] for row in daily) == sum(row["calls"] for row in reports["model"])
    assert psai.reports.attribution_kinds() == ["session", "tag:env", "tag:team", "user"]


def test_the_kinds_of_attribution_are_those_of_the_period_from_the_ledger_or_the_items(db, clock):
    models, agents = attributed_calls(clock, sessions=3)
    yesterday = (clock() - datetime.timedelta(days=1)).date()
    psai.record_usage(models["OpenAI GPT-4 Large"], None, tokens_in=5, tokens_out=1, tags={"stage": "beta"})
    # A key written by hand that reports cannot name is left out, as is a value that is not text.
    item = PsModelUsageItem.select().order_by(PsModelUsageItem.id.desc()).get()
    item.data = dict(item.data, psai={"tags": {"stage": "beta", "not a key": "x", "n": 5}})
    item.save()
    kinds = psai.reports.attribution_kinds
    every = kinds()
    assert every == ["session", "tag:env", "tag:stage", "tag:team", "user"]
    assert kinds(until=yesterday) == ["session", "tag:env", "tag:team", "user"]
    assert kinds(since=yesterday, until=yesterday) == ["session", "tag:env", "tag:team", "user"]
    psai.rollups.disable(db)
    assert kinds() == every
    assert kinds(since=clock().date()) == ["session", "tag:stage", "tag:team", "user"]
    clock.set(clock() + datetime.timedelta(days=1))
    psai.record_usage(models["OpenAI GPT-4 Large"], None, tokens_in=5, tokens_out=1, session="s")
    assert kinds(since=clock().date()) == ["session"]
    assert kinds(since=clock().date() + datetime.timedelta(days=1)) == []


def test_the_page_shows_the_cost_by_user_session_and_tag(db, clock):
    attributed_calls(clock)
    page = html("model")
    users = {row["user"]: row["cost"] for row in psai.cost_report("user")}
    assert "<h2>Top users</h2>" in page and "<h2>Top sessions</h2>" in page
    assert "<h2>By tag env</h2>" in page and "<h2>By tag team</h2>" in page
    for user in ("alice", "bob"):
        assert "<td>%s</td>" % user in page and "%s USD" % _money(users[user]) in page
    assert "no user" in page  # the call without one
    assert "6 more not shown" in page and "--by session" in page  # 20 sessions and the calls without one: 15 shown
    top = max((row for row in psai.cost_report("session") if row["session"]), key=lambda row: row["cost"])
    assert "<td>%s</td>" % top["session"] in page
    only_team = html("user", tag_keys=["team"])
    assert "<h2>By tag team</h2>" in only_team and "By tag env" not in only_team and "<h2>By user</h2>" in only_team
    # Filtered: only alice's calls, said under the title, in every section.
    alice = html("tag:team,model", user="alice", tags={"team": "search"})
    [total] = [row["cost"] for row in psai.cost_report("model", user="alice", tags={"team": "search"})]
    assert "Only user alice" in alice and "Only tag team = search" in alice
    assert 'id="total-USD">%s USD' % _money(total) in alice and "<td>bob</td>" not in alice
    assert "<h2>By tag:team,model</h2>" in alice and "<th class=\"\">tag</th>" in alice
    # A store whose calls carry no attribution: no such sections.
    PsModelUsageItem.delete().where(PsModelUsageItem.data.is_null(False)).execute()
    plain = html("model")
    assert "Top users" not in plain and "By tag" not in plain


# -- in a browser --------------------------------------------------------------------------------

def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        message = "Debian's chromium is needed for the browser test (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message + "; with CI=true this is a failure, not a skip")
        pytest.skip(message)
    return found


def headless(binary, profile, *args):
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", "--user-data-dir=%s" % profile, *args],
                          capture_output=True, text=True, timeout=120)


def png_pixels(path):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA PNG."""
    data = pathlib.Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, [], None
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0
    channels = 3 if color == 2 else 4
    raw, stride, rows, previous = zlib.decompress(b"".join(chunks)), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        previous = line
    return width, height, rows


def test_a_browser_draws_the_chart(tmp_path, clock):
    """One browser run, on SQLite: the page's content on both backends is tested above."""
    binary = chromium()
    store = make_backend("sqlite", tmp_path)
    store.connect()
    psai.migrate()
    spread_over_days(clock)
    page = tmp_path / "report.html"
    page.write_text(html("tree", database="sqlite:///psai.db"))
    dom = headless(binary, tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    total = sum(r["cost"] for r in psai.cost_report("model") if r["cost"] is not None)
    assert "%s USD" % "{:,.2f}".format(total) in dom.stdout  # the total's text, as the browser has it
    shot = tmp_path / "report.png"
    result = headless(binary, tmp_path / "profile-shot", "--window-size=1200,1500", "--screenshot=%s" % shot,
                      page.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1200, 1500)
    first_series = tuple(int(PALETTE[0][i:i + 2], 16) for i in (1, 3, 5))
    painted = sum(row.count(first_series) for row in rows)
    assert painted > 2000, painted  # the bars of the first model, drawn
    background = rows[5][5]
    assert sum(1 for row in rows[:height // 2] for pixel in row if pixel != background) > 20_000  # not blank
    if os.environ.get("PSAI_WRITE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "report.png")  # `make docs` refreshes the README's picture
    store.close()
