"""The ``psai`` command: a thin shell over the library.

Every command calls the same library functions a script would; this module
only parses options, picks an output format and turns errors into one line
on stderr (exit 1 for a failure, 2 for bad usage or bad input).
"""
import csv
import datetime
import errno
import io
import json
import os
import re
import secrets
import stat
import sys
from decimal import Decimal

import click
import peewee

from . import db as dbmod
from .enums import PsAiModelSize, PsAiModelType
from .errors import DatabaseURLError, PsaiError, ValidationError

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_BUDGET_EXCEEDED = 3  # `budgets status`: a hard budget is exceeded


# -- plumbing ------------------------------------------------------------------

def _database_url():
    context = click.get_current_context(silent=True)
    root = context.find_root() if context else None
    return (root.obj or {}).get("database") if root else None


class CommandError(click.ClickException):
    """A user's mistake or an unavailable database: one line on stderr
    ("Error: ..."), never a traceback, and the exit code says which."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it from the instance


class PsaiGroup(click.Group):
    """The root group: psai's errors become a CommandError here, once for
    every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ValidationError, DatabaseURLError) as exc:
            raise CommandError(str(exc), EXIT_BAD_INPUT) from None
        except PsaiError as exc:  # not found, in use, unreachable, not adopted, unpriced (--strict)
            raise CommandError(str(exc), EXIT_FAILURE) from None
        except (peewee.DatabaseError, peewee.InterfaceError) as exc:
            lost = dbmod.connection_lost(exc)
            if not lost and isinstance(exc, peewee.InterfaceError):
                raise  # psai's own misuse of peewee: a bug, shown as one
            raise CommandError("%s: %s" % ("lost the connection to the database" if lost else "database error",
                                           dbmod._scrub(exc, _database_url() or "")), EXIT_FAILURE) from None
        except OSError as exc:
            raise CommandError(str(exc), EXIT_FAILURE) from None


def connect():
    """Connect to the --database URL and bring psai's schema up to date (an
    un-adopted PolicySynth database is used as it is)."""
    from .migrations import ensure_schema
    db = dbmod.connect(_database_url())
    ensure_schema(db)
    return db


def _json_default(value):
    if isinstance(value, Decimal):
        return str(value)  # exact, as PolicySynth's own reports give totals as strings
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError("%r is not JSON serialisable" % (value,))


def json_text(value, **options):
    """JSON as UTF-8-safe text: non-ASCII kept as it is, unless the data
    holds text that is not Unicode (a lone surrogate in an old row), which
    is then written as JSON escapes instead of failing the output."""
    text = json.dumps(value, default=_json_default, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, default=_json_default, ensure_ascii=True, **options)
    return text


def _safe(text):
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# What a terminal acts on or reorders rather than shows: C0 and C1 controls
# (escape sequences, newlines), DEL, the bidi marks, embeddings, overrides and
# isolates, and the line and paragraph separators.
_UNSHOWABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_character(match):
    character = match.group()
    code = ord(character)
    return _ESCAPES.get(character) or ("\\x%02x" % code if code < 0x100 else "\\u%04x" % code)


def shown(value):
    """``value`` as text for the terminal: control and bidi characters
    written as escapes (``\\x1b``, ``\\n``, ``\\u202e``), so a stored name can
    neither drive the terminal nor break a line (a table row, a TOTAL)."""
    return _UNSHOWABLE.sub(_escape_character, _safe(str(value)))


