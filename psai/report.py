"""A cost report to look at: one self-contained HTML page with charts.

``html(by="model", since=None, until=None)`` returns the page: totals per
currency, unpriced usage called out, cost over time by day stacked by model,
the agent trees (a parent with its sub-agents), top models and agents, and
the table of the requested grouping. Charts are inline SVG: the page needs
no network, no script and no font of its own, reads the same with
JavaScript off, follows the reader's light or dark setting and prints.
"""
import datetime
import json
from decimal import Decimal
from html import escape
from collections.abc import Iterable
from typing import cast

from .budget import budget_status, budgets
from .db import describe_database, redact_url
from .fields import utcnow
from .models import AgentRef, ModelRef
from .reports import CostRow, attribution_kinds, cost_reports, one_snapshot
from .usage import report_totals

__all__ = ["html", "describe_database"]

# Tableau 10: distinguishable in light and dark, and in print.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
OTHER = "other models"
TOP = 8
# Rows shown of the cost by user, session and tag value (there may be thousands of sessions).
ATTRIBUTION_ROWS = 15

STYLE = """
:root { color-scheme: light dark; --fg: #1d2329; --muted: #5c6670; --bg: #ffffff; --panel: #f4f6f8;
  --line: #d5dbe1; --warn: #b54708; --warn-bg: #fff4e5; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6e9ec; --muted: #9aa5b1; --bg: #15191d; --panel: #1f252b; --line: #36404a;
    --warn: #fdb022; --warn-bg: #3a2a0c; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 24px; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.meta { color: var(--muted); margin: 0 0 16px; }
.totals { display: flex; flex-wrap: wrap; gap: 12px; }
.total { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
         min-width: 180px; }
.total .amount { font-size: 26px; font-weight: 600; } .total .label { color: var(--muted); font-size: 13px; }
.warn { background: var(--warn-bg); border: 1px solid var(--warn); color: var(--fg); border-radius: 8px;
  padding: 10px 14px; margin: 14px 0; } .warn strong { color: var(--warn); }
svg { display: block; max-width: 100%; height: auto; } svg text { fill: var(--fg); font-size: 12px; }
svg .grid { stroke: var(--line); } svg .axis { fill: var(--muted); }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 6px 0 0; font-size: 13px; }
.legend span::before { content: ""; display: inline-block; width: 11px; height: 11px; margin-right: 6px;
  border-radius: 2px; background: var(--swatch); vertical-align: -1px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: middle; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.bar { height: 10px; border-radius: 2px; background: #4e79a7; print-color-adjust: exact;
       -webkit-print-color-adjust: exact; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 24px; }
.unpriced { color: var(--warn); }
.gauge { position: relative; height: 12px; border-radius: 3px; background: var(--panel); border: 1px solid var(--line);
  print-color-adjust: exact; -webkit-print-color-adjust: exact; }
.gauge .spent { height: 100%; border-radius: 2px; background: #59a14f; }
.gauge .spent.warning { background: #edc948; } .gauge .spent.exceeded { background: #e15759; }
.gauge .spent.unknown { background: #bab0ac; }
.gauge .mark { position: absolute; top: -3px; bottom: -3px; width: 2px; background: var(--fg); }
@media print { body { max-width: none; padding: 0; } .total, .warn { break-inside: avoid; }
  section { break-inside: avoid; } }
"""


def _money(value):
    if value is None:
        return "unpriced"
    value = Decimal(value)
    return "{:,.2f}".format(value) if abs(value) >= 1 else "{:,.4f}".format(value)


def _axis(value):
    """An axis label: as few digits as the round value needs (0.5, 2.5, 1,000), never 0.5000."""
    value = Decimal(value).normalize()
    return "{:,}".format(int(value)) if value == value.to_integral_value() else "{:,f}".format(value)


def _number(value):
    return "{:,}".format(value)


