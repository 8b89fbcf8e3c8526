"""The generated parts of docs/cli.md: the tutorial, each command run for
real with what it printed, and the --help of every psai command, as Markdown.

docs/cli.md calls them from cog blocks: ``cog -r docs/cli.md`` (``make docs``)
regenerates the page, ``cog --check docs/cli.md`` (tests/test_habits.py) fails
when it is stale. It lives outside the package: psai does not need it to run.
"""
import os
import shlex
import tempfile

import click
from click.testing import CliRunner

from psai.cli import cli

# The tutorial's files, and its commands as a reader types them: ``cat``
# shows a file, ``export`` sets a variable, the rest are psai commands. It
# runs in a new temporary directory, on its own SQLite files only.
TUTORIAL_FILES = {"gpt4.json": """\
{"type": "text", "modelSize": "large", "model": "gpt-4", "provider": "openai", "active": true,
 "prices": {"costInTokensPerMillion": 30, "costOutTokensPerMillion": 60,
            "costInCachedContextTokensPerMillion": 10, "currency": "USD"},
 "maxTokensOut": 4096, "defaultTemperature": 0.7}
"""}
TUTORIAL = [
    "psai --database sqlite:///models.db init",
    "cat gpt4.json",
    "export PSAI_DATABASE_URL=sqlite:///models.db",
    'psai models add --name "GPT-4" --user-id 1 --organization-id 2 --file gpt4.json',
    "psai agents add --user-id 1 --class-id 1 --group-id 1 --name Researcher --model 1",
    "psai agents models 1",
    "psai cost 1 --in 1000000 --out 1000000",
    "psai usage record 1 --agent 1 --in 1000 --out 200",
    "psai usage report --by agent",
    "psai models update 1 --set prices.costInTokensPerMillion=25 --set active=false",
    "psai export -o backup.json",
    "psai --database sqlite:///copy.db import backup.json",
]


def tutorial(steps=TUTORIAL, files=TUTORIAL_FILES):
    """The tutorial as a terminal shows it: each command after ``$``, then
    what it printed (stdout and stderr). A command that fails stops it."""
    shown = []
    environment = {"PSAI_DATABASE_URL": None}  # never the caller's database
    before = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="psai-tutorial-") as directory:
        os.chdir(directory)
        try:
            for name, text in files.items():
                with open(name, "w") as file:
                    file.write(text)
            for step in steps:
                words = shlex.split(step)
                if words[0] == "cat":
                    with open(words[1]) as file:
                        printed = file.read()
                elif words[0] == "export":
                    name, _, value = words[1].partition("=")
                    environment[name], printed = value, ""
                else:
                    assert words[0] == "psai", step
                    result = CliRunner(env=environment).invoke(cli, words[1:], catch_exceptions=False)
                    assert result.exit_code == 0, "%s: %s" % (step, result.output)
                    printed = result.output
                shown.append("$ %s\n%s" % (step, printed))
        finally:
            os.chdir(before)
    return "```\n%s```\n" % "\n".join(shown)

# A fixed width, so the text is the same on every terminal.
WIDTH = 88


def reference(group=cli, name="psai"):
    """One ``### `command``` section per command, the group first, then its
    commands in click's order (sub-groups before the next command)."""
    parts = []

    def walk(command, path, parent):
        context = command.make_context(path[-1], [], parent=parent, resilient_parsing=True,
                                       terminal_width=WIDTH, max_content_width=WIDTH)
        with context:
            parts.append("### `%s`\n\n```\n%s\n```\n" % (" ".join(path), command.get_help(context)))
            if isinstance(command, click.Group):
                for sub in command.list_commands(context):
                    walk(command.get_command(context, sub), path + [sub], context)

    walk(group, [name], None)
    return "\n".join(parts)