# Cells a spreadsheet would read as a formula (OWASP, "CSV Injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value):
    """Text as a CSV cell: one starting like a formula gets a leading ``'``,
    so a spreadsheet shows it instead of running it; numbers stay numbers."""
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def emit(rows, fmt, columns=None, single=False):
    """Write rows (dicts) as a table, JSON or CSV. ``single`` writes one
    object rather than a list in JSON. JSON is the data exactly; CSV too,
    but for text cells that start like a formula (``csv_text``); a table
    shows control characters escaped (``shown``)."""
    if fmt == "json":
        click.echo(json_text(rows[0] if single else rows, indent=2))
        return
    columns = columns or (list(rows[0]) if rows else [])

    def cell(value):
        if isinstance(value, (dict, list)):
            return json_text(value)
        return "" if value is None else _safe(str(value))

    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        # The csv module quotes a cell holding "\n" but not one holding a lone "\r", which no reader
        # would then read back: such a row has every cell quoted.
        quoting = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
        writer.writerow(columns)
        for row in rows:
            cells = [csv_text(cell(value)) if isinstance(value, str) else cell(value)
                     for value in (row.get(c) for c in columns)]
            (quoting if any("\r" in c for c in cells) else writer).writerow(cells)
        click.echo(out.getvalue(), nl=False, color=True)  # color: click would drop escape sequences, not data
        return
    headings = [shown(c) for c in columns]
    table = [[shown(cell(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in table]) for i, h in enumerate(headings)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headings, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


class JSONNumber(click.ParamType):
    """A number kept as JSON would: 30 stays an int, 2.5 a float."""

    name = "number"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return value
        try:
            return int(value)
        except ValueError:
            pass
        try:
            number = float(value)
        except ValueError:
            self.fail("%r is not a number" % value, param, ctx)
        if number != number or number in (float("inf"), float("-inf")):
            self.fail("%r is not a finite number" % value, param, ctx)
        return number


NUMBER = JSONNumber()
MODEL_TYPES = click.Choice([t.value for t in PsAiModelType])
MODEL_SIZES = click.Choice([s.value for s in PsAiModelSize])


def output_options(command):
    command = click.option("--csv", "fmt", flag_value="csv", help="Write CSV.")(command)
    command = click.option("--json", "fmt", flag_value="json", help="Write JSON.")(command)
    return command


def _read_json(handle, limit=None):
    """Parse an open click.File (a path, or '-' for stdin)."""
    from .schemas import MAX_JSON_DEPTH, load_json
    name = "stdin" if handle.name == "<stdin>" else handle.name
    try:
        text = handle.read()
    except UnicodeDecodeError as exc:
        raise ValidationError({name: ["Not JSON: %s." % exc]}) from None
    return load_json(text, name, limit or MAX_JSON_DEPTH)


class Progress:
    """A progress bar on stderr when it is a terminal, else nothing: pass it
    as the library's ``progress(done, total)`` callback, in a ``with``."""

    def __init__(self, label):
        self.label, self.bar = label, None
        self.enabled = sys.stderr.isatty()

    def __call__(self, done, total):
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


# -- the group ------------------------------------------------------------------

@click.group(cls=PsaiGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database", "database", envvar="PSAI_DATABASE_URL", metavar="URL",
              help="Database URL: sqlite:///path.db or postgresql://user@host:port/db "
                   "(default: $PSAI_DATABASE_URL, else sqlite:///psai.db).")
@click.version_option(package_name="psai")
@click.pass_context
def cli(ctx, database):
    """psai: PolicySynth's AI-model store.

    Every command creates or upgrades the schema it needs first.
    """
    ctx.obj = {"database": database}


@cli.command()
@click.option("--adopt", is_flag=True,
              help="The database is PolicySynth's: add psai's migration table, indexes and rollup "
                   "triggers beside its tables, without changing them.")
@click.option("--no-triggers", is_flag=True,
              help="Install no rollup triggers: reports read every item (`psai rollup enable` later).")
def init(adopt, no_triggers):
    """Create or upgrade the schema."""
    from .migrations import adopt as adopt_database, migrate
    from .rollups import disable
    db = dbmod.connect(_database_url())
    applied = adopt_database() if adopt else migrate()
    if no_triggers:
        disable(db)
    click.echo("applied: %s" % ", ".join(applied) if applied else "schema is up to date")


@cli.command()
@click.option("--html", "html_path", default="psai-report.html", show_default=True, metavar="FILE",
              help="Where to write the report page.")
def demo(html_path):
    """The main job in a nutshell: models of three providers and sizes,
    agents linked to them, which model each agent selects and why, recorded
    calls, their cost, and an HTML report. Safe to run again."""
    from ._demo import seed, selections
    from .report import html
    from .schemas import readable
    from .usage import cost_report
    connect()
    models, agents, recorded = seed()
    providers = {json_text(p) if not isinstance(p, str) else p
                 for p in (readable(m.configuration).get("provider") for m in models.values())}
    click.echo("psai demo: %d models (%s), %d agents" % (len(models), shown(", ".join(sorted(providers))),
                                                        len(agents)))
    emit(selections(agents), None, columns=["agent", "asks for", "uses", "why"])
    click.echo("%s; their cost, each call at the prices stored with it:" % (
        "recorded 6 calls" if recorded else "6 calls recorded by an earlier run"))
    rows = cost_report("agent")
    _emit_report(rows, "agent", _report_keys(rows, "agent"))
    write_file(html_path, html("tree"))
    click.echo("report page: %s" % ("stdout" if html_path == "-" else shown(os.path.abspath(html_path))))


# -- models ---------------------------------------------------------------------

MODEL_COLUMNS = ["id", "name", "provider", "type", "size", "model", "active", "in", "out", "cached", "currency"]


def _model_row(dump):
    from .schemas import readable
    config = readable(dump["configuration"])
    prices = config["prices"] if isinstance(config.get("prices"), dict) else {}
    return {"id": dump["id"], "name": dump["name"], "provider": config.get("provider"),
            "type": config.get("type"), "size": config.get("modelSize"), "model": config.get("model"),
            "active": config.get("active"), "in": prices.get("costInTokensPerMillion"),
            "out": prices.get("costOutTokensPerMillion"),
            "cached": prices.get("costInCachedContextTokensPerMillion"), "currency": prices.get("currency")}


def _dump_rows(schema, rows, kind, model=False):
    """Rows dumped one by one: a row psai cannot read as one (a hand-written
    configuration) is shown as stored and flagged, and never hides the others."""
    from .schemas import dump_rows
    dumps = []
    for dump, problem in dump_rows(schema, rows, model=model):
        if problem:
            click.echo("warning: %s %s: %s (`psai check` lists every such row)" % (kind, dump["id"], shown(problem)),
                       err=True)
            dump["problem"] = problem
        dumps.append(dump)
    return dumps


def emit_models(models, fmt, single=False):
    from .schemas import PsAiModelSchema
    dumps = _dump_rows(PsAiModelSchema(), models, "model", model=True)
    if fmt == "json":
        emit(dumps, fmt, single=single)
    elif fmt == "csv":
        emit(dumps, fmt, columns=list(PsAiModelSchema().fields))
    else:
        emit([_model_row(d) for d in dumps], fmt, columns=MODEL_COLUMNS)


def emit_fields(dump):
    """One row as a two-column table, nested fields by dotted path."""
    def flatten(value, prefix=""):
        if isinstance(value, dict) and value:
            for key, item in value.items():
                yield from flatten(item, "%s.%s" % (prefix, key) if prefix else key)
        elif isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
            yield prefix, ", ".join(str(item.get("id")) for item in value)
        else:
            yield prefix, value
    emit([{"field": key, "value": value} for key, value in flatten(dump)], None, columns=["field", "value"])


@cli.group()
def models():
    """AI models: add, list, show, update, deactivate, delete, history, reprice, import-litellm (an alias)."""


# `psai models add`'s flags besides the price keys: (flag, parameter, configuration path).
MODEL_FLAGS = (("--type", "model_type", "configuration.type"), ("--size", "size", "configuration.modelSize"),
               ("--model", "model_name", "configuration.model"), ("--provider", "provider", "configuration.provider"),
               ("--max-tokens-out", "max_tokens_out", "configuration.maxTokensOut"),
               ("--temperature", "temperature", "configuration.defaultTemperature"))


def _price_options(command):
    """An option for every price key (``psai.query.PRICE_FLAGS``); --in, --out
    and --cached keep their older names --in-price, --out-price, --cached-price."""
    from .query import PRICE_FLAGS
    older = {"in": "--in-price", "out": "--out-price", "cached": "--cached-price"}
    for flag, key in reversed(PRICE_FLAGS.items()):
        names = ["--" + flag] + ([older[flag]] if flag in older else [])
        parameter = "price_" + flag.replace("-", "_")
        if key == "currency":
            option = click.option(*names, parameter, help="Three-letter currency code (default USD; upper-cased).")
        elif key == "flexPriorityTokensEnabledOnLongContext":
            option = click.option(*names, parameter, type=bool, metavar="true|false", help="prices.%s." % key)
        else:
            option = click.option(*names, parameter, type=NUMBER, help="prices.%s." % key)
        command = option(command)
    return command


def _flag_errors(exc, given):
    """A ValidationError whose paths are the flags the user typed (of those
    ``given``: {configuration path: flag}), so `--max-tokens-out: ...`, not
    `configuration.maxTokensOut: ...`."""
    return ValidationError({given.get(path, path): messages for path, messages in exc.paths.items()})


@models.command("add")
@click.argument("name", required=False)
@click.option("--name", "name_option", help="The model's name (or give it as NAME); older rows with it are "
                                            "deactivated.")
@click.option("--user-id", type=int, help="Default: the store's (psai config).")
@click.option("--organization-id", type=int, help="Default: the store's (psai config).")
@click.option("--file", "source", type=click.File("r", encoding="utf-8"), metavar="PATH",
              help="Configuration JSON ('-' reads stdin); flags change it.")
@click.option("--type", "model_type", type=MODEL_TYPES, help="Default: text.")
@click.option("--size", type=MODEL_SIZES, help="Default: by the catalog's input price when an installed catalog "
                                                 "knows the model (genai-prices, LiteLLM), else medium.")
@click.option("--model", "model_name", help="The provider's model name.")
@click.option("--provider", help="openai, openaiResponses, anthropic, google or azure.")
@click.option("--any-provider", is_flag=True, help="Take a provider psai does not know.")
@click.option("--from", "catalog_ref", nargs=2, metavar="SOURCE REF",
              help="The prices of REF in a catalog (genai-prices openai/gpt-4o, litellm gpt-4o): a new model, "
                   "or NAME's prices filled in; with provenance, so catalog diff follows it.")
@click.option("--catalog-file", type=click.Path(exists=True, dir_okay=False), metavar="PATH",
              help="A LiteLLM cost map instead of the installed package's: with --from litellm, and for the "
                   "defaults of a model given by flags.")
@click.option("--inactive", is_flag=True, help="Store it inactive.")
@_price_options
@click.option("--max-tokens-out", type=int, help="Default: an installed catalog's for the model, else 4096.")
@click.option("--temperature", type=NUMBER, help="Default temperature (default: 0.7).")
@output_options
def models_add(name, name_option, user_id, organization_id, source, any_provider, catalog_ref, catalog_file, inactive,
               fmt, **flags):
    """Add a model NAME, in one line: `psai models add "GPT-4o" --provider
    openai --model gpt-4o --in 2.5 --out 10` (the rest has defaults: USD,
    cached input at the input rate, text, temperature 0.7; the size and
    output limit from an installed catalog that knows the model, else
    medium and 4096 tokens out), or from a configuration JSON file.

    As PolicySynth's add-model tool does, rows that already have this name in
    the organization are deactivated in the same transaction.
    """
    from .query import PRICE_FLAGS, add_model, model_configuration
    from .schemas import merge_configuration
    if name and name_option and name != name_option:
        raise click.UsageError("give the name once: NAME or --name")
    name = name or name_option
    if not name:
        raise click.UsageError("Missing argument 'NAME'.")
    prices = {key: flags.pop("price_" + flag.replace("-", "_")) for flag, key in PRICE_FLAGS.items()}
    prices = {key: value for key, value in prices.items() if value is not None}
    if catalog_ref:
        others = [flag for flag, parameter, _path in MODEL_FLAGS if flags.get(parameter) is not None
                  and parameter not in ("size", "temperature")] + (["--file"] if source else []) + \
            (["price flags"] if prices else [])
        if others:
            raise click.UsageError("--from takes the catalog's configuration; change %s after with "
                                   "`psai models update`" % ", ".join(others))
        _add_from_catalog(name, catalog_ref, user_id, organization_id, flags["size"], flags["temperature"],
                          catalog_file, fmt)
        return
    given = {path: flag for flag, parameter, path in MODEL_FLAGS if flags.get(parameter) is not None}
    given.update({"configuration.prices." + key: "--" + flag + ("/--%s-price" % flag if flag in ("in", "out", "cached")
                                                               else "")
                  for flag, key in PRICE_FLAGS.items() if key in prices})
    if isinstance(prices.get("currency"), str):
        prices["currency"] = prices["currency"].upper()
    configuration = _read_json(source) if source else {}
    if source and not isinstance(configuration, dict):
        raise ValidationError({"configuration": ["Must be a JSON object."]})
    try:
        if source:  # the file's configuration, the flags given changing it
            changes = {"type": flags["model_type"], "modelSize": flags["size"], "model": flags["model_name"],
                       "provider": flags["provider"], "maxTokensOut": flags["max_tokens_out"],
                       "defaultTemperature": flags["temperature"], "active": False if inactive else None}
            changes = {key: value for key, value in changes.items() if value is not None}
            if prices:
                changes["prices"] = prices
            configuration = merge_configuration(configuration, changes)
            configuration.setdefault("active", True)
        else:
            missing = [flag for flag, value in (("--provider", flags["provider"]), ("--model", flags["model_name"]),
                                                ("--in", prices.get("costInTokensPerMillion")),
                                                ("--out", prices.get("costOutTokensPerMillion"))) if value is None]
            if missing:
                raise click.UsageError("give %s (or --file with a configuration)" % ", ".join(missing))
            known = {"size": flags["size"], "max_tokens_out": flags["max_tokens_out"]}
            if None in known.values():  # what the flags leave out, from a catalog that knows the model
                from .catalog import catalog_defaults
                defaults = catalog_defaults(flags["provider"], flags["model_name"], file=catalog_file)
                known = {key: defaults.get(key) if value is None else value for key, value in known.items()}
            configuration = model_configuration(
                provider=flags["provider"], model=flags["model_name"], prices=prices,
                model_type=flags["model_type"], temperature=flags["temperature"], active=not inactive,
                any_provider=any_provider, **known)
        connect()
        model = add_model(name=name, user_id=user_id, organization_id=organization_id, configuration=configuration)
    except ValidationError as exc:
        raise _flag_errors(exc, {**given, **{path[len("configuration."):]: flag for path, flag in given.items()}}) \
            from None
    emit_models([model], fmt, single=True)


def _add_from_catalog(name, catalog_ref, user_id, organization_id, size, temperature, catalog_file, fmt):
    from .catalog import SOURCES, add_from_catalog
    from .models import PsAiModel
    source, ref = catalog_ref
    if source not in SOURCES:
        raise click.BadParameter("%r is not one of %s" % (source, ", ".join(SOURCES)), param_hint="'--from'")
    connect()
    result = add_from_catalog(name, source, ref, user_id=user_id, organization_id=organization_id, size=size,
                              temperature=0.7 if temperature is None else temperature, file=catalog_file)
    emit_models([PsAiModel.get_by_id(result["model_id"])], fmt, single=True)
    click.echo("%s model %s (%s) from %s %s %s: %s" % (
        result["action"], result["model_id"], shown(name), source, shown(result["source_version"]),
        shown(result["source_model"]), ", ".join("%s %s -> %s" % (key, before, after)
                                                 for key, before, after in result["changes"]) or "prices as they were"),
        err=True)
    for note in result["unexpressed"]:
        click.echo("  not expressed: %s" % _short(note), err=True)


@models.command("list")
@click.option("--provider", multiple=True, help="Only this provider (repeat for several).")
@click.option("--type", "model_type", type=MODEL_TYPES, multiple=True, help="Only this type (repeat for several).")
@click.option("--size", type=MODEL_SIZES, multiple=True, help="Only this size (repeat for several).")
@click.option("--active/--inactive", default=None, help="Only active, or only inactive, models.")
@click.option("--name", help="Only models with this name.")
@output_options
def models_list(provider, model_type, size, active, name, fmt):
    """List models, filtered by configuration fields."""
    from .models import PsAiModel
    connect()
    filters = {"provider": list(provider), "type": list(model_type), "modelSize": list(size)}
    filters = {key: value for key, value in filters.items() if value}
    if active is not None:
        filters["active"] = active
    query = PsAiModel.where_config(filters).order_by(PsAiModel.id)
    if name is not None:
        query = query.where(PsAiModel.name == name)
    emit_models(list(query), fmt)


@models.command("show")
@click.argument("model")
@output_options
def models_show(model, fmt):
    """Show one model, by id, uuid or name, with where its prices came from."""
    from .models import find_model, provenance
    from .schemas import PsAiModelSchema
    connect()
    found = find_model(model)
    dump = _dump_rows(PsAiModelSchema(), [found], "model", model=True)[0]
    dump["provenance"] = provenance(found)
    if fmt == "json":
        emit([dump], fmt, single=True)
    elif fmt == "csv":
        emit([dump], fmt, columns=list(PsAiModelSchema().fields) + ["provenance"])
    else:
        emit_fields(dump)


def _parse_value(raw):
    from .schemas import load_json
    try:
        return load_json(raw, "value")
    except ValidationError as exc:
        if "Not JSON" not in str(exc):
            raise
        return raw  # a bare word is a string: provider=openai


def _parse_assignment(text):
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValidationError({text: ["Use KEY=VALUE, e.g. prices.costInTokensPerMillion=2.5."]})
    value = _parse_value(raw)
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@models.command("resolve")
@click.argument("name")
@click.option("--provider", help="Only this provider's models.")
@click.option("--explain", is_flag=True, help="Say why this model was chosen.")
@output_options
def models_resolve(name, provider, explain, fmt):
    """The stored model a response's model NAME means (gpt-4o-2024-08-06,
    claude-sonnet-4-5-20250929, models/gemini-2.5-pro): its model or apiModel,
    else the name without its dated snapshot suffix; never another model."""
    from .query import resolve_model
    connect()
    found, reason = resolve_model(name, provider=provider, explain=True)
    emit_models([found], fmt, single=True)
    if explain:
        click.echo(shown(reason), err=fmt is not None)


@models.command("update")
@click.argument("model")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Change a configuration field; nested keys by path, the value as JSON "
                   "(prices.costInTokensPerMillion=2.5, active=false, provider=openai). "
                   "null removes the key.")
@click.option("--file", "source", type=click.File("r", encoding="utf-8"), metavar="PATH",
              help="JSON object of changes to merge ('-' reads stdin).")
@click.option("--name", help="A new name.")
@output_options
def models_update(model, assignments, source, name, fmt):
    """Change fields of a model's configuration (validated before saving)."""
    from .models import find_model
    from .schemas import merge_configuration
    changes = _read_json(source) if source else {}
    if not isinstance(changes, dict):
        raise ValidationError({"changes": ["Must be a JSON object."]})
    for assignment in assignments:
        changes = merge_configuration(changes, _parse_assignment(assignment)) if changes else \
            _parse_assignment(assignment)
    if not changes and name is None:
        raise click.UsageError("nothing to change: give --set, --file or --name")
    connect()
    found = find_model(model)
    if name is not None:
        found.name = name
    found.update_configuration(changes)
    emit_models([found], fmt, single=True)


@models.command("deactivate")
@click.argument("model")
def models_deactivate(model):
    """Mark a model inactive (it stays for history and reports); works on a
    row psai would otherwise refuse, so a bad row can be taken out of use."""
    from .models import find_model
    connect()
    found = find_model(model)
    found.deactivate()
    click.echo("deactivated model %s (%s)" % (found.id, shown(found.name)))


@models.command("delete")
@click.argument("model")
def models_delete(model):
    """Delete a model and its links (refused if usage was recorded for it)."""
    from .models import find_model
    connect()
    found = find_model(model)
    found.delete_instance()
    click.echo("deleted model %s (%s)" % (found.id, shown(found.name)))


HISTORY_COLUMNS = ["model_id", "valid_from", "valid_to", "source", "in", "out", "cached", "currency", "corrections"]


def _history_row(version):
    prices = version["prices"]
    return {"model_id": version["model_id"], "valid_from": version["valid_from"], "valid_to": version["valid_to"],
            "source": version["source"], "in": prices.get("costInTokensPerMillion"),
            "out": prices.get("costOutTokensPerMillion"),
            "cached": prices.get("costInCachedContextTokensPerMillion"), "currency": prices.get("currency"),
            "corrections": ",".join(str(c["id"]) for c in version["corrections"]) or None}


@models.command("history")
@click.argument("name")
@click.option("--organization-id", type=int, help="Only this organization's rows of NAME.")
@output_options
def models_history(name, organization_id, fmt):
    """The price history of NAME (or of a model id or uuid): every version of
    its prices, oldest first, with the period it was in force and the
    corrections applied to the calls of that period."""
    from ._history import price_history
    from .models import PsAiModel
    connect()
    versions = price_history(name)
    if organization_id is not None:
        ids = {row.id for row in PsAiModel.select(PsAiModel.id).where(PsAiModel.organization_id == organization_id)}
        versions = [version for version in versions if version["model_id"] in ids]
    if fmt == "json":
        emit(versions, fmt)
    elif fmt == "csv":
        emit([dict(_history_row(v), prices=v["prices"]) for v in versions], fmt, columns=HISTORY_COLUMNS + ["prices"])
    else:
        emit([_history_row(v) for v in versions], fmt, columns=HISTORY_COLUMNS)


@models.command("reprice")
@click.argument("model")
@click.option("--set", "assignments", multiple=True, required=True, metavar="KEY=VALUE",
              help="A corrected price, e.g. costInTokensPerMillion=2.5 (prices. may lead; null removes it).")
@click.option("--since", metavar="DATE", help="Only calls from this day (YYYY-MM-DD) or time.")
@click.option("--until", metavar="DATE", help="Only calls up to and including this day, or before this time.")
@click.option("--apply", "apply_changes", is_flag=True, help="Apply the correction (without it: a dry run).")
@output_options
def models_reprice(model, assignments, since, until, apply_changes, fmt):
    """Correct the prices of calls already recorded for MODEL (id, uuid or
    name): shows the cost before and after, and changes nothing without
    --apply. The model's prices for calls to come are `models update`."""
    from ._history import reprice
    changes = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ValidationError({assignment: ["Use KEY=VALUE, e.g. costInTokensPerMillion=2.5."]})
        changes[key] = _parse_value(raw)
    connect()
    result = reprice(model, changes, since=since, until=until, dry_run=not apply_changes)
    if fmt is not None:
        emit([result], fmt, single=True)
        return
    unpriced = {"before": result["unpriced_tokens_before"], "after": result["unpriced_tokens_after"]}
    rows = []
    for side in ("before", "after"):
        # Calls that could not be priced are not a cost of 0.
        priced = not unpriced[side] or result[side] != 0
        rows.append({"": side, "cost": result[side] if priced else "unpriced",
                     "currency": result["currency"] if priced else None, "unpriced_tokens": unpriced[side] or None})
    known = not any(unpriced.values())
    rows.append({"": "difference", "cost": result["difference"] if known else "unknown",
                 "currency": result["currency"] if known else None, "unpriced_tokens": None})
    emit(rows, fmt, columns=["", "cost", "currency", "unpriced_tokens"])
    if not known:
        click.echo("%d tokens could not be priced before, %d after: the costs leave them out"
                   % (unpriced["before"], unpriced["after"]))
    click.echo("%d calls; %s" % (result["calls"], "applied" if result["applied"] else
                                 "dry run: nothing changed (add --apply to apply)"))


@models.command("import-litellm")
@click.argument("source", metavar="PATH", type=click.Path(exists=True, dir_okay=False))
@click.option("--user-id", type=int, help="Default: the store's (psai config).")
@click.option("--organization-id", type=int, help="Default: the store's (psai config).")
@click.option("--size", type=MODEL_SIZES, help="modelSize for every model (default: by input price).")
@click.option("--temperature", type=NUMBER, default=0.7, show_default=True, help="defaultTemperature.")
@click.option("--provider", multiple=True, help="Only entries of this litellm_provider (repeatable).")
@click.option("--dry-run", is_flag=True, help="Report what would be imported; write nothing.")
@output_options
def models_import_litellm(source, user_id, organization_id, size, temperature, provider, dry_run, fmt):
    """Import LiteLLM's cost map from PATH: `psai catalog import litellm --file PATH`."""
    _import_catalog("litellm", user_id, organization_id, size, temperature, provider, (), dry_run, source, fmt)


# -- settings -------------------------------------------------------------------

@cli.command("config")
@click.option("--user-id", type=int, help="The user_id of new models and agents given none.")
@click.option("--organization-id", type=int, help="The organization_id of new models given none.")
@click.option("--class-id", type=int, help="The class_id of new agents given none.")
@click.option("--group-id", type=int, help="The group_id of new agents given none.")
@click.option("--require-ids/--no-require-ids", default=None,
              help="Refuse new models and agents without their ids, as PolicySynth does (on by "
                   "`psai init --adopt`); off: the defaults above.")
@output_options
def config_command(user_id, organization_id, class_id, group_id, require_ids, fmt):
    """Show the store's settings, after setting those given: the ids new
    models and agents get when a command or function is given none (1
    each unless set here)."""
    from .models import config
    connect()
    settings = config(user_id=user_id, organization_id=organization_id, class_id=class_id, group_id=group_id,
                      require_ids=require_ids)
    if fmt is None:
        emit([{"setting": key, "value": value} for key, value in settings.items()], None,
             columns=["setting", "value"])
    else:
        emit([settings], fmt, single=True)


# -- catalogs -------------------------------------------------------------------

CATALOG_SOURCES = click.Choice(["genai-prices", "litellm"])


@cli.group()
def catalog():
    """Price catalogs (genai-prices, LiteLLM): import models with provenance, find drift."""


@catalog.command("import")
@click.argument("source", type=CATALOG_SOURCES)
@click.option("--provider", multiple=True, help="Only this provider of the source (repeatable).")
@click.option("--model", "model_ids", multiple=True, help="Only this source model id (repeatable).")
@click.option("--user-id", type=int, help="Default: the store's (psai config).")
@click.option("--organization-id", type=int, help="Default: the store's (psai config).")
@click.option("--size", type=MODEL_SIZES,
              help="modelSize of new models (default: by input price per million: <0.5 small, <2 medium, "
                   "else large).")
@click.option("--temperature", type=NUMBER, default=0.7, show_default=True, help="defaultTemperature of new models.")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False),
              help="litellm: this cost map instead of the installed package's.")
