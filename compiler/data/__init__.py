"""``lowc.data``: the texts shipped inside the package, and the one place that resolves a text argument.

lowc ships WikiText-2 (Merity et al. 2016, CC BY-SA; see ``wikitext-2/README.md`` beside the files)
so that calibration, evaluation, the tests and the examples work in a fresh clone or a plain
``pip install``, with nothing beside the repository. Built-in texts are named:

* ``wikitext-2-valid``: calibration and training text (never evaluate on it);
* ``wikitext-2-test``: held-out evaluation text (never calibrate or train on it).

Wherever lowc takes a text file (``calib=`` in Python, ``--calib`` and ``--data`` on the CLI) it
takes one of these names as well, through :func:`resolve`: an existing file of that name wins, so
plain paths keep working. The module imports nothing heavy (``import lowc`` stays light).
"""

from __future__ import annotations

import os

from lowc.errors import DataError, LowcError

HERE = os.path.dirname(os.path.abspath(__file__))

#: built-in text name -> (file inside this package, what it is for)
TEXTS: dict[str, tuple[str, str]] = {
    "wikitext-2-valid": ("wikitext-2/valid.txt", "WikiText-2 validation split (~214k words): calibration, training"),
    "wikitext-2-test": ("wikitext-2/test.txt", "WikiText-2 test split (~241k words): held-out evaluation"),
}

#: what ``lowc eval`` measures a causal LM's perplexity on when no ``--data`` is given
DEFAULT_EVAL_TEXT = "wikitext-2-test"


def names() -> list[str]:
    """The built-in text names, in a stable order."""
    return list(TEXTS)


def path(name: str) -> str:
    """Absolute path of the built-in text ``name`` (see :data:`TEXTS`)."""
    try:
        rel = TEXTS[name][0]
    except KeyError:
        raise DataError(f"no built-in text {name!r} (built-in texts: {', '.join(TEXTS)})") from None
    p = os.path.join(HERE, *rel.split("/"))
    if not os.path.isfile(p):  # a broken install: package data left out of the wheel
        raise DataError(f"built-in text {name!r} is missing from the installed package ({p}); reinstall lowc")
    return p


def wikitext2(split: str = "valid") -> str:
    """Path of WikiText-2's ``split`` (``valid`` or ``test``)."""
    if split not in ("valid", "test"):
        raise DataError(f"wikitext-2 has the splits 'valid' and 'test', not {split!r}")
    return path(f"wikitext-2-{split}")


def resolve(spec: str | os.PathLike, what: str = "text file", error: type[LowcError] = DataError) -> str:
    """``spec`` as a readable file path: an existing file, else a built-in text name.

    ``what`` names the argument in the error (``--calib``, ``--data``, ``calibration file``);
    ``error`` is the LowcError raised (the caller's family, e.g. CalibrationError)."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return spec
    if spec in TEXTS:
        return path(spec)
    raise error(f"{what} {spec!r} does not exist (nor is it a built-in text: {', '.join(TEXTS)})")


def read(spec: str | os.PathLike, what: str = "text file", error: type[LowcError] = DataError) -> str:
    """The contents of :func:`resolve` ``(spec)`` (undecodable bytes replaced)."""
    with open(resolve(spec, what, error), encoding="utf-8", errors="replace") as f:
        return f.read()


def identify(spec: str | os.PathLike) -> str:
    """How reports and settings name a text: a built-in name stays the name (the same on every
    machine), a file is its absolute path."""
    spec = os.fspath(spec)
    return spec if spec in TEXTS and not os.path.isfile(spec) else os.path.abspath(spec)
