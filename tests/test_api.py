"""The public API a user finds: ``psai.__all__``, ``help(psai)``,
``psai.__version__``, and public names that stay what they are whatever
psai imported before (a submodule named like a function would replace the
function on the package when imported)."""
import importlib.metadata
import os
import pydoc
import subprocess
import sys
import types

import psai

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {"pricing", "catalog", "report"}  # the public names that are modules


def test_exported_members():
    # Other work adds names: this list changes with them, on purpose.
    assert sorted(psai.__all__) == [
        "AgentModels", "AgentRef", "AmbiguousNameError", "BudgetExceededError", "DatabaseURLError",
        "DatabaseUnavailableError", "InUseError", "ModelRef", "NotFoundError", "PsAgent", "PsAiModel",
        "PsAiModelProvider", "PsAiModelSize", "PsAiModelType", "PsModelUsage", "PsModelUsageItem", "PsaiError",
        "RecordedCall", "Reservation", "ResponseUsage", "UnpricedUsageError", "ValidationError",
        "WrongDatabaseError", "add_model", "arecord_response", "assign_unmatched", "audit", "budget_events",
        "budget_status", "budgets", "catalog", "check_budget", "config", "connect", "copy", "cost_report",
        "database", "find_agent", "find_by_provider_model", "find_model", "flush", "instrument", "migrate",
        "on_budget_event", "price_history", "pricing", "record_response", "record_usage", "recorded_response",
        "redact_url", "remove_budget", "report", "reprice", "resolve_model", "set_budget", "track",
        "uninstrument", "usage_from_response", "using",
    ]
    for name in psai.__all__:
        assert name in dir(psai)


def test_help_lists_every_public_function_and_the_version():
    page = pydoc.render_doc(psai, renderer=pydoc.plaintext)
    functions = page[page.index("\nFUNCTIONS\n"):page.index("\nDATA\n")]
    public = [name for name in psai.__all__ if isinstance(getattr(psai, name), types.FunctionType)]
    assert len(public) > 20
    for name in public:
        assert "\n    %s(" % name in functions or "\n    async %s(" % name in functions, name
    assert "\nVERSION\n    %s\n" % psai.__version__ in page


def test_version_is_the_installed_distribution_s():
    assert psai.__version__ == importlib.metadata.version("psai")
    assert psai.__version__.count(".") >= 2


CHECK_NAMES = r"""
import importlib, pkgutil, sys, types
import psai
if sys.argv[1] == "names first":
    before = {name: getattr(psai, name) for name in psai.__all__}
for module in pkgutil.walk_packages(psai.__path__, "psai."):
    if module.name != "psai.__main__":  # that one runs the command line
        importlib.import_module(module.name)
wrong = [name for name in psai.__all__
         if isinstance(getattr(psai, name), types.ModuleType) != (name in {%s})]
if sys.argv[1] == "names first":
    wrong += [name for name in psai.__all__ if getattr(psai, name) is not before[name]]
print(sorted(wrong))
""" % ", ".join(map(repr, sorted(MODULES)))


def test_public_names_survive_importing_every_submodule():
    for order in ("names first", "submodules first"):
        result = subprocess.run([sys.executable, "-c", CHECK_NAMES, order], capture_output=True, text=True,
                                cwd=CHECKOUT, timeout=300)
        assert (result.returncode, result.stdout.strip()) == (0, "[]"), (order, result.stdout, result.stderr)
    assert isinstance(psai.audit, types.FunctionType)


def test_the_files_in_reversed_order_leave_nothing_for_each_other():
    """A command's import (``psai audit`` loads the audit module) before the
    library call (``psai.audit()``): the order in which test_hostile.py ran
    before test_rollups.py. ``pytest --reverse-files`` runs a whole suite so."""
    selected = ["tests/test_responses.py::"
                "test_audit_apply_corrects_items_and_counters_so_the_report_moves_by_the_difference",
                "tests/test_hostile.py::test_psai_never_writes_a_time_it_cannot_read"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--reverse-files",
                             "-k", "sqlite", *selected], capture_output=True, text=True, cwd=CHECKOUT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ran = [line.split("::")[0] for line in result.stdout.splitlines() if " PASSED " in line]
    assert ran and ran[0].startswith("tests/test_hostile.py") and ran[-1].startswith("tests/test_responses.py"), ran
