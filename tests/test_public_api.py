"""The public surface: pinned names, each documented."""

import hybridpk


def test_all_names_resolve_and_are_documented():
    for name in hybridpk.__all__:
        obj = getattr(hybridpk, name)
        if name != "__version__":
            assert obj.__doc__, f"{name} has no docstring"


def test_version_is_a_string():
    assert isinstance(hybridpk.__version__, str) and hybridpk.__version__[0].isdigit()
