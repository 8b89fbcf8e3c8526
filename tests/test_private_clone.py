"""The suite passes wherever the checkout lives: here, the tests that lean on
file permissions run from a copy of the checkout in a private (0700)
directory, as ``mktemp -d`` makes and as /root is, once as the running user
and, when that is root, once more the way a normal user meets permission
bits (root's overrides dropped). They used to switch to ``nobody``, who
cannot reach a checkout or a virtualenv under a private directory."""
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from conftest import IN_CI, obey_permission_bits

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests that read a store through its file's and directory's permissions.
PERMISSION_TESTS = ["tests/test_errors.py", "-k", "read_only"]
# What a copy of a checkout without git leaves out: environments, caches, local stores.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", ".*_cache", ".hypothesis",
                                    "*.egg-info", "build", "dist", "psai.db*", "psai-report.html")


def checkout_files():
    """The checkout's files as a clone of it holds them, with the working
    tree's changes: git's tracked and unignored files; None without git."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(CHECKOUT, ".git")):
        return None
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=CHECKOUT, capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.split("\0") if name and os.path.isfile(os.path.join(CHECKOUT, name))]


@pytest.fixture(scope="module")
def private_clone():
    private = tempfile.mkdtemp(prefix="psai-private-")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    clone = os.path.join(private, "psai")
    files = checkout_files()
    if files is None:
        shutil.copytree(CHECKOUT, clone, ignore=NOT_SOURCE)
    else:
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(clone, name)), exist_ok=True)
            shutil.copy2(os.path.join(CHECKOUT, name), os.path.join(clone, name))
    yield clone
    shutil.rmtree(private)


def run_in(clone, command, *, obey=False):
    # This interpreter and its packages; psai and the tests from the clone.
    environment = {**os.environ, "PYTHONPATH": clone, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *command], cwd=clone, env=environment, capture_output=True, text=True,
                          timeout=600,
                          preexec_fn=obey_permission_bits if obey else None)


# Root ignores permission bits; a second run meets them as a normal user does.
USERS = ["running user"] + (["root obeying permission bits"] if os.geteuid() == 0 else [])


@pytest.mark.parametrize("user", USERS)
def test_the_permission_tests_pass_in_a_clone_under_a_private_directory(private_clone, user):
    obey = user != "running user"
    if obey and not sys.platform.startswith("linux"):
        message = "root's overrides are dropped with Linux's prctl"
        if IN_CI:
            pytest.fail(message + "; with CI=true this is a failure, not a skip")
        pytest.skip(message)
    where = run_in(private_clone, ["-c", "import psai; print(psai.__file__)"], obey=obey)
    assert where.stdout.strip() == os.path.join(private_clone, "psai", "__init__.py"), where.stderr
    result = run_in(private_clone, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *PERMISSION_TESTS],
                    obey=obey)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "3 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]