def _nice_ceiling(value):
    """A round axis top at or above ``value``."""
    if value <= 0:
        return Decimal(1)
    exponent = Decimal(10) ** (len(str(int(value))) - 1) if value >= 1 else Decimal("0.0001")
    while exponent * 10 < value:
        exponent *= 10
    for step in (1, 2, 2.5, 5, 10):
        top = exponent * Decimal(str(step))
        if top >= value:
            return top
    return exponent * 10


def _daily_chart(days, series, values, currency):
    """Stacked bars: one per day, a segment per series; ``values[(day, name)]``."""
    width, height, left, bottom, top_pad = 960, 300, 70, 40, 12
    plot_w, plot_h = width - left - 10, height - bottom - top_pad
    totals = {day: sum((values.get((day, name)) or Decimal(0) for name in series), Decimal(0)) for day in days}
    top = _nice_ceiling(max(totals.values(), default=Decimal(0)))
    slot = plot_w / max(len(days), 1)
    bar = max(min(slot * 0.7, 48), 2)
    out = ['<svg viewBox="0 0 %d %d" width="%d" height="%d" role="img" aria-label="Cost per day in %s, by model">'
           % (width, height, width, height, escape(currency or ""))]
    for i in range(5):
        y = top_pad + plot_h - plot_h * i / 4
        out.append('<line class="grid" x1="%d" x2="%d" y1="%.1f" y2="%.1f"/>' % (left, width - 10, y, y))
        out.append('<text class="axis" x="%d" y="%.1f" text-anchor="end">%s</text>'
                   % (left - 6, y + 4, escape(_axis(top * i / 4))))
    label_every = max(1, int(len(days) / 12) + 1) if len(days) > 14 else 1
    for index, day in enumerate(days):
        x = left + slot * index + (slot - bar) / 2
        y = top_pad + plot_h
        for position, name in enumerate(series):
            value = values.get((day, name))
            if not value:
                continue
            h = float(value / top) * plot_h
            y -= h
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s">'
                       '<title>%s, %s: %s %s</title></rect>'
                       % (x, y, bar, max(h, 0.5), PALETTE[position % len(PALETTE)], escape(day), escape(name),
                          escape(_money(value)), escape(currency or "")))
        if index % label_every == 0:
            out.append('<text class="axis" x="%.1f" y="%d" text-anchor="middle">%s</text>'
                       % (left + slot * index + slot / 2, height - bottom + 16, escape(day[5:])))
    out.append("</svg>")
    legend = "".join('<span style="--swatch:%s">%s</span>' % (PALETTE[i % len(PALETTE)], escape(name))
                     for i, name in enumerate(series))
    return "".join(out) + '<div class="legend">%s</div>' % legend


def _bar_table(rows, label, limit=10):
    """Rows of (name as HTML, cost, currency) as a table with inline bars."""
    rows = rows[:limit]
    peak = max((r[1] for r in rows if r[1] is not None), default=Decimal(0)) or Decimal(1)
    body = []
    for name, cost, currency in rows:
        share = float(cost / peak) * 100 if cost is not None else 0
        body.append('<tr><td>%s</td><td style="width:40%%"><div class="bar" style="width:%.1f%%"></div></td>'
                    '<td class="num%s">%s %s</td></tr>'
                    % (name, share, "" if cost is not None else " unpriced", escape(_money(cost)),
                       escape(currency or "")))
    if not body:
        body.append('<tr><td colspan="3">no usage</td></tr>')
    return ('<table><thead><tr><th>%s</th><th></th><th class="num">cost</th></tr></thead><tbody>%s</tbody></table>'
            % (escape(label), "".join(body)))