@click.option("--dry-run", is_flag=True, help="Report what would change; write nothing.")
@output_options
def catalog_import(source, provider, model_ids, user_id, organization_id, size, temperature, path, dry_run, fmt):
    """Import the priced models of SOURCE (genai-prices or litellm), offline.

    A model imported before from the same source is updated in place (its price
    history kept), never duplicated. What the source prices and PolicySynth's
    configuration cannot say is listed, not dropped silently.
    """
    _import_catalog(source, user_id, organization_id, size, temperature, provider, model_ids, dry_run, path, fmt)


def _import_catalog(source, user_id, organization_id, size, temperature, providers, model_ids, dry_run, path, fmt):
    from .catalog import import_catalog
    connect()
    with Progress("importing") as progress:
        result = import_catalog(source, user_id=user_id, organization_id=organization_id, size=size,
                                temperature=temperature, providers=providers, models=model_ids,
                                dry_run=dry_run, file=path, progress=progress)
    if fmt == "json":
        emit([result], fmt, single=True)
        return
    if fmt == "csv":
        rows = [{"source_model": m["source_model"], "model_id": m["model_id"], "result": m["action"],
                 "calls": m["calls"], "not expressed": "; ".join(m["unexpressed"])} for m in result["models"]]
        rows += [{"source_model": name, "result": "skipped: " + reason} for name, reason in result["skipped"].items()]
        emit(rows, fmt, columns=["source_model", "model_id", "result", "calls", "not expressed"])
        return
    # A table a person reads: one short line a model; what it cannot say, and skips, listed below it.
    emit([{"source_model": m["source_model"], "model_id": m["model_id"], "result": m["action"],
           "in": m.get("prices", {}).get("costInTokensPerMillion"),
           "out": m.get("prices", {}).get("costOutTokensPerMillion"),
           "notes": len(m["unexpressed"]) or None} for m in result["models"]], None,
         columns=["source_model", "model_id", "result", "in", "out", "notes"])
    for m in result["models"]:
        if m["calls"]:
            click.echo("%s: %s" % (shown(m["source_model"]), shown(m["calls"])))
    for m in result["models"]:
        for note in m["unexpressed"]:
            click.echo("  %s not expressed: %s" % (shown(m["source_model"]), _short(note)))
    for name, reason in result["skipped"].items():
        click.echo("  %s skipped: %s" % (shown(name), _short(reason)))
    click.echo("%s %s: %d models, %d skipped" % (source, shown(result["source_version"]), len(result["models"]),
                                                len(result["skipped"])), err=True)


