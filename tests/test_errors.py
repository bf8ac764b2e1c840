"""The one "first line of an error" and the one version lookup, which every stage uses."""

from __future__ import annotations

from importlib import metadata

import pytest

import tlsweep
from tlsweep.errors import error_gist, first_line
from tlsweep.versions import LIBRARIES, version, versions


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("bad value\nTraceback detail"), "bad value"),
        (ValueError("\n   \n  the reason  \nmore"), "the reason"),  # leading blank lines
        (ValueError(""), "ValueError"),  # no message: the type's name
        (OSError("   "), "OSError"),
        ("\n text given as a string \n", "text given as a string"),
        ("  \n ", ""),  # a blank text stays blank: the caller words the gap
    ],
)
def test_first_line_is_the_first_non_blank_line(error: BaseException | str, line: str) -> None:
    assert first_line(error) == line


def test_first_line_is_cut_at_its_limit_or_not_at_all() -> None:
    long = ValueError("x" * 500)
    assert first_line(long) == "x" * 200
    assert first_line(long, 300) == "x" * 300
    assert first_line(long, None) == "x" * 500


def test_error_gist_names_the_type_and_the_first_line() -> None:
    assert error_gist(RuntimeError("\nout of memory\nat layer 3")) == "RuntimeError: out of memory"
    assert error_gist(KeyError()) == "KeyError"


def test_versions_are_the_installed_ones_and_absent_for_a_missing_library() -> None:
    got = versions()
    assert list(got) == ["tlsweep", *LIBRARIES]
    assert got["tlsweep"] == tlsweep.__version__
    assert got["numpy"] == metadata.version("numpy")
    assert version("no-such-distribution-tlsweep") == "absent"
    assert versions(("keras",)) == {"tlsweep": tlsweep.__version__, "keras": version("keras")}
