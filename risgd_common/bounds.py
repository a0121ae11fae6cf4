"""The bounds a config value is checked against, each written once: the recipe layer
(risgd_trainer.run_config) and the engine's ``risgd`` block (risgd_ext.config) both check with these.

A :class:`Bound` is the words a message says (``a number of seconds > 0``) and the test; a message
is always one line, ``WHERE must be WHAT, got VALUE: FIX``, where WHERE (``elastic.op_timeout_s``,
``risgd.op_timeout_s``) and FIX (which file to change) are the caller's::

    POSITIVE_SECONDS.check("risgd.op_timeout_s", 0, "fix it in the ds_config", ConfigError)
    # ConfigError: risgd.op_timeout_s must be a number of seconds > 0, got 0: fix it in the ds_config
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any


def _keep(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Bound:
    """What a value must be (``what``: the words of the message) and the test of it. ``convert``: the
    value as checked (a number as a float)."""

    what: str
    test: Callable[[Any], bool]
    convert: Callable[[Any], Any] = _keep

    def ok(self, value: Any) -> bool:
        return self.test(value)

    def message(self, where: str, value: Any, fix: str = "") -> str:
        """The one line that refuses ``value`` at ``where``."""
        return f"{where} must be {self.what}, got {value!r}" + (f": {fix}" if fix else "")

    def check(self, where: str, value: Any, fix: str = "", error: type[Exception] = ValueError) -> Any:
        """``value`` as checked, or ``error`` with :meth:`message`."""
        if not self.test(value):
            raise error(self.message(where, value, fix))
        return self.convert(value)

    def saying(self, note: str) -> Bound:
        """This bound, its words followed by ``(note)`` (what a value means: ``0: a fixed-size run``)."""
        return Bound(f"{self.what} ({note})", self.test, self.convert)

    def or_null(self, what: str | None = None) -> Bound:
        """This bound, or null (``what``: the words, by default ``WHAT or null``)."""
        return Bound(what or f"{self.what} or null", lambda v: v is None or self.test(v),
                     lambda v: None if v is None else self.convert(v))


def is_int(value: Any) -> bool:
    """An int, not a bool (YAML's and JSON's true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- types (what a recipe key's default says it is) -------------------------------------------------
INTEGER = Bound("an integer", is_int)
NUMBER = Bound("a number", is_number, float)
FLAG = Bound("true or false", lambda v: isinstance(v, bool))
STRING = Bound("a string", lambda v: isinstance(v, str))
LIST = Bound("a list", lambda v: isinstance(v, list))
SCALAR = Bound("a string, a number or null", lambda v: v is None or isinstance(v, str) or is_number(v))


# -- bounds on values ---------------------------------------------------------------------------------
def at_least(minimum: int) -> Bound:
    """An int >= ``minimum``."""
    return Bound(f"an int >= {minimum}", lambda v: is_int(v) and v >= minimum)


POSITIVE_NUMBER = Bound("a number > 0", lambda v: is_number(v) and v > 0, float)
POSITIVE_SECONDS = Bound("a number of seconds > 0", lambda v: is_number(v) and v > 0, float)
NON_NEGATIVE_NUMBER = Bound("a number >= 0", lambda v: is_number(v) and v >= 0, float)


def within(low: float, high: float, brackets: str = "[]", noun: str = "a number") -> Bound:
    """A number between ``low`` and ``high``; ``brackets``: which ends are in (``[)``: low is, high is not)."""
    lo_in, hi_in = brackets[0] == "[", brackets[1] == "]"

    def test(v: Any) -> bool:
        return (is_number(v) and (low <= v if lo_in else low < v) and (v <= high if hi_in else v < high))
    return Bound(f"{noun} in {brackets[0]}{low:g}, {high:g}{brackets[1]}", test, float)


FRACTION = within(0, 1, "[)")                        # a momentum: 1 would never forget
PROBABILITY = within(0, 1, "[]", noun="a probability")
SHARE = within(0, 1, "()")                           # a share of something that is neither none nor all


def one_of(choices: Collection[str], what: str | None = None) -> Bound:
    """One of ``choices`` (a tuple, or a registry read at each check); ``what``: the words, by default
    ``one of A, B, C``."""
    return Bound(what or f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices)


@dataclass(frozen=True)
class KeyCheck:
    """A key's validator, ``(key, value) -> value as checked``: its :class:`Bound`, checked at
    ``prefix + key`` and refused with ``error`` naming ``fix``."""

    bound: Bound
    prefix: str = ""
    fix: str = ""
    error: type[Exception] = ValueError

    def __call__(self, key: str, value: Any) -> Any:
        return self.bound.check(self.prefix + key, value, self.fix, self.error)