def _short(text, width=110):
    text = shown(text)
    return text if len(text) <= width else text[:width - 3] + "..."


@catalog.command("diff")
@click.argument("source", type=CATALOG_SOURCES)
@click.option("--organization-id", type=int, help="Only this organization's models.")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False),
              help="litellm: this cost map instead of the installed package's.")
@click.option("--apply", "apply_changes", is_flag=True, help="Set the stored prices to the source's.")
@output_options
def catalog_diff(source, organization_id, path, apply_changes, fmt):
    """The imported models whose prices differ from SOURCE as installed now."""
    from .catalog import diff
    connect()
    rows = diff(source, file=path, organization_id=organization_id, apply=apply_changes)
    if fmt is None and not rows:
        click.echo("no differences")
        return
    emit(rows, fmt, columns=["model_id", "name", "source_model", "field", "stored", "source"])
    if apply_changes and rows and fmt is None:
        click.echo("applied", err=True)


# -- agents ---------------------------------------------------------------------

AGENT_COLUMNS = ["id", "name", "user_id", "class_id", "group_id", "parent_agent_id", "models"]


@cli.group()
def agents():
    """Agents: add, list, show, link, unlink, and the models they use."""


def emit_agents(agent_list, fmt, single=False):
    from .schemas import readable
    from .schemas import PsAgentSchema
    dumps = _dump_rows(PsAgentSchema(with_links=True), agent_list, "agent")
    if fmt == "json":
        emit(dumps, fmt, single=single)
    elif fmt == "csv":
        emit(dumps, fmt, columns=list(dumps[0]) if dumps else AGENT_COLUMNS)
    else:
        rows = [{"id": d["id"], "name": readable(d["configuration"]).get("name"), "user_id": d["user_id"],
                 "class_id": d["class_id"], "group_id": d["group_id"], "parent_agent_id": d["parent_agent_id"],
                 "models": ",".join(str(m["id"]) for m in d["ai_models"])} for d in dumps]
        emit(rows, fmt, columns=AGENT_COLUMNS)


