"""Calico label selectors: a recursive-descent parser and evaluator.

Used to evaluate an IP pool's ``nodeSelector`` against a node's labels.  It
is on the CNI plugin's exec path, so it uses the standard library only.

Grammar (``||`` binds loosest, then ``&&``, then the prefix ``!``)::

    selector   := <whitespace only>            -> all()
                | or_expr EOF
    or_expr    := and_expr ( "||" and_expr )*
    and_expr   := unary ( "&&" unary )*
    unary      := "!"* primary
    primary    := "(" or_expr ")"
                | "all" "(" ")" | "global" "(" ")"
                | "has" "(" KEY ")"
                | KEY "==" STRING | KEY "!=" STRING
                | KEY "contains" STRING
                | KEY "starts" "with" STRING | KEY "ends" "with" STRING
                | KEY "in" SET | KEY "not" "in" SET
    SET        := "{" [ STRING ( "," STRING )* [ "," ] ] "}"
    STRING     := "'" <any chars but '> "'" | '"' <any chars but "> '"'
    KEY        := [A-Za-z0-9_./-]{1,512}

Facts taken from Calico (libcalico-go ``lib/selector``):

* label keys are runs of ``[A-Za-z0-9_./-]`` (at most 512 characters), e.g.
  ``kubernetes.io/hostname``; the words ``has``/``all``/``in``/... are only
  keywords where the grammar expects them, so ``in == 'x'`` tests label "in";
* string literals have no escapes: a value can hold ``"`` or ``'`` but not
  both;
* the two-word operators may be written with any (or no) blank between the
  words (``not in`` / ``notin``, ``starts with`` / ``startswith``); a trailing
  comma inside a set is accepted; repeated ``!`` collapse;
* ``k != 'v'`` and ``k not in {...}`` are TRUE when ``k`` is absent;
  ``==``, ``in``, ``contains``, ``starts with``, ``ends with`` are false;
* ``global()`` (matches non-namespaced resources in Calico) is accepted and,
  like ``all()``, matches every node.

Deliberate leniencies: besides space and tab (Calico's blanks) CR/LF/FF/VT
also count as whitespace (YAML folding), and whitespace is allowed between
``has``/``all``/``global`` and ``(``.  Parenthesis nesting is capped at
``MAX_DEPTH`` so hostile input cannot blow the Python stack.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost); annotations are strings
if TYPE_CHECKING:  # pragma: no cover
    from typing import Mapping

__all__ = [
    "SelectorError",
    "Selector",
    "parse",
    "matches",
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
]

MAX_DEPTH = 64
MAX_KEY_LENGTH = 512
_CACHE_MAX = 512

_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-")
_WHITESPACE = frozenset(" \t\r\n\f\v")


class SelectorError(ValueError):
    """An invalid selector.

    ``selector`` is the text, ``position`` the 0-based index of the offending
    character (``len(selector)`` for "unexpected end of input") and ``reason``
    the bare explanation.  ``str(err)`` reads
    ``invalid selector at position 7: expected ')' (got '&&')``.
    """

    def __init__(self, selector: str, position: int, reason: str):
        self.selector = selector
        self.position = position
        self.reason = reason
        super().__init__(f"invalid selector at position {position}: {reason}")

    def pointer(self) -> str:
        """The selector with a caret line under the offending character."""
        return f"{self.selector}\n{' ' * self.position}^"


# --------------------------------------------------------------------------
# AST.  Nodes are immutable; each has matches(labels) and a canonical render.
# Precedence levels for rendering: 0 = or, 1 = and, 2 = unary/atom.


def _quote(value: str) -> str:
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(f"selector value cannot contain both quote characters: {value!r}")


class _Node:
    __slots__ = ()
    prec = 2

    def matches(self, labels: Mapping[str, str]) -> bool:  # pragma: no cover
        raise NotImplementedError

    def render(self) -> str:  # pragma: no cover
        raise NotImplementedError

    def render_in(self, prec: int) -> str:
        text = self.render()
        return f"({text})" if self.prec < prec else text

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.render()}>"


class _All(_Node):
    __slots__ = ()

    def matches(self, labels):
        return True

    def render(self):
        return "all()"


class _Global(_Node):
    __slots__ = ()

    def matches(self, labels):
        return True

    def render(self):
        return "global()"


class _Has(_Node):
    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def matches(self, labels):
        return self.key in labels

    def render(self):
        return f"has({self.key})"


class _Compare(_Node):
    """``key OP 'value'`` for ==, !=, contains, starts with, ends with."""

    __slots__ = ("key", "op", "value")

    def __init__(self, key: str, op: str, value: str):
        self.key = key
        self.op = op
        self.value = value

    def matches(self, labels):
        actual = labels.get(self.key)
        op = self.op
        if actual is None:
            return op == "!="
        if op == "==":
            return actual == self.value
        if op == "!=":
            return actual != self.value
        if op == "contains":
            return self.value in actual
        if op == "starts with":
            return actual.startswith(self.value)
        return actual.endswith(self.value)  # "ends with"

    def render(self):
        return f"{self.key} {self.op} {_quote(self.value)}"


class _InSet(_Node):
    __slots__ = ("key", "values", "negated")

    def __init__(self, key: str, values, negated: bool):
        self.key = key
        self.values = frozenset(values)
        self.negated = negated

    def matches(self, labels):
        actual = labels.get(self.key)
        if actual is None:
            return self.negated
        return (actual in self.values) != self.negated

    def render(self):
        op = "not in" if self.negated else "in"
        body = ", ".join(_quote(v) for v in sorted(self.values))
        return f"{self.key} {op} {{{body}}}"


class _Not(_Node):
    __slots__ = ("operand",)

    def __init__(self, operand: _Node):
        self.operand = operand

    def matches(self, labels):
        return not self.operand.matches(labels)

    def render(self):
        return "!" + self.operand.render_in(2)


class _And(_Node):
    __slots__ = ("operands",)
    prec = 1

    def __init__(self, operands):
        self.operands = tuple(operands)

    def matches(self, labels):
        for op in self.operands:
            if not op.matches(labels):
                return False
        return True

    def render(self):
        return " && ".join(op.render_in(2) for op in self.operands)


class _Or(_Node):
    __slots__ = ("operands",)
    prec = 0

    def __init__(self, operands):
        self.operands = tuple(operands)

    def matches(self, labels):
        for op in self.operands:
            if op.matches(labels):
                return True
        return False

    def render(self):
        return " || ".join(op.render_in(1) for op in self.operands)


def _flatten(cls, nodes):
    """Build an n-ary and/or node, splicing in children of the same kind."""
    if len(nodes) == 1:
        return nodes[0]
    flat = []
    for n in nodes:
        if type(n) is cls:
            flat.extend(n.operands)
        else:
            flat.append(n)
    return cls(flat)


# --------------------------------------------------------------------------
# Public selector object.


class Selector:
    """A parsed selector.  Immutable; equality and hashing use ``str()``."""

    __slots__ = ("source", "_root", "_text")

    def __init__(self, root: _Node, source: str = ""):
        self._root = root
        self.source = source
        self._text = root.render()

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        """Whether ``labels`` (a node's labels; None means none) match."""
        return self._root.matches(labels if labels is not None else {})

    __call__ = matches

    @property
    def matches_all(self) -> bool:
        """True for ``all()`` / ``global()`` / the empty selector."""
        return isinstance(self._root, (_All, _Global))

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Selector({self._text!r})"

    def __eq__(self, other):
        if isinstance(other, Selector):
            return self._text == other._text
        return NotImplemented

    def __hash__(self):
        return hash(self._text)


# --------------------------------------------------------------------------
# Lexer: produces tokens on demand so the first error in the text wins.

_EOF, _WORD, _STRING, _PUNCT = "eof", "word", "string", "punct"


class _Token:
    __slots__ = ("kind", "text", "value", "start", "end")

    def __init__(self, kind, text, value, start, end):
        self.kind = kind    # _EOF / _WORD / _STRING / _PUNCT
        self.text = text    # exact source text (punct: the operator)
        self.value = value  # word: the word; string: contents without quotes
        self.start = start
        self.end = end

    def describe(self) -> str:
        if self.kind == _EOF:
            return "end of input"
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        return repr(text)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.pos = 0          # scan position for the next token
        self.tok: _Token | None = None       # current (peeked) token
        self.depth = 0

    # -- errors -----------------------------------------------------------
    def error(self, position: int, reason: str) -> SelectorError:
        return SelectorError(self.text, position, reason)

    def expected(self, what: str, tok: _Token | None = None) -> SelectorError:
        tok = tok or self.peek()
        return self.error(tok.start, f"expected {what} (got {tok.describe()})")

    # -- lexing -----------------------------------------------------------
    def _lex(self) -> _Token:
        text, n = self.text, len(self.text)
        i = self.pos
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i >= n:
            return _Token(_EOF, "", None, n, n)
        c = text[i]
        if c in _KEY_CHARS:
            j = i + 1
            while j < n and text[j] in _KEY_CHARS:
                j += 1
            word = text[i:j]
            return _Token(_WORD, word, word, i, j)
        if c == "'" or c == '"':
            j = text.find(c, i + 1)
            if j < 0:
                raise self.error(i, f"unterminated string starting with {c}")
            return _Token(_STRING, text[i:j + 1], text[i + 1:j], i, j + 1)
        two = text[i:i + 2]
        if two in ("==", "!=", "&&", "||"):
            return _Token(_PUNCT, two, two, i, i + 2)
        if c in "(){},!":
            return _Token(_PUNCT, c, c, i, i + 1)
        if c in "=&|":
            raise self.error(i, f"unexpected {c!r} (did you mean {c * 2!r}?)")
        raise self.error(i, f"unexpected character {c!r}")

    def peek(self) -> _Token:
        if self.tok is None:
            self.tok = self._lex()
        return self.tok

    def advance(self) -> _Token:
        tok = self.peek()
        self.pos = tok.end
        self.tok = None
        return tok

    def at_punct(self, p: str) -> bool:
        tok = self.peek()
        return tok.kind == _PUNCT and tok.text == p

    def expect_punct(self, p: str) -> _Token:
        if not self.at_punct(p):
            raise self.expected(repr(p))
        return self.advance()

    def at_word(self, w: str) -> bool:
        tok = self.peek()
        return tok.kind == _WORD and tok.value == w

    def next_after(self, tok: _Token) -> str:
        """The first non-blank character after ``tok`` (or '')."""
        text, i = self.text, tok.end
        while i < len(text) and text[i] in _WHITESPACE:
            i += 1
        return text[i] if i < len(text) else ""

    # -- grammar ----------------------------------------------------------
    def parse(self) -> _Node:
        if self.peek().kind == _EOF:
            return _All()
        node = self.or_expr()
        tok = self.peek()
        if tok.kind != _EOF:
            raise self.error(tok.start,
                             f"unexpected {tok.describe()} after complete expression "
                             "(expected '&&', '||' or end of input)")
        return node

    def or_expr(self) -> _Node:
        nodes = [self.and_expr()]
        while self.at_punct("||"):
            self.advance()
            nodes.append(self.and_expr())
        return _flatten(_Or, nodes)

    def and_expr(self) -> _Node:
        nodes = [self.unary()]
        while self.at_punct("&&"):
            self.advance()
            nodes.append(self.unary())
        return _flatten(_And, nodes)

    def unary(self) -> _Node:
        negated = False
        while self.at_punct("!"):
            self.advance()
            negated = not negated
        node = self.primary()
        if not negated:
            return node
        # "!(!x)" is x, exactly as "!!x" is: keeps the canonical form a fixed point.
        return node.operand if type(node) is _Not else _Not(node)

    def primary(self) -> _Node:
        tok = self.peek()
        if tok.kind == _PUNCT and tok.text == "(":
            if self.depth >= MAX_DEPTH:
                raise self.error(tok.start, f"parentheses nested deeper than {MAX_DEPTH}")
            self.advance()
            self.depth += 1
            node = self.or_expr()
            self.expect_punct(")")
            self.depth -= 1
            return node
        if tok.kind != _WORD:
            raise self.expected("an expression (label key, has(), all() or '(')", tok)
        if tok.value in ("has", "all", "global") and self.next_after(tok) == "(":
            self.advance()
            self.advance()  # "("
            if tok.value == "has":
                key = self.key("a label key inside has()")
                self.expect_punct(")")
                return _Has(key)
            self.expect_punct(")")
            return _All() if tok.value == "all" else _Global()
        key = self.key("a label key")
        return self.operation(key)

    def key(self, what: str) -> str:
        tok = self.peek()
        if tok.kind != _WORD:
            raise self.expected(what, tok)
        if len(tok.value) > MAX_KEY_LENGTH:
            raise self.error(tok.start, f"label key longer than {MAX_KEY_LENGTH} characters")
        self.advance()
        return tok.value

    _OPS_MSG = "an operator ('==', '!=', 'in', 'not in', 'contains', 'starts with', 'ends with')"

    def operation(self, key: str) -> _Node:
        tok = self.peek()
        if tok.kind == _PUNCT and tok.text in ("==", "!="):
            self.advance()
            return _Compare(key, tok.text, self.string())
        if tok.kind != _WORD:
            raise self.expected(f"{self._OPS_MSG} after label {key!r}", tok)
        word = tok.value
        if word in ("in", "notin"):
            self.advance()
            return self.set_literal(key, negated=word == "notin")
        if word == "contains":
            self.advance()
            return _Compare(key, "contains", self.string())
        if word in ("startswith", "endswith"):
            self.advance()
            return _Compare(key, word[:-4] + " with", self.string())
        if word in ("not", "starts", "ends"):
            second = "in" if word == "not" else "with"
            self.advance()
            if not self.at_word(second):
                raise self.expected(f"{second!r} after {word!r}")
            self.advance()
            if word == "not":
                return self.set_literal(key, negated=True)
            return _Compare(key, f"{word} with", self.string())
        raise self.expected(f"{self._OPS_MSG} after label {key!r}", tok)

    def string(self) -> str:
        tok = self.peek()
        if tok.kind != _STRING:
            raise self.expected("a quoted string", tok)
        self.advance()
        return tok.value

    def set_literal(self, key: str, negated: bool) -> _Node:
        self.expect_punct("{")
        values = []
        while not self.at_punct("}"):
            if self.peek().kind != _STRING:
                raise self.expected("a quoted string or '}'")
            values.append(self.advance().value)
            if self.at_punct(","):
                self.advance()  # a trailing comma is allowed, as in Calico
            elif not self.at_punct("}"):
                raise self.expected("',' or '}'")
        self.advance()
        return _InSet(key, values, negated)


# --------------------------------------------------------------------------
# Entry points.

_cache: dict[str, Selector] = {}


def parse(text: str) -> Selector:
    """Parse a Calico selector; raises SelectorError.  Results are cached."""
    if not isinstance(text, str):
        raise TypeError(f"selector must be a str, not {type(text).__name__}")
    sel = _cache.get(text)
    if sel is not None:
        return sel
    sel = Selector(_Parser(text).parse(), text)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[text] = sel
    return sel


def matches(text: str, labels: Mapping[str, str] | None) -> bool:
    """``parse(text).matches(labels)``."""
    return parse(text).matches(labels)
