"""Tests for cni_ipam.ipam.selector (Calico label selector parser/evaluator)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_ipam.ipam import selector as selmod
from cni_ipam.ipam.selector import Selector, SelectorError, matches, parse

NODE = {
    "kubernetes.io/hostname": "node-1",
    "zone": "us-east-1a",
    "example.com/rack-1": "r1",
    "role": "worker",
    "empty": "",
}


def m(text, labels=NODE):
    return parse(text).matches(labels)


# --------------------------------------------------------------------------
# Constructs


@pytest.mark.parametrize("text", ["", "   ", "\t", " \t \n", "all()", " all( ) ", "all ()"])
def test_all_and_empty_match_everything(text):
    sel = parse(text)
    assert sel.matches({}) and sel.matches(NODE)
    assert sel.matches_all
    assert str(sel) == "all()"


def test_global_matches_everything():
    assert m("global()") and m("global()", {})
    assert str(parse("global()")) == "global()"


@pytest.mark.parametrize("text,expected", [
    ("has(zone)", True),
    ("has( zone )", True),
    ("has(kubernetes.io/hostname)", True),
    ("has(example.com/rack-1)", True),
    ("has(empty)", True),            # present with empty value still counts
    ("has(missing)", False),
    ("!has(zone)", False),
    ("!has(missing)", True),
    ("! has(missing)", True),
])
def test_has(text, expected):
    assert m(text) is expected


@pytest.mark.parametrize("text,expected", [
    ("zone == 'us-east-1a'", True),
    ('zone == "us-east-1a"', True),
    ("zone=='us-east-1a'", True),
    ("zone == 'us-east-1b'", False),
    ("missing == ''", False),         # == is false when the label is absent
    ("empty == ''", True),
    ("zone != 'us-east-1b'", True),
    ("zone != 'us-east-1a'", False),
    ("missing != 'x'", True),         # Calico: != is true when absent
    ("missing != ''", True),
    ("kubernetes.io/hostname == 'node-1'", True),
    ("example.com/rack-1 == \"r1\"", True),
])
def test_equality(text, expected):
    assert m(text) is expected


@pytest.mark.parametrize("text,expected", [
    ("zone in {'us-east-1a', 'us-east-1b'}", True),
    ("zone in {\"us-east-1b\",'us-east-1a'}", True),
    ("zone in {'us-east-1b'}", False),
    ("zone in {}", False),
    ("zone in { }", False),
    ("missing in {'x'}", False),
    ("missing in {}", False),
    ("zone not in {'us-east-1b'}", True),
    ("zone not in {'us-east-1a', 'x'}", False),
    ("zone not in {}", True),
    ("missing not in {'x'}", True),   # true when absent
    ("missing not in {}", True),
    ("zone notin {'x'}", True),       # Calico accepts the one-word form
    ("zone not   in {'x'}", True),
    ("zone in {'us-east-1a',}", True),  # Calico accepts a trailing comma
    ("zone in{'us-east-1a'}", True),
])
def test_set_membership(text, expected):
    assert m(text) is expected


@pytest.mark.parametrize("text,expected", [
    ("zone contains 'east'", True),
    ("zone contains ''", True),
    ("zone contains 'west'", False),
    ("missing contains ''", False),
    ("zone starts with 'us-'", True),
    ("zone starts with 'eu-'", False),
    ("zone startswith 'us'", True),
    ("missing starts with ''", False),
    ("zone ends with '1a'", True),
    ("zone ends with '1b'", False),
    ("zone endswith \"a\"", True),
    ("missing ends with ''", False),
    ("!zone contains 'west'", True),
])
def test_string_operators(text, expected):
    assert m(text) is expected


@pytest.mark.parametrize("text,expected", [
    # && binds tighter than ||: this is  true || (false && false)
    ("has(zone) || has(x) && has(y)", True),
    ("(has(zone) || has(x)) && has(y)", False),
    # false && true || true  ==  (false && true) || true
    ("has(x) && has(zone) || has(role)", True),
    ("has(x) && (has(zone) || has(role))", False),
    # ! binds tightest: (!has(zone)) || has(role)
    ("!has(zone) || has(role)", True),
    ("!(has(zone) || has(role))", False),
    ("!has(x) && has(zone)", True),
    ("!(has(x) && has(zone))", True),
    ("!!has(zone)", True),
    ("!!!has(zone)", False),
    ("!(!(has(zone)))", True),
    ("((((has(zone)))))", True),
    ("has(a) || has(b) || has(zone)", True),
    ("has(zone) && has(role) && !has(x)", True),
    ("!zone == 'us-east-1a' || role == 'worker'", True),
])
def test_precedence(text, expected):
    assert m(text) is expected


@pytest.mark.parametrize("text", [
    "has == 'x'", "all == 'x'", "in in {'x'}", "not not in {'x'}",
    "contains contains 'x'", "global != 'x'", "starts starts with 'x'",
    "has ==''", "notin == 'x'",
])
def test_keywords_are_plain_keys_where_a_key_is_expected(text):
    key = text.split()[0]
    sel = parse(text)
    assert str(sel).startswith(key + " ")
    assert parse(str(sel)) == sel


def test_quotes():
    assert m("""v == 'say "hi"'""", {"v": 'say "hi"'})
    assert m('''v == "it's"''', {"v": "it's"})
    assert m("v == ' && || ( ) { } ! '", {"v": " && || ( ) { } ! "})
    assert m("v in {'a,b', \"c}\"}", {"v": "a,b"})
    assert m("v == 'żółw ☃'", {"v": "żółw ☃"})
    # canonical form prefers double quotes, falls back to single quotes
    assert str(parse("v == 'x'")) == 'v == "x"'
    assert str(parse("""v == 'a"b'""")) == """v == 'a"b'"""
    assert str(parse('''v in {'a"b', "c'd"}''')) == '''v in {'a"b', "c'd"}'''


def test_canonical_form():
    cases = {
        "a=='b'": 'a == "b"',
        "  has( x )&&!has(y)": "has(x) && !has(y)",
        "(a == 'b' && has(c)) && d != 'e'": 'a == "b" && has(c) && d != "e"',
        "(has(a) || has(b)) || has(c)": "has(a) || has(b) || has(c)",
        "has(a) || has(b) && has(c)": "has(a) || has(b) && has(c)",
        "(has(a) || has(b)) && has(c)": "(has(a) || has(b)) && has(c)",
        "!(has(a) && has(b))": "!(has(a) && has(b))",
        "!!has(a)": "has(a)",
        "!(!has(a))": "has(a)",
        "!(!(!has(a)))": "!has(a)",
        "k in {'b', 'a', 'b'}": 'k in {"a", "b"}',
        "k notin {}": "k not in {}",
        "k startswith 'x'": 'k starts with "x"',
        "k ends  with 'x'": 'k ends with "x"',
        "(all())": "all()",
    }
    for text, canonical in cases.items():
        assert str(parse(text)) == canonical, text
        assert str(parse(canonical)) == canonical


def test_selector_object_api():
    a, b = parse("has(x) && y == 'z'"), parse("has( x )&&y=='z'")
    assert a == b and hash(a) == hash(b)
    assert a != parse("has(x)")
    assert a.source == "has(x) && y == 'z'"
    assert repr(a) == "Selector('has(x) && y == \"z\"')"
    assert isinstance(a, Selector)
    assert a({"x": "", "y": "z"}) is True
    assert a.matches(None) is False and parse("").matches(None) is True
    assert not a.matches_all


def test_parse_is_cached():
    text = "cache-test == 'yes' && has(cached)"
    assert parse(text) is parse(text)


def test_matches_convenience():
    assert matches("zone == 'us-east-1a'", NODE) is True
    assert matches("zone == 'nope'", NODE) is False
    assert matches("", {}) is True
    with pytest.raises(SelectorError):
        matches("zone ==", NODE)


def test_non_string_rejected():
    with pytest.raises(TypeError):
        parse(None)  # type: ignore[arg-type]


def test_key_length_limit():
    key = "k" * selmod.MAX_KEY_LENGTH
    assert m(f"{key} == 'v'", {key: "v"})
    with pytest.raises(SelectorError) as ei:
        parse(f"has(a) && {key}x == 'v'")
    assert ei.value.position == 10


def test_nesting_limit():
    depth = selmod.MAX_DEPTH
    ok = "(" * depth + "has(a)" + ")" * depth
    assert m(ok, {"a": "1"})
    with pytest.raises(SelectorError) as ei:
        parse("(" * (depth + 1) + "has(a)" + ")" * (depth + 1))
    assert ei.value.position == depth
    with pytest.raises(SelectorError):  # hostile input: no RecursionError
        parse("(" * 100000)
    assert m("!" * 100001 + "has(a)", {"a": "1"}) is False


# --------------------------------------------------------------------------
# Errors and positions


@pytest.mark.parametrize("text,position,fragment", [
    # unbalanced parentheses
    ("(has(a) && has(b)", 17, "expected ')' (got end of input)"),
    ("(has(a) && has(b)))", 18, "unexpected ')'"),
    ("has(a) && (has(b) has(c))", 18, "expected ')' (got 'has')"),
    ("(has(a) || has(b) && (has(c))", 29, "expected ')'"),
    (")", 0, "expected an expression"),
    ("has(a", 5, "expected ')' (got end of input)"),
    ("all(", 4, "expected ')'"),
    ("(has(a) && has(b)", 17, "position 17"),
    # missing operand
    ("has(a) &&", 9, "expected an expression"),
    ("has(a) && && has(b)", 10, "(got '&&')"),
    ("|| has(a)", 0, "(got '||')"),
    ("has(a) || ", 10, "got end of input"),
    ("!", 1, "expected an expression"),
    ("()", 1, "expected an expression"),
    ("zone ==", 7, "expected a quoted string (got end of input)"),
    ("zone == && has(a)", 8, "expected a quoted string (got '&&')"),
    ("zone", 4, "expected an operator"),
    ("== 'x'", 0, "expected an expression"),
    ("zone in", 7, "expected '{'"),
    ("zone in 'a'", 8, "expected '{' (got \"'a'\")"),
    ("has()", 4, "expected a label key inside has()"),
    # bad tokens
    ("zone = 'a'", 5, "unexpected '='"),
    ("has(a) & has(b)", 7, "unexpected '&'"),
    ("has(a) | has(b)", 7, "unexpected '|'"),
    ("zone == 'a' $", 12, "unexpected character '$'"),
    ("zone ~= 'a'", 5, "unexpected character '~'"),
    ("zone like 'a'", 5, "expected an operator ('==', '!=', 'in', 'not in', "
                         "'contains', 'starts with', 'ends with') after label 'zone' "
                         "(got 'like')"),
    ("zone not 'a'", 9, "expected 'in' after 'not'"),
    ("zone starts 'a'", 12, "expected 'with' after 'starts'"),
    ("zone ends wit 'a'", 10, "expected 'with' after 'ends'"),
    ("zone in {'a' 'b'}", 13, "expected ',' or '}'"),
    ("zone in {'a',,}", 13, "expected a quoted string or '}'"),
    ("zone in {,}", 9, "expected a quoted string or '}'"),
    ("zone in {a}", 9, "expected a quoted string or '}' (got 'a')"),
    ("zone in {'a'", 12, "expected ',' or '}' (got end of input)"),
    ("zone == a", 8, "expected a quoted string (got 'a')"),
    ("zöne == 'a'", 1, "unexpected character 'ö'"),
    ("!= 'a'", 0, "expected an expression"),
    # unterminated strings (position = opening quote)
    ("zone == 'abc", 8, "unterminated string"),
    ('zone == "abc\'', 8, "unterminated string"),
    ("zone in {'a', \"b}", 14, "unterminated string"),
    # trailing garbage
    ("has(a) has(b)", 7, "unexpected 'has' after complete expression"),
    ("zone == 'a' 'b'", 12, "after complete expression"),
    ("all() x", 6, "unexpected 'x'"),
    ("zone == 'a')", 11, "unexpected ')'"),
    ("has(a) !", 7, "unexpected '!'"),
    ("has(a) {", 7, "unexpected '{'"),
])
def test_errors_report_position(text, position, fragment):
    with pytest.raises(SelectorError) as ei:
        parse(text)
    err = ei.value
    assert err.position == position, str(err)
    assert err.selector == text
    assert str(err).startswith(f"invalid selector at position {position}: ")
    assert fragment in str(err)
    assert isinstance(err, ValueError)
    assert err.pointer().splitlines()[-1] == " " * position + "^"


def test_error_message_format_example():
    with pytest.raises(SelectorError) as ei:
        parse("(has(a) && has(b) && (has(c) has(d)))")
    assert str(ei.value) == "invalid selector at position 29: expected ')' (got 'has')"
    with pytest.raises(SelectorError) as ei:
        parse("(has(a) && has(b)) && (has(c) && && has(d)")
    assert str(ei.value) == ("invalid selector at position 33: expected an expression "
                             "(label key, has(), all() or '(') (got '&&')")


def test_first_error_wins():
    # The missing operand at 5 is reported, not the stray '$' further on.
    with pytest.raises(SelectorError) as ei:
        parse("a == == 'b' $")
    assert ei.value.position == 5


# --------------------------------------------------------------------------
# Property tests.
#
# A tiny independent AST (tuples), a renderer that makes random but valid
# textual choices, and a reference evaluator with Calico's semantics.

KEYS = ["zone", "kubernetes.io/hostname", "example.com/rack-1", "a", "b_2", "-x.y/z",
        "has", "all", "global", "in", "not", "notin", "contains", "starts", "ends", "with", "9"]
VALUE_POOL = ["", "a", "ab", "b", "x y", "it's", 'say "hi"', "&&", "||", "(", "}",
              "us-east-1a", "ü"]

values = st.one_of(
    st.sampled_from(VALUE_POOL),
    st.text(alphabet="ab '\"(){},!&|=", max_size=5),
).filter(lambda v: not ('"' in v and "'" in v))
keys = st.sampled_from(KEYS)

leaves = st.one_of(
    st.just(("all",)),
    st.just(("global",)),
    st.tuples(st.just("has"), keys),
    st.tuples(st.just("cmp"), st.sampled_from(["==", "!=", "contains", "starts with", "ends with"]),
              keys, values),
    st.tuples(st.just("in"), keys, st.lists(values, max_size=4), st.booleans()),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.just("not"), children),
        st.tuples(st.just("and"), st.lists(children, min_size=2, max_size=4)),
        st.tuples(st.just("or"), st.lists(children, min_size=2, max_size=4)),
    )


asts = st.recursive(leaves, _extend, max_leaves=12)

labelsets = st.dictionaries(keys, st.one_of(st.sampled_from(VALUE_POOL), values), max_size=6)


def ref_eval(node, labels):
    kind = node[0]
    if kind in ("all", "global"):
        return True
    if kind == "has":
        return node[1] in labels
    if kind == "cmp":
        _, op, k, v = node
        if k not in labels:
            return op == "!="
        actual = labels[k]
        return {"==": actual == v, "!=": actual != v, "contains": v in actual,
                "starts with": actual.startswith(v), "ends with": actual.endswith(v)}[op]
    if kind == "in":
        _, k, vals, negated = node
        if k not in labels:
            return negated
        return (labels[k] in vals) != negated
    if kind == "not":
        return not ref_eval(node[1], labels)
    if kind == "and":
        return all(ref_eval(c, labels) for c in node[1])
    if kind == "or":
        return any(ref_eval(c, labels) for c in node[1])
    raise AssertionError(node)


PREC = {"or": 0, "and": 1}


def render(node, rnd: random.Random) -> str:
    """Render with minimal parentheses (so precedence matters), plus random
    extra parentheses, spacing, quoting and operator spellings."""

    def ws():
        return rnd.choice(["", " ", " ", "  ", "\t"])

    def ws1():
        return rnd.choice([" ", "  ", "\t"])

    def quote(v):
        if '"' in v:
            q = "'"
        elif "'" in v:
            q = '"'
        else:
            q = rnd.choice("'\"")
        return q + v + q

    def atom(n, min_prec):
        text = go(n)
        prec = PREC.get(n[0], 2)
        if prec < min_prec or rnd.random() < 0.1:
            return "(" + ws() + text + ws() + ")"
        return text

    def go(n):
        kind = n[0]
        if kind in ("all", "global"):
            return kind + rnd.choice(["", " "]) + "(" + ws() + ")"
        if kind == "has":
            return "has(" + ws() + n[1] + ws() + ")"
        if kind == "cmp":
            _, op, k, v = n
            if op in ("==", "!="):
                return k + ws() + op + ws() + quote(v)
            if op == "contains":
                spelled = "contains"
            else:
                first = op.split()[0]
                spelled = rnd.choice([first + " with", first + "  with", first + "with"])
            return k + ws1() + spelled + ws() + quote(v)
        if kind == "in":
            _, k, vals, negated = n
            op = rnd.choice(["not in", "notin", "not \tin"]) if negated else "in"
            body = ("," + ws()).join(quote(v) for v in vals)
            if vals and rnd.random() < 0.2:
                body += ","
            return k + ws1() + op + ws() + "{" + ws() + body + ws() + "}"
        if kind == "not":
            return "!" + ws() + atom(n[1], 2)
        if kind == "and":
            return (ws() + "&&" + ws()).join(atom(c, 2) for c in n[1])
        if kind == "or":
            return (ws() + "||" + ws()).join(atom(c, 1) for c in n[1])
        raise AssertionError(n)

    return ws() + go(node) + ws()


PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(ast=asts, seed=st.integers(0, 2**32 - 1), labels=st.lists(labelsets, min_size=1, max_size=8))
def test_property_parse_agrees_with_reference(ast, seed, labels):
    text = render(ast, random.Random(seed))
    sel = parse(text)
    for lab in labels:
        assert sel.matches(lab) == ref_eval(ast, lab), (text, lab)
    # cross-check with labels built from the AST's own values, so that
    # equality/set hits are exercised too
    rnd = random.Random(seed ^ 0x5EED)
    mentioned = []

    def collect(n):
        if n[0] == "cmp":
            mentioned.append((n[2], n[3]))
        elif n[0] == "in":
            mentioned.extend((n[1], v) for v in n[2])
        elif n[0] in ("and", "or"):
            for c in n[1]:
                collect(c)
        elif n[0] == "not":
            collect(n[1])

    collect(ast)
    for _ in range(4):
        lab = dict(rnd.sample(mentioned, k=rnd.randint(0, len(mentioned))))
        assert sel.matches(lab) == ref_eval(ast, lab), (text, lab)


@PROPS
@given(ast=asts, seed=st.integers(0, 2**32 - 1), labels=st.lists(labelsets, min_size=1, max_size=8))
def test_property_canonical_form_round_trips(ast, seed, labels):
    text = render(ast, random.Random(seed))
    sel = parse(text)
    canonical = str(sel)
    again = parse(canonical)
    assert str(again) == canonical          # canonical form is a fixed point
    assert again == sel
    for lab in labels:
        assert again.matches(lab) == sel.matches(lab) == ref_eval(ast, lab)


SELECTORISH = st.lists(st.sampled_from([
    "(", ")", "{", "}", ",", "!", "!=", "==", "=", "&&", "&", "||", "|", "'", '"', "'a'", '"b"',
    " ", "\t", "\n", "has(", "has", "all()", "all", "global()", "in", "not", "notin", "contains",
    "starts", "with", "ends", "zone", "a", "x.y/z", "$", "é", "\x00", "-",
]), max_size=25).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=st.one_of(st.text(max_size=40), SELECTORISH))
def test_property_arbitrary_text_only_raises_selector_error(text):
    try:
        sel = parse(text)
    except SelectorError as err:
        assert 0 <= err.position <= len(text)
        assert err.selector == text
        assert str(err).startswith(f"invalid selector at position {err.position}: ")
        return
    # anything that parses must also render and re-parse to the same thing
    canonical = str(sel)
    assert parse(canonical) == sel
    assert isinstance(sel.matches({}), bool)
    assert isinstance(sel.matches({"zone": "a", "a": "'a'"}), bool)