@agents.command("add")
@click.option("--user-id", type=int, help="Default: the store's (psai config).")
@click.option("--class-id", type=int, help="Default: the store's (psai config).")
@click.option("--group-id", type=int, help="Default: the store's (psai config).")
@click.option("--name", help="Sets configuration.name.")
@click.option("--configuration", "configuration_json", metavar="JSON", help="The configuration as JSON.")
@click.option("--parent", metavar="AGENT", help="Parent agent (id, uuid or name).")
@click.option("--model", "model_keys", multiple=True, metavar="MODEL",
              help="Link this model (id, uuid or name; repeatable).")
@output_options
def agents_add(user_id, class_id, group_id, name, configuration_json, parent, model_keys, fmt):
    """Add an agent."""
    from .db import write_transaction
    from .models import PsAgent, find_agent, find_model
    from .schemas import load_json
    configuration = load_json(configuration_json, "configuration") if configuration_json else {}
    if not isinstance(configuration, dict):
        raise ValidationError({"configuration": ["Must be a JSON object."]})
    if name is not None:
        configuration["name"] = name
    with write_transaction(connect()):
        parent_agent = find_agent(parent) if parent else None
        agent = PsAgent.create(user_id=user_id, class_id=class_id, group_id=group_id,
                               configuration=configuration, parent_agent=parent_agent)
        if model_keys:
            agent.ai_models.add([find_model(key) for key in model_keys])
    emit_agents([agent], fmt, single=True)


@agents.command("list")
@output_options
def agents_list(fmt):
    """List agents with the ids of their models."""
    from .models import PsAgent
    connect()
    emit_agents(list(PsAgent.with_ai_models()), fmt)


@agents.command("show")
@click.argument("agent")
@output_options
def agents_show(agent, fmt):
    """Show one agent, by id, uuid or name, with its models."""
    from .models import find_agent
    connect()
    found = find_agent(agent)
    if fmt is None:
        from .schemas import PsAgentSchema
        emit_fields(_dump_rows(PsAgentSchema(with_links=True), [found], "agent")[0])
    else:
        emit_agents([found], fmt, single=True)


@agents.command("link")
@click.argument("agent")
@click.argument("model_keys", nargs=-1, required=True, metavar="MODEL...")
def agents_link(agent, model_keys):
    """Let AGENT use MODEL(s); linking twice is harmless."""
    found, _removed = _change_links(agent, model_keys, "add")
    click.echo("agent %s linked to model %s" % (found.id, shown(", ".join(model_keys))))


@agents.command("unlink")
@click.argument("agent")
@click.argument("model_keys", nargs=-1, required=True, metavar="MODEL...")
def agents_unlink(agent, model_keys):
    """Remove the links between AGENT and MODEL(s)."""
    found, removed = _change_links(agent, model_keys, "remove")
    click.echo("agent %s: %d link(s) removed" % (found.id, removed or 0))


def _change_links(agent, model_keys, change):
    """Add or remove links of an agent (by id, uuid or name) to models, in one transaction."""
    from .db import write_transaction
    from .models import find_agent, find_model
    with write_transaction(connect()):
        found = find_agent(agent)
        result = getattr(found.ai_models, change)([find_model(key) for key in model_keys])
    return found, result


@agents.command("models")
@click.argument("agent")
@click.option("--include-inactive", is_flag=True, help="Let inactive models be selected too.")
@output_options
def agents_models(agent, include_inactive, fmt):
    """The model AGENT would use for each type and size, by PolicySynth's rules."""
    from .models import find_agent
    from .query import model_choices
    connect()
    rows = model_choices(find_agent(agent), include_inactive=include_inactive)
    emit(rows, fmt, columns=["type", "size", "model_id", "name", "model_size", "model"])


# -- cost and usage -----------------------------------------------------------------

USAGE_OPTIONS = [
    click.option("--in", "tokens_in", type=click.IntRange(min=0), required=True, help="Input tokens (total)."),
    click.option("--out", "tokens_out", type=click.IntRange(min=0), required=True, help="Output tokens (total)."),
    click.option("--cached", "cached_tokens", type=click.IntRange(min=0), default=0,
                 help="Of the input, tokens read from cache."),
    click.option("--cache-write", "cache_write_tokens", type=click.IntRange(min=0), default=0,
                 help="Of the input, tokens written to cache."),
    click.option("--reasoning", "reasoning_tokens", type=click.IntRange(min=0), default=0,
                 help="Of the output, reasoning tokens."),
    click.option("--audio", "audio_tokens", type=click.IntRange(min=0), default=0, help="Of the output, audio tokens."),
    click.option("--image", "image_tokens", type=click.IntRange(min=0), default=0, help="Of the output, image tokens."),
]


def usage_options(command):
    for option in reversed(USAGE_OPTIONS):
        command = option(command)
    return command


@cli.command()
@click.argument("model")
@usage_options
@click.option("--web-searches", type=click.IntRange(min=0), default=0, help="Web search calls.")
@click.option("--tier", type=click.Choice(["flex", "priority", "fast"]),
              help="Inference tier (default: the model's inferenceType).")
@click.option("--region", type=click.Choice(["eu"]), help="Regional processing (default: the model's).")
@output_options
def cost(model, tier, region, fmt, **usage):
    """What one call to MODEL costs, by PolicySynth's pricing rules."""
    from .usage import model_cost
    connect()
    if tier is not None:
        usage["inference_type"] = tier
    if region is not None:
        usage["regional_processing"] = region
    result = model_cost(model, **usage)
    if fmt == "json":
        click.echo(json.dumps({"cost": result["total"], "currency": result["currency"],
                               "parts": result["parts"], "counters": result["counters"],
                               "rates": result["rates"]}, indent=2))
        return
    rows = [{"part": part, "cost": value} for part, value in result["parts"].items() if value]
    rows.append({"part": "total", "cost": result["total"]})
    for row in rows:
        row["currency"] = result["currency"]
    emit(rows, fmt, columns=["part", "cost", "currency"])


@cli.group()
def usage():
    """Record token usage and report what it cost."""


@usage.command("record")
@click.argument("model")
@click.option("--agent", help="The agent that made the call (id, uuid or name).")
@usage_options
@click.option("--audio-in", "audio_in_tokens", type=click.IntRange(min=0), default=0,
              help="Of the input, audio tokens (priced at costInAudioTokensPerMillion).")
@click.option("--web-searches", type=click.IntRange(min=0), default=0, help="Web search calls.")
@click.option("--applied-tier", metavar="TIER",
              help="The tier the provider says it served (flex, priority, default; Anthropic: fast, standard); "
                   "reports price it instead of the model's configured inferenceType.")
@click.option("--user-id", type=int, help="Default: the agent's user, else the model's.")
@click.option("--connector-id", type=int)
def usage_record(model, agent, applied_tier, **usage):
    """Record one call to MODEL (and AGENT): its usage item, with the prices
    in force now, and the usage counters."""
    from ._items import applied_tier_metadata
    from .models import find_model
    from .usage import record_usage
    connect()
    if applied_tier is not None:
        from .schemas import readable
        model = find_model(model)
        usage["provider_metadata"] = applied_tier_metadata(readable(model.configuration).get("provider"),
                                                           applied_tier)
    _report_budget_events()
    row = record_usage(model, agent, **usage)
    click.echo("recorded on usage row %s" % row.id)


@usage.command("record-response")
@click.argument("model", required=False)
@click.option("--agent", help="The agent that made the call (id, uuid or name).")
@click.option("--file", "source", type=click.File("rb"), default="-", show_default=True, metavar="PATH",
              help="The provider's response as JSON, or a stream's chunks or events, one JSON per line "
                   "('-' reads stdin).")
