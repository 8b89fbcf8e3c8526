"""The ``psai`` command: a thin shell over the library."""
import functools
import json
import sys

import click
import peewee

from . import db as dbmod
from .errors import DatabaseURLError, NotFoundError, PsaiError, ValidationError
from .migrations import migrate as run_migrations


def _fail(message, code):
    click.echo("Error: %s" % message, err=True)
    sys.exit(code)


def handle_errors(command):
    """User mistakes become one line on stderr: exit 2 for bad input, 1 for a failure."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValidationError, DatabaseURLError) as exc:
            _fail(str(exc), 2)
        except (NotFoundError, PsaiError) as exc:
            _fail(str(exc), 1)
        except peewee.DatabaseError as exc:
            url = click.get_current_context().find_root().params.get("database") or ""
            _fail(dbmod._scrub(exc, url) if url else str(exc).strip(), 1)
    return wrapper


@click.group()
@click.option("--database", "database", envvar="PSAI_DATABASE_URL", metavar="URL",
              help="Database URL (default: $PSAI_DATABASE_URL, else sqlite:///psai.db).")
@click.version_option(package_name="psai")
@click.pass_context
def cli(ctx, database):
    """psai: PolicySynth's AI-model store."""
    ctx.obj = {"database": database}


def _connect():
    return dbmod.connect(click.get_current_context().obj["database"])


@cli.command()
@handle_errors
def init():
    """Create or upgrade the schema."""
    _connect()
    applied = run_migrations()
    click.echo("applied: %s" % ", ".join(applied) if applied else "schema is up to date")


@cli.command()
@handle_errors
def demo():
    """Store the seed model and two agents linked to it, and print them."""
    from .demo import seed
    from .models import PsAiModel
    from .schemas import PsAiModelSchema
    _connect()
    run_migrations()
    model, _agents = seed()
    model = [m for m in PsAiModel.with_agents() if m.id == model.id][0]
    click.echo(json.dumps(PsAiModelSchema(with_links=True).dump(model), indent=2))
