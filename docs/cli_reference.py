"""The reference part of docs/cli.md: the --help of every psai command, as Markdown.

docs/cli.md calls it from a cog block: ``cog -r docs/cli.md`` (``make docs``)
regenerates the page, ``cog --check docs/cli.md`` (tests/test_habits.py) fails
when it is stale. It lives outside the package: psai does not need it to run.
"""
import click

from psai.cli import cli

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