@click.option("--provider", type=click.Choice(["openai", "azure", "anthropic", "google"]),
              help="Default: told from the response's shape.")
@click.option("--user-id", type=int, help="Default: the agent's user, else the model's.")
@click.option("--connector-id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Write what was read and recorded as JSON.")
def usage_record_response(model, agent, source, provider, user_id, connector_id, as_json):
    """Record one call from the provider's own response (OpenAI, Azure,
    Anthropic, Gemini; streamed or not). Without MODEL, the stored model is
    found from the response's model name (see `psai models resolve`)."""
    from ._recording import record_response
    from ._responses import read_response, usage_from_response
    name = getattr(source, "name", "<stdin>")
    # A stream is read an event at a time, never held whole.
    response = read_response(source, "stdin" if name in ("<stdin>", "-") else name)
    usage = usage_from_response(response, provider=provider)
    connect()
    _report_budget_events()
    call = record_response(model, agent, usage, user_id=user_id, connector_id=connector_id)
    if as_json:
        def recorded(read, call):
            return dict(read, cost=call.cost, currency=call.currency, unpriced_reason=call.unpriced_reason,
                        model_id=call.model_id, response_id=call.response_id, duplicate=call.duplicate)
        emit([dict(recorded(usage.as_dict(), call), other_calls=[
            recorded(read, other) for read, other in zip(usage.as_dict()["other_calls"], call.other_calls)])],
             "json", single=True)
        return
    for read, recorded_call in [(usage, call), *zip(usage.other_calls, call.other_calls)]:
        cost = "%s %s" % (recorded_call.cost, recorded_call.currency) if recorded_call.cost is not None \
            else "unpriced (%s)" % recorded_call.unpriced_reason
        click.echo("%s %s tokens in, %s out (%s, %s): %s" % (
            "already recorded (response %s):" % shown(recorded_call.response_id) if recorded_call.duplicate
            else "recorded", read.tokens_in, read.tokens_out, read.api_family, shown(read.model), shown(cost)))


@usage.command("assign")
@click.option("--apply", "apply_changes", is_flag=True,
              help="Move the calls to the model now configured for their name; without it nothing changes.")
@click.option("--json", "as_json", is_flag=True, help="Write every placeholder as JSON.")
def usage_assign(apply_changes, as_json):
    """Calls recorded unpriced because their response's model name matched
    no configured model (held by placeholder models): with --apply, moved
    to the model configured for that name since, and priced at its prices."""
    from ._recording import assign_unmatched
    connect()
    found = assign_unmatched(dry_run=not apply_changes)
    if as_json:
        emit(found, "json")
        return
    emit([{"placeholder": f["placeholder_id"], "name": f["name"], "provider": f["provider"], "calls": f["calls"],
           "model": f["model_id"], "why": f["reason"]} for f in found], None,
         columns=["placeholder", "name", "provider", "calls", "model", "why"])
    click.echo("applied: calls moved" if apply_changes else "dry run: nothing changed (--apply moves them)", err=True)


REPORT_COLUMNS = ["calls", "tokens_in", "tokens_out", "cost", "currency", "unpriced_tokens", "priced_from"]
# Columns a report shows when asked (--columns), after tokens_out.
EXTRA_REPORT_COLUMNS = {"cached": "cached_tokens", "cache-write": "cache_write_tokens",
                        "reasoning": "reasoning_tokens"}
# Digits after the point of currencies whose minor unit is not the cent (ISO 4217).
CURRENCY_DIGITS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "UGX": 0, "XOF": 0, "XAF": 0,
                   "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3, "LYD": 3, "IQD": 3}


def money_shown(value, currency):
    """An amount as a table shows it: rounded to the currency's minor unit
    (cents), an amount above 0 that would round to 0 as "<0.01"."""
    from decimal import ROUND_HALF_UP, Decimal
    if value is None:
        return None
    digits = CURRENCY_DIGITS.get(currency, 2) if isinstance(currency, str) else 2
    unit = Decimal(1).scaleb(-digits)
    rounded = Decimal(value).quantize(unit, rounding=ROUND_HALF_UP)
    if not rounded and value:
        return ("<" if value > 0 else ">-") + format(unit, "f")
    return format(rounded, "f")


def report_columns(rows, keys, extra=()):
    """One column order for a report's table, CSV and JSON: the group's keys,
    calls and tokens, the columns asked for, cost, and provider_cost last,
    only when a call has one."""
    columns = keys + REPORT_COLUMNS[:3] + [EXTRA_REPORT_COLUMNS[name] for name in extra] + REPORT_COLUMNS[3:]
    if any(row.get("provider_cost") is not None for row in rows):
        columns.append("provider_cost")
    return columns


class ColumnList(click.ParamType):
    name = "NAMES"

    def convert(self, value, param, ctx):
        names = [name.strip() for name in value.split(",") if name.strip()] if isinstance(value, str) else value
        unknown = [name for name in names if name not in EXTRA_REPORT_COLUMNS]
        if unknown:
            self.fail("%s: give some of %s" % (", ".join(unknown), ", ".join(EXTRA_REPORT_COLUMNS)), param, ctx)
        return names


class Grouping(click.ParamType):
    """A report's --by: a grouping, or tag:KEY; two comma-separated (cost_report checks which pair)."""
    name = "GROUPING"
    choices = ("model", "agent", "tree", "provider", "day", "user", "session")

    def convert(self, value, param, ctx):
        if isinstance(value, str) and all(name in self.choices or name.startswith("tag:") and name[4:]
                                          for name in value.split(",")):
            return value
        self.fail("%s: give one of %s, or tag:KEY; or two of them comma-separated, e.g. agent,model"
                  % (shown(value), ", ".join(self.choices)), param, ctx)

    def get_metavar(self, param, ctx=None):
        return "[%s|tag:KEY][,...]" % "|".join(self.choices)


class TagFilter(click.ParamType):
    """A report's --tag KEY=VALUE."""
    name = "KEY=VALUE"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        key, equals, text = value.partition("=")
        if not equals or not key:
            self.fail("%s: give KEY=VALUE, e.g. env=prod" % shown(value), param, ctx)
        return key, text


@usage.command("report")
@click.option("--by", "grouping", type=Grouping(), default="model", show_default=True,
              help="How rows are grouped: by model, agent, agent tree, provider, UTC day, the application's "
                   "end user, session, or a tag's value (tag:KEY); calls without the user, session or tag "
                   "are in the row (none). Two comma-separated group by both (agent,model; tag:team,model).")
@click.option("--since", metavar="DATE", help="From this day (YYYY-MM-DD) or time.")
@click.option("--until", metavar="DATE", help="Up to and including this day, or up to this time.")
@click.option("--agent", metavar="AGENT", help="Only this agent's calls (id, uuid or name).")
@click.option("--model", metavar="MODEL", help="Only calls to this model, every version of it (id, uuid or name).")
@click.option("--provider", help="Only calls to this provider.")
@click.option("--user", metavar="USER", help="Only the calls of this end user (record_usage's user=).")
@click.option("--session", metavar="SESSION", help="Only the calls of this session (conversation).")
@click.option("--tag", "tag_filters", type=TagFilter(), multiple=True,
              help="Only the calls with this tag (repeat: all of them).")
@click.option("--columns", "extra", type=ColumnList(), default="", metavar="NAMES",
              help="More columns, comma-separated: cached (input tokens read from cache), cache-write, "
                   "reasoning (output tokens spent reasoning).")
@click.option("--exact", is_flag=True, help="Amounts in the table as computed, not rounded to cents.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when any usage cannot be priced.")
@click.option("--html", "html_path", metavar="FILE",
              help="Also write a self-contained HTML page with charts (no network needed to open it).")
@output_options
def usage_report(grouping, since, until, agent, model, provider, user, session, tag_filters, extra, exact, strict,
                 html_path, fmt):
    """Cost of recorded usage, each call priced at the prices stored with it.

    Usage that cannot be priced (prices missing or unusable) is shown in rows
    of its own with no cost, never as 0; --strict makes it an error. The
    table rounds amounts to the currency's cents (--exact: as computed); CSV
    and JSON have them exact, in the table's column order.
    """
    from .usage import cost_report
    from .report import html
    connect()
    filters = {"agent": agent, "model": model, "provider": provider, "user": user, "session": session,
               "tags": dict(tag_filters) or None}
    with dbmod.read_transaction():  # the table and the page: one moment
        with Progress("pricing usage") as progress:
            if progress.enabled:
                click.echo("summing usage in the database...", err=True)
            rows = cost_report(grouping, since=since, until=until, strict=strict, progress=progress, **filters)
        page = html(grouping, since=since, until=until, rows=rows,
                    database=_database_url() or dbmod.DEFAULT_URL, **filters) if html_path else None
    if html_path:
        write_file(html_path, page)
        click.echo("wrote %s" % shown(html_path), err=True)
    keys = _report_keys(rows, grouping)
    if fmt is not None:
        columns = report_columns(rows, keys, extra)
        columns.insert(columns.index("priced_from") + 1, "unpriced_reason")
        emit([{column: row.get(column) for column in columns} for row in rows], fmt, columns=columns)
        return
    _emit_report(rows, grouping, keys, extra, exact)