def _text(value: object) -> str:
    """A stored value as text to show (then escaped): a string as it is, any
    other JSON value as JSON, so a name stored as a number is shown, never a
    crash."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def _given(value):
    return value is not None and value != ""


def _model_name(row):
    return _text(row["model_name"]) if _given(row["model_name"]) else "model %s" % row["model_id"]


def _agent_name(row):
    if _given(row["agent_name"]):
        return _text(row["agent_name"])
    return "no agent" if row["agent_id"] is None else "agent %s" % row["agent_id"]


def _by_cost(rows):
    return sorted(rows, key=lambda r: (r["cost"] is None, -(r["cost"] or 0)))


def _unpriced_note(rows):
    """The unpriced usage of model rows, called out."""
    if not rows:
        return ""
    lines = "".join("<li>%s: %s tokens (%s)</li>" % (escape(_model_name(r)), _number(r["unpriced_tokens"]),
                                                     escape(r["unpriced_reason"] or "no usable prices"))
                    for r in rows)
    total = sum(r["unpriced_tokens"] for r in rows)
    return ('<div class="warn"><strong>Unpriced usage: %s tokens</strong> could not be priced and are '
            'not in the totals (never counted as 0).<ul>%s</ul></div>' % (_number(total), lines))


def _period(since, until):
    def text(value):
        return value.isoformat() if isinstance(value, (datetime.date, datetime.datetime)) else str(value)
    if since is None and until is None:
        return "all recorded usage"
    if since is None:
        return "up to %s" % text(until)
    if until is None:
        return "from %s" % text(since)
    return "%s to %s" % (text(since), text(until))


KEY_COLUMNS = {"model": ["model_id", "model_name", "provider"], "agent": ["agent_id", "agent_name"],
               "tree": ["level", "agent_id", "agent_name"], "provider": ["provider"], "day": ["day"],
               "user": ["user"], "session": ["session"]}


def _table(rows, by):
    keys: list[str] = []
    for grouping in by.split(","):  # a cross grouping's keys, each once
        keys += [key for key in KEY_COLUMNS.get(grouping.strip(), ["tag"]) if key not in keys]
    columns = keys + ["calls", "tokens_in", "tokens_out", "cost", "currency", "unpriced_tokens", "priced_from"]
    numeric = {"calls", "tokens_in", "tokens_out", "cost", "unpriced_tokens", "model_id", "agent_id", "level"}
    head = "".join('<th class="%s">%s</th>' % ("num" if c in numeric else "", escape(c)) for c in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "cost":
                text = _money(value)
            elif column in numeric and isinstance(value, int):
                text = _number(value)
            else:
                text = "" if value is None else _text(value)
            if column == "agent_name" and by == "tree":
                text = "\u2003" * (row.get("level") or 0) + text
            cells.append('<td class="%s">%s</td>' % ("num" if column in numeric else "", escape(text)))
        body.append("<tr>%s</tr>" % "".join(cells))
    return "<table><thead><tr>%s</tr></thead><tbody>%s</tbody></table>" % (head, "".join(body))


def _budgets_section():
    """Each budget's spending this period against its limit, its thresholds
    marked (empty when there are no budgets)."""
    rows = {budget.name: budget for budget in budgets()}
    if not rows:
        return ""
    body = []
    for status in budget_status():
        budget = rows.get(status["budget"])
        if budget is None:  # set between the two reads
            continue
        limit, spent = status["limit"], status["spent"]
        if limit is None or spent is None:  # invalid: nothing is measured against it
            body.append('<tr><td>%s</td><td colspan="4">%s</td><td class="unpriced">invalid</td></tr>' % (
                escape(str(budget.name)), escape(str(status["problem"]))))
            continue
        share = min(float(spent / limit), 1.0) * 100
        marks = "".join('<div class="mark" style="left:%.1f%%" title="%s%%"></div>' % (
            float(fraction) * 100, escape(format(Decimal(repr(fraction)) * 100, "f"))) for fraction in budget.warn_at)
        start, end = status["period_start"], status["period_end"]  # both None for a total budget
        period = "total" if start is None or end is None else "%s to %s" % (
            start.strftime("%Y-%m-%d %H:%M"), end.strftime("%Y-%m-%d %H:%M %Z"))
        forecast = "" if status["forecast"] is None else "%s %s" % (_money(status["forecast"]), status["currency"])
        gauge = '<div class="gauge"><div class="spent %s" style="width:%.1f%%"></div>%s</div>' % (
            escape(status["state"]), share, marks)
        state = escape(status["state"]) + ("" if budget.hard else " (soft)")
        body.append('<tr><td>%s</td><td style="width:30%%">%s</td><td class="num">%s of %s %s</td>'
                    '<td class="num">%s</td><td>%s</td><td class="%s">%s</td></tr>' % (
                        escape(str(budget.name)), gauge, escape(_money(spent)), escape(_money(limit)),
                        escape(status["currency"]), escape(forecast), escape(period),
                        "unpriced" if status["state"] in ("exceeded", "unknown") else "", state))
    return ('<section><h2>Budgets this period</h2><table><thead><tr><th>budget</th><th>spent against the limit '
            '(thresholds marked)</th><th class="num">spent</th><th class="num">forecast</th><th>period</th>'
            '<th>state</th></tr></thead><tbody>%s</tbody></table></section>' % "".join(body))


def _attribution_sections(reports):
    """The cost by user, by session and by each tag key (the top rows of
    each), of the groupings in ``reports``: a section for each that some call carries."""
    sections = []
    tags = [by for by in sorted(reports) if by.startswith("tag:") and "," not in by]
    for by, label, heading in [("user", "user", "Top users"), ("session", "session", "Top sessions")] + [
            (by, "tag " + by[4:], "By tag %s" % by[4:]) for by in tags]:
        rows = reports.get(by, [])
        column = "tag" if by.startswith("tag:") else by
        if not any(row[column] is not None for row in rows):
            continue
        named = [(escape(_text(row[column])) if row[column] is not None else
                  '<span class="meta">no %s</span>' % escape(label), row["cost"], row["currency"])
                 for row in _by_cost(rows)]
        more = len(named) - ATTRIBUTION_ROWS
        sections.append('<section><h2>%s</h2>%s%s</section>' % (
            escape(heading), _bar_table(named, label, limit=ATTRIBUTION_ROWS),
            '<p class="meta">%s more not shown (<code>psai usage report --by %s</code> lists them all)</p>'
            % (_number(more), escape(by)) if more > 0 else ""))
    return "".join(sections)


@one_snapshot
def html(by: str = "model", *, since: datetime.date | str | None = None, until: datetime.date | str | None = None,
         rows: list[CostRow] | None = None, database: str | None = None,
         title: str = "psai cost report", agent: AgentRef | None = None, model: ModelRef | None = None,
         provider: str | None = None, user: str | None = None, session: str | None = None,
         tags: dict[str, str] | None = None, tag_keys: Iterable[str] | None = None) -> str:
    """The report page for usage in [since, until), its table grouped ``by``
    (any ``cost_report`` grouping, a cross one too); ``rows``, when given,
    are that grouping's ``cost_report`` rows already made. ``database`` is
    shown as where the data came from (default: the database in use, no
    password). ``agent``, ``model``, ``provider``, ``user``, ``session``,
    ``tags``: only that usage (``cost_report``'s filters), said under the
    title. The page has the cost by user, by session (the top ones) and by
    each tag key in ``tag_keys`` (default: every key the period's calls
    carry, ``reports.attribution_kinds``), each when some call carries one."""
    # The kinds of attribution the period's calls carry (only those are read), or the tag keys named.
    kinds = [kind for kind in attribution_kinds(since=since, until=until)
             if kind in ("user", "session") or tag_keys is None and kind.startswith("tag:")]
    kinds += ["tag:" + key for key in tag_keys or ()]
    # Every section from one read of the priced groups (and one of each kind of attribution).
    filters: dict[str, object] = {"agent": agent, "model": model, "provider": provider, "user": user,
                                  "session": session}
    filters.update({"tag %s =" % key: value for key, value in sorted((tags or {}).items())})
    reports, daily = cost_reports(sorted({"model", "agent", "tree", by} | set(kinds)), since=since, until=until,
                                  agent=agent, model=model, provider=provider, user=user, session=session, tags=tags)
    rows = rows if rows is not None else reports[by]
    by_model, by_agent, trees = reports["model"], reports["agent"], reports["tree"]
    totals = report_totals(by_model, "model")

    parts = ['<!doctype html><html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             "<title>%s</title><style>%s</style></head><body>" % (escape(title), STYLE),
             "<h1>%s</h1>" % escape(title),
             '<p class="meta">Period: %s%s · Database: %s · Made %s by psai</p>' % (
                 escape(_period(since, until)), "".join(" · Only %s %s" % (name, escape(str(value)))
                                                        for name, value in filters.items() if value is not None),
                 escape(redact_url(database) if database else describe_database()),
                 escape(utcnow().strftime("%Y-%m-%d %H:%M UTC")))]

    parts.append('<section><h2>Total</h2><div class="totals">')
    priced = {currency: total for currency, total in totals.items() if currency is not None}
    for currency, total in sorted(priced.items()):
        parts.append('<div class="total"><div class="amount" id="total-%s">%s %s</div><div class="label">%s calls, '
                     '%s tokens in, %s out</div></div>' % (escape(currency), escape(_money(total["cost"])),
                                                           escape(currency), _number(total["calls"]),
                                                           _number(total["tokens_in"]), _number(total["tokens_out"])))
    if not priced:
        parts.append('<div class="total"><div class="amount">0</div><div class="label">no priced usage in this '
                     'period</div></div>')
    parts.append("</div>")
    parts.append(_unpriced_note([r for r in by_model if r["unpriced_tokens"]]))
    parts.append("</section>")
    parts.append(_budgets_section())

    for currency in sorted(priced):
        # Rows of daily_costs each have a day; those of priced_days each a cost.
        days = sorted({cast(str, r["day"]) for r in daily if r["currency"] == currency})
        priced_days = [r for r in daily if r["currency"] == currency and r["cost"] is not None]
        per_model: dict[str, Decimal] = {}
        for r in priced_days:
            per_model[_model_name(r)] = per_model.get(_model_name(r), Decimal(0)) + cast(Decimal, r["cost"])
        ranked = sorted(per_model, key=lambda name: -per_model[name])
        series = ranked[:TOP] + ([OTHER] if len(ranked) > TOP else [])
        values: dict[tuple[str | None, str], Decimal] = {}
        for r in priced_days:
            name = _model_name(r) if _model_name(r) in ranked[:TOP] else OTHER
            values[(r["day"], name)] = values.get((r["day"], name), Decimal(0)) + cast(Decimal, r["cost"])
        parts.append('<section><h2>Cost per day (%s), by model</h2>%s</section>'
                     % (escape(currency), _daily_chart(days, series, values, currency)))

    tree_rows = [(("\u2003" * (r["level"] or 0)) + escape(_agent_name(r)),
                  r["cost"], r["currency"]) for r in trees if r["agent_id"] is not None]
    parts.append("<section><h2>Agent trees: each agent with its sub-agents</h2>%s</section>"
                 % _bar_table(tree_rows, "agent (sub-agents indented)", limit=50))
    model_rows = [(escape(_model_name(r)) + (
        ' <span class="meta">%s</span>' % escape(_text(r["provider"])) if _given(r.get("provider")) else ""),
        r["cost"], r["currency"]) for r in _by_cost(by_model)]
    agent_rows = [(escape(_agent_name(r)), r["cost"], r["currency"]) for r in _by_cost(by_agent)]
    parts.append('<div class="cols"><section><h2>Top models</h2>%s</section><section><h2>Top agents</h2>%s'
                 '</section></div>' % (_bar_table(model_rows, "model"), _bar_table(agent_rows, "agent")))
    parts.append(_attribution_sections(reports))
    parts.append("<section><h2>By %s</h2>%s</section>" % (escape(by), _table(rows, by)))
    parts.append("</body></html>\n")
    return "".join(parts)