def _report_keys(rows, grouping):
    known = set(REPORT_COLUMNS) | set(EXTRA_REPORT_COLUMNS.values()) | {"unpriced_reason", "provider_cost"}
    keys = [column for column in (rows[0] if rows else {}) if column not in known]
    return keys or [{"tree": "agent_id", "day": "day", "provider": "provider", "user": "user",
                     "session": "session"}.get(by, "tag" if by.startswith("tag:") else by + "_id")
                    for by in grouping.split(",")]


def _emit_report(rows, grouping, keys, extra=(), exact=False):
    """A cost report as a table with a TOTAL row per currency; unpriced usage on stderr."""
    from .usage import report_totals
    totals = report_totals(rows, grouping)
    table = list(rows)
    for currency, total in sorted(totals.items(), key=lambda item: (item[0] is None, str(item[0]))):
        table.append(dict(total, **{keys[0]: "TOTAL", "currency": currency}))
    for key in keys:
        if key in ("user", "session", "tag"):  # the calls without one
            table = [dict(row, **{key: "(none)"}) if row.get(key, "") is None else row for row in table]
    if not exact:
        table = [dict(row, cost=money_shown(row["cost"], row["currency"]),
                      provider_cost=money_shown(row.get("provider_cost"), row["currency"])) for row in table]
    emit(table, None, columns=report_columns(rows, keys, extra))
    for row in rows:
        if row["unpriced_reason"]:
            click.echo("unpriced: %s %s: %d tokens: %s" % (keys[0], shown(row[keys[0]]), row["unpriced_tokens"],
                                                         shown(row["unpriced_reason"])), err=True)


@cli.command("audit")
@click.option("--since", metavar="DATE", help="From this day (YYYY-MM-DD) or time.")
@click.option("--until", metavar="DATE", help="Up to and including this day, or up to this time.")
@click.option("--model", help="Only this model (id, uuid or name).")
@click.option("--apply", "apply_changes", is_flag=True,
              help="Correct those items (and their counters), in one transaction; without it nothing changes.")
@click.option("--json", "as_json", is_flag=True, help="Write every finding as JSON.")
def audit_command(since, until, model, apply_changes, as_json):
    """Items whose stored counts disagree with the provider's raw usage they
    keep (PolicySynth's Claude accounting, fast mode lost, 1-hour writes),
    with their cost as recorded and as billed. A dry run unless --apply."""
    from ._audit import audit
    connect()
    result = audit(since=since, until=until, model=model, dry_run=not apply_changes)
    if as_json:
        emit([result], "json", single=True)
        return
    if not result["findings"]:
        click.echo("nothing to correct: %s" % (
            "the counts of %d items agree with the provider's usage they keep" % result["items_read"]
            if result["items_read"] else "no item keeps the provider's usage"))
        return
    emit([{"item": f["item_id"], "model": f["model_id"], "api": f["api_family"],
           "tokens_in": "%s -> %s" % (f["stored"]["tokensIn"], f["billed"]["tokensIn"]),
           "cached": "%s -> %s" % (f["stored"]["cachedInTokens"], f["billed"]["cachedInTokens"]),
           "recorded": f["cost_recorded"], "billed": f["cost_billed"], "currency": f["currency"]}
          for f in result["findings"]], None,
         columns=["item", "model", "api", "tokens_in", "cached", "recorded", "billed", "currency"])
    for currency in sorted(result["recorded"]):
        click.echo("%s: recorded %s, billed %s, difference %s (%d of %d items read)" % (
            shown(currency), result["recorded"][currency], result["billed"][currency],
            result["billed"][currency] - result["recorded"][currency], len(result["findings"]),
            result["items_read"]))
    click.echo("applied: items and counters corrected" if result["applied"]
               else "dry run: nothing changed (--apply corrects)", err=True)


# -- budgets ------------------------------------------------------------------------------

@cli.group()
def budgets():
    """Spending limits per agent tree, model, provider or organization (and
    end user, session or tag), over a calendar period, with alerts that fire once
    (docs/budgets.md)."""


def _budget_row(budget):
    from .budget import scope_of
    return {"name": budget.name, "limit": budget.amount, "currency": budget.currency, "period": budget.period,
            "timezone": budget.timezone, "scope": scope_of(budget),
            "warn_at": ",".join(str(f) for f in budget.warn_at) if isinstance(budget.warn_at, list) else budget.warn_at,
            "hard": budget.hard, "unpriced": budget.unpriced}


@budgets.command("set")
@click.option("--name", required=True, help="The budget's name (an existing one is changed).")
@click.option("--amount", required=True, metavar="AMOUNT", help="The limit, e.g. 25 or 2.50.")
@click.option("--currency", default="USD", show_default=True)
@click.option("--period", type=click.Choice(["day", "week", "month", "year", "total"]), default="month",
              show_default=True, help="A calendar period in --timezone (week: ISO, from Monday).")
@click.option("--timezone", default="UTC", show_default=True,
              help="An IANA zone, e.g. Europe/Berlin (not localtime: the host's own zone is refused).")
@click.option("--agent", metavar="AGENT", help="Scope: this agent (id, uuid or name) and its sub-agents.")
@click.option("--agent-only", is_flag=True, help="With --agent: the agent alone, not its sub-agents.")
@click.option("--model", "model_name", metavar="MODEL",
              help="Scope: every version of this model (id, uuid or name).")
@click.option("--provider", help="Scope: every model of this provider.")
@click.option("--organization-id", type=int, help="Scope: every model of this organization.")
@click.option("--user", metavar="USER", help="Only the calls of this end user (record_usage's user=), in the scope.")
@click.option("--session", metavar="SESSION",
              help="Only the calls of this session (record_usage's session=: one conversation), in the scope.")
@click.option("--tag", "tag", type=TagFilter(), metavar="KEY=VALUE",
              help="Only the calls with this tag (record_usage's tags=), in the scope; one tag. One of --user, "
                   "--session, --tag.")
@click.option("--warn-at", "warn_at", type=float, multiple=True, metavar="FRACTION",
              help="Alert at this fraction of the limit (repeat for more; default 0.8). The limit alerts too.")
@click.option("--soft", is_flag=True, help="Alerts only: check_budget never refuses a call.")
@click.option("--unpriced", type=click.Choice(["block", "allow"]), default="block", show_default=True,
              help="Whether usage that cannot be priced blocks calls (the state is then unknown).")
@output_options
def budgets_set(name, amount, currency, period, timezone, agent, agent_only, model_name, provider, organization_id,
                user, session, tag, warn_at, soft, unpriced, fmt):
    """Create or change a budget (one scope at most; none: all usage)."""
    from .budget import set_budget
    if agent_only and agent is None:
        raise click.UsageError("--agent-only needs --agent (without it the budget would cover all usage)")
    connect()
    budget = set_budget(name=name, amount=amount, currency=currency, period=period, timezone=timezone, agent=agent,
                        include_sub_agents=not agent_only, model=model_name, provider=provider,
                        organization_id=organization_id, user=user, session=session,
                        tags=dict([tag]) if tag else None,
                        warn_at=warn_at or (0.8,), hard=not soft,
                        unpriced=unpriced)
    emit([_budget_row(budget)], fmt, single=True)


@budgets.command("list")
@output_options
def budgets_list(fmt):
    """Every budget, by name."""
    from .budget import budgets as all_budgets
    connect()
    emit([_budget_row(b) for b in all_budgets()], fmt,
         columns=["name", "limit", "currency", "period", "timezone", "scope", "warn_at", "hard", "unpriced"])


@budgets.command("status")
@click.argument("name", required=False)
@output_options
def budgets_status(name, fmt):
    """What each budget (or NAME) covers (its scope) and has spent this
    period, against its limit: exit 3 when a hard budget is exceeded (for
    cron and CI), else 0."""
    from .budget import budget_status
    connect()
    statuses = budget_status(name)
    emit(statuses, fmt, columns=["budget", "scope", "state", "spent", "limit", "currency", "remaining", "forecast",
                                 "unpriced_tokens", "period_start", "period_end"])
    if any(s["hard"] and s["state"] == "exceeded" for s in statuses):
        sys.exit(EXIT_BUDGET_EXCEEDED)


@budgets.command("events")
@click.option("--since", metavar="DATE", help="From this day (YYYY-MM-DD) or time.")
@output_options
def budgets_events(since, fmt):
    """The thresholds crossed, oldest first: each once per budget and period."""
    from .budget import budget_events
    connect()
    emit(budget_events(since), fmt, columns=["at", "budget", "threshold", "spent", "currency", "period_start"])


@budgets.command("remove")
@click.argument("name")
def budgets_remove(name):
    """Remove a budget and its recorded alerts."""
    from .budget import remove_budget
    connect()
    remove_budget(name)
    click.echo("removed budget %s" % name)


def _report_budget_events():
    """Say on stderr when the call being recorded crosses a budget's threshold."""
    from .budget import on_budget_event

    @on_budget_event
    def say(event):
        percent = format((event["threshold"] * 100).normalize(), "f")
        what = "its limit" if event["threshold"] == 1 else "%s%% of its limit" % percent
        click.echo("budget %s: %s reached (%s %s spent)" % (_safe(event["budget"]), what, event["spent"],
                                                           event["currency"]), err=True)


@cli.command("check")
@output_options
def check_command(fmt):
    """List every stored row psai would refuse or cannot use, and why
    (exit 1 when there is one). Fix a model with `models update`, or take it
    out of use with `models deactivate`."""
    from ._check import check
    connect()
    found = check()
    if fmt is not None or found:
        emit(found, fmt, columns=["table", "id", "problem"])
    else:
        click.echo("every row is fine")
    if found:
        sys.exit(EXIT_FAILURE)


# -- rollups -------------------------------------------------------------------------

@cli.group()
def rollup():
    """psai's per-day rollups of the usage items, which reports read (docs/rollups.md)."""


@rollup.command("status")
@click.option("--since", metavar="DATE", help="Only from this day (YYYY-MM-DD).")
@click.option("--until", metavar="DATE", help="Only up to and including this day.")
@output_options
def rollup_status(since, until, fmt):
    """Whether triggers keep the rollups, then each day with items or
    rollups: its items, the calls its rollups hold, and whether reports read
    it from the rollups (current) or the items (items)."""
    from .rollups import enabled, status
    db = connect()
    if fmt is None:
        click.echo("rollups: kept by triggers" if enabled(db) else
                   "rollups: off (no triggers): reports read every item; `psai rollup enable` turns them on")
    emit(status(since=since, until=until), fmt, columns=["day", "items", "rolled_up", "state"])


@rollup.command("verify")
@click.option("--since", metavar="DATE", help="Only from this day (YYYY-MM-DD).")
@click.option("--until", metavar="DATE", help="Only up to and including this day.")
@output_options
def rollup_verify(since, until, fmt):
    """Recompute every day reports read from the rollups and list those whose
    rollups (or budget slots, or attribution ledger) differ from their items
    (exit 1 when there is one)."""
    from .rollups import verify
    connect()
    found = verify(since=since, until=until)
    if fmt is not None or found:
        emit(found, fmt, columns=["day", "problem"])
    else:
        click.echo("the rollups agree with the items")
    if found:
        sys.exit(EXIT_FAILURE)


@rollup.command("rebuild")
@click.option("--since", metavar="DATE", help="Only from this day (YYYY-MM-DD).")
@click.option("--until", metavar="DATE", help="Only up to and including this day.")
@output_options
def rollup_rebuild(since, until, fmt):
    """Recompute from their items the rollups of the days (default: every
    day), in one transaction; lists the days that hold rollups."""
    from .rollups import rebuild
    connect()
    days = rebuild(since=since, until=until)
    emit([{"day": day} for day in days], fmt, columns=["day"])


@rollup.command("enable")
@output_options
def rollup_enable(fmt):
    """Install the triggers that keep the rollups and rebuild every day."""
    from .rollups import enable
    days = enable(connect())
    emit([{"day": day} for day in days], fmt, columns=["day"])


# -- export / import -------------------------------------------------------------------

@cli.command("export")
@click.option("--output", "-o", metavar="PATH",
              help="Write to this file instead of stdout (replaced whole; - is stdout).")
def export_command(output):
    """Export every model, agent and link as JSON (PolicySynth's row format)."""
    from ._transfer import export_data
    connect()
    text = json_text(export_data(), indent=2)
    if output:
        write_file(output, text + "\n")
    else:
        click.echo(text)


@cli.command("import")
@click.argument("source", metavar="PATH", type=click.File("r", encoding="utf-8"))
@click.option("--allow-unknown-keys", is_flag=True,
              help="Keep configuration keys psai does not know (from a newer PolicySynth).")
def import_command(source, allow_unknown_keys):
    """Import a psai export ('-' reads stdin). All or nothing: one bad row
    imports nothing and the error names its table, row and field."""
    from ._transfer import import_data
    from .schemas import MAX_JSON_DEPTH
    data = _read_json(source, limit=MAX_JSON_DEPTH + 4)  # the export's own levels, then configurations
    connect()
    with Progress("checking rows") as progress:
        counts = import_data(data, allow_unknown_keys=allow_unknown_keys, progress=progress)
    click.echo("imported: %(created)d created, %(updated)d updated, %(links)d links added" % counts)


@cli.command("copy")
@click.option("--from", "source", required=True, metavar="URL", help="The database to copy from.")
@click.option("--to", "target", required=True, metavar="URL", help="The database to copy into.")
@click.option("--dry-run", is_flag=True, help="Count what would be copied; change nothing.")
@output_options
def copy_command(source, target, dry_run, fmt):
    """Copy models, agents, links, usage and price history from one database
    to another (a PolicySynth deployment into a local SQLite file, say).

    Models and agents are matched by uuid, usage rows by model, agent,
    connector and time: copying again updates, never duplicates. One
    transaction on the target.
    """
    from ._transfer import copy
    with Progress("copying") as progress:
        counts = copy(source, target, dry_run=dry_run, progress=progress)
    rows = [dict(table=table, **numbers) for table, numbers in counts.items()]
    emit(rows, fmt, columns=["table", "created", "updated"])
    if dry_run and fmt is None:
        click.echo("dry run: nothing changed", err=True)


def write_file(path, text):
    """Write ``text`` to ``path``; ``-`` is stdout.

    A regular file, new or existing, is replaced whole or, if anything
    fails, left as it was: a temporary file beside it takes the old file's
    mode and owner (a new file gets the mode ``>`` would give it), is flushed
    to disk and renamed over it. A symlink is followed: the file it points to
    is replaced so, the link kept (a link to nothing is refused). A FIFO or a
    character device (``/dev/null``, ``/dev/stdout``, a terminal) is written
    straight through, never replaced; a directory, block device or socket is
    refused.
    """
    if path == "-":
        click.echo(text, nl=False, color=True)
        return
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(errno.ENOENT, "a symlink to %s, which does not exist" % os.path.realpath(path),
                                    path) from None
        status = None
    if status is not None and (stat.S_ISFIFO(status.st_mode) or stat.S_ISCHR(status.st_mode)):
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
        return
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise OSError(errno.EISDIR if stat.S_ISDIR(status.st_mode) else errno.EINVAL,
                      "not a regular file, FIFO or character device: refused", path)
    target = path
    if os.path.islink(path):
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))  # may this process write through the link? (no change)
        target = os.path.realpath(path)
    handle, temporary = _temporary_beside(target)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            if status is not None:
                _keep_owner_and_mode(out.fileno(), status)
            out.write(text)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename, so a crash leaves old or new, never empty
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _temporary_beside(target):
    """A new file in ``target``'s directory, open for writing: ``(fd, path)``.
    Made as ``>`` would make it (0666 less the umask), and never through a
    link an attacker left at its name (O_EXCL)."""
    directory, name = os.path.split(os.path.abspath(target))
    while True:
        temporary = os.path.join(directory, ".%s.%s.tmp" % (name, secrets.token_hex(6)))
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


def _keep_owner_and_mode(handle, status):
    """Give the open file ``handle`` the owner, group and mode of ``status``,
    as far as this process may: another owner needs root, the group
    membership of it; the mode is always kept (set last: chown clears setuid)."""
    for uid, gid in ((status.st_uid, status.st_gid), (-1, status.st_gid)):
        try:
            os.fchown(handle, uid, gid)
            break
        except PermissionError:
            continue
    os.fchmod(handle, stat.S_IMODE(status.st_mode))


def main():
    cli(prog_name="psai")
