"""Tests for the CNI protocol layer: cni_ipam.cni.{errors,version,env,netconf,result,skel}."""

from __future__ import annotations

import io
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cni_ipam.cni.env import CNIEnv, KNOWN_CNI_ARGS, parse_cni_args, parse_env, parse_ip
from cni_ipam.cni.errors import (
    CNIError,
    ERR_DECODING_FAILURE,
    ERR_INCOMPATIBLE_CNI_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_ENVIRONMENT_VARIABLES,
    ERR_INVALID_NETWORK_CONFIG,
    error_dict,
)
from cni_ipam.cni.netconf import NetConf, parse_netconf, prev_result_ips, requested_ips
from cni_ipam.cni.result import IPConfig, render_result
from cni_ipam.cni.skel import run
from cni_ipam.cni.version import (
    SUPPORTED_VERSIONS,
    check_version,
    compare_versions,
    parse_version,
    version_at_least,
    version_response,
)

ROOT = Path(__file__).resolve().parents[1]
ALL_VERSIONS = list(SUPPORTED_VERSIONS)

BASE_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "0123456789abcdef",
    "CNI_NETNS": "/var/run/netns/cni-1",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
}


def env_for(command: str, **over: str | None) -> dict[str, str]:
    e = dict(BASE_ENV, CNI_COMMAND=command)
    for k, v in over.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return e


def conf_bytes(version: str | None = "1.1.0", **extra) -> bytes:
    doc: dict = {"name": "net1", "type": "cni-ipam", "ipam": {"type": "cni-ipam"}}
    if version is not None:
        doc["cniVersion"] = version
    doc.update(extra)
    return json.dumps(doc).encode()


def code_of(fn, *a, **kw) -> int:
    with pytest.raises(CNIError) as ei:
        fn(*a, **kw)
    return ei.value.code


# ==========================================================================
# errors
# ==========================================================================

def test_error_codes_match_spec():
    from cni_ipam.cni import errors as E
    assert (E.ERR_INCOMPATIBLE_CNI_VERSION, E.ERR_UNSUPPORTED_FIELD, E.ERR_UNKNOWN_CONTAINER,
            E.ERR_INVALID_ENVIRONMENT_VARIABLES, E.ERR_IO_FAILURE, E.ERR_DECODING_FAILURE,
            E.ERR_INVALID_NETWORK_CONFIG, E.ERR_TRY_AGAIN_LATER, E.ERR_PLUGIN_NOT_AVAILABLE,
            E.ERR_LIMITED_CONNECTIVITY, E.ERR_INTERNAL) == (1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 999)


def test_error_dict_for_cni_error():
    e = CNIError(7, "Invalid Configuration", "Network 192.168.0.0/31 too small")
    assert error_dict("0.4.0", e) == {
        "cniVersion": "0.4.0", "code": 7, "msg": "Invalid Configuration",
        "details": "Network 192.168.0.0/31 too small",
    }
    assert error_dict("1.1.0", CNIError(11, "busy"))["details"] == ""


def test_error_dict_for_other_exception_is_internal():
    d = error_dict("1.0.0", KeyError("x"))
    assert d == {"cniVersion": "1.0.0", "code": 999,
                 "msg": "internal error: KeyError: 'x'", "details": ""}


def test_cni_error_attributes_and_str():
    e = CNIError(4, "bad env", "CNI_IFNAME", cni_version="0.3.1")
    assert (e.code, e.msg, e.details, e.cni_version) == (4, "bad env", "CNI_IFNAME", "0.3.1")
    assert str(e) == "[4] bad env: CNI_IFNAME"
    assert str(CNIError(4, "bad env")) == "[4] bad env"
    assert isinstance(e, Exception)


# ==========================================================================
# version
# ==========================================================================

@pytest.mark.parametrize("text,expected", [
    ("0.1.0", (0, 1, 0)), ("1.1.0", (1, 1, 0)), ("1", (1, 0, 0)), ("0.4", (0, 4, 0)),
    ("", (0, 1, 0)), ("10.20.30", (10, 20, 30)),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["v1.0.0", "1.0.0.0", "1..0", "a.b.c", "1.0.0-rc1", " 1.0.0", "1.0.", "١.٠.٠"])
def test_parse_version_rejects(text):
    with pytest.raises(ValueError):
        parse_version(text)


def test_compare_versions():
    assert compare_versions("0.3.1", "0.4.0") == -1
    assert compare_versions("1.0.0", "1.0") == 0
    assert compare_versions("1.1.0", "0.10.0") == 1
    assert version_at_least("0.4.0", "0.4.0")
    assert not version_at_least("0.3.1", "0.4.0")


@pytest.mark.parametrize("command,version,ok", [
    ("ADD", "0.1.0", True), ("ADD", "1.1.0", True), ("DEL", "0.2.0", True),
    ("ADD", "1.0", False), ("ADD", "2.0.0", False), ("ADD", "garbage", False),
    ("CHECK", "0.3.1", False), ("CHECK", "0.4.0", True), ("CHECK", "1.0.0", True),
    ("CHECK", "0.5.0", False), ("CHECK", "nope", False),
    ("GC", "1.0.0", False), ("GC", "1.1.0", True),
    ("STATUS", "0.4.0", False), ("STATUS", "1.1.0", True),
])
def test_check_version(command, version, ok):
    if ok:
        check_version(version, command)
    else:
        assert code_of(check_version, version, command) == ERR_INCOMPATIBLE_CNI_VERSION


def test_check_version_gate_message():
    with pytest.raises(CNIError) as ei:
        check_version("0.3.1", "CHECK")
    assert ei.value.msg == "config version does not allow CHECK"


def test_version_response():
    expected_list = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
    assert version_response(b"") == {"cniVersion": "1.1.0", "supportedVersions": expected_list}
    assert version_response(None)["cniVersion"] == "1.1.0"
    assert version_response(b'{"cniVersion": "0.4.0"}') == {"cniVersion": "0.4.0",
                                                            "supportedVersions": expected_list}
    assert version_response(b'{"cniVersion": "9.9.9"}')["cniVersion"] == "1.1.0"
    assert version_response(b'{"cniVersion": 1}')["cniVersion"] == "1.1.0"
    assert version_response(b"\xff\xfe not json")["cniVersion"] == "1.1.0"
    assert version_response(b"[" * 100000)["cniVersion"] == "1.1.0"


@given(st.binary(max_size=300))
def test_version_response_never_fails(data):
    r = version_response(data)
    assert set(r) == {"cniVersion", "supportedVersions"}
    assert r["cniVersion"] in SUPPORTED_VERSIONS
    assert r["supportedVersions"] == ALL_VERSIONS


@given(st.sampled_from(ALL_VERSIONS))
def test_version_response_echoes_supported(v):
    assert version_response(json.dumps({"cniVersion": v}).encode())["cniVersion"] == v


# ==========================================================================
# env
# ==========================================================================

def test_parse_env_add():
    e = parse_env(env_for("ADD", CNI_ARGS="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"))
    assert e == CNIEnv(command="ADD", container_id="0123456789abcdef",
                       netns="/var/run/netns/cni-1", ifname="eth0",
                       args={"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "web-0"},
                       path="/opt/cni/bin")


def test_path_dirs():
    e = parse_env(env_for("ADD", CNI_PATH="/opt/cni/bin::/usr/lib/cni"))
    assert e.path_dirs == ["/opt/cni/bin", "/usr/lib/cni"]


@pytest.mark.parametrize("command,drop,missing", [
    ("ADD", ["CNI_NETNS"], "CNI_NETNS"),
    ("ADD", ["CNI_CONTAINERID", "CNI_PATH"], "CNI_CONTAINERID,CNI_PATH"),
    ("CHECK", ["CNI_IFNAME"], "CNI_IFNAME"),
    ("DEL", ["CNI_CONTAINERID"], "CNI_CONTAINERID"),
    ("DEL", ["CNI_PATH"], "CNI_PATH"),
    ("GC", ["CNI_PATH"], "CNI_PATH"),
    ("STATUS", ["CNI_PATH"], "CNI_PATH"),
])
def test_parse_env_missing(command, drop, missing):
    with pytest.raises(CNIError) as ei:
        parse_env(env_for(command, **{k: None for k in drop}))
    assert ei.value.code == ERR_INVALID_ENVIRONMENT_VARIABLES
    assert ei.value.msg == f"required env variables [{missing}] missing"


def test_empty_value_counts_as_missing():
    assert code_of(parse_env, env_for("ADD", CNI_NETNS="")) == 4


def test_del_allows_empty_netns():
    e = parse_env(env_for("DEL", CNI_NETNS=""))
    assert e.command == "DEL" and e.netns == ""


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_status_need_only_path(command):
    e = parse_env({"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin"})
    assert (e.command, e.container_id, e.ifname, e.netns, e.args) == (command, "", "", "", {})


def test_gc_ignores_cni_args_and_unrequired_vars():
    e = parse_env({"CNI_COMMAND": "GC", "CNI_PATH": "/p", "CNI_ARGS": "junk",
                   "CNI_CONTAINERID": "!!bad", "CNI_IFNAME": "x" * 40})
    assert e.args == {} and e.container_id == "!!bad"


def test_version_needs_nothing():
    assert parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"


def test_missing_or_unknown_command():
    with pytest.raises(CNIError) as ei:
        parse_env({})
    assert ei.value.code == 4 and "CNI_COMMAND" in ei.value.msg
    with pytest.raises(CNIError) as ei:
        parse_env(env_for("add"))
    assert ei.value.code == 4 and "unknown CNI_COMMAND" in ei.value.msg


@pytest.mark.parametrize("cid", ["-abc", "_abc", ".abc", "ab c", "ab/c", "abc\n", "ab;c", "é"])
def test_invalid_container_id(cid):
    assert code_of(parse_env, env_for("ADD", CNI_CONTAINERID=cid)) == 4


@pytest.mark.parametrize("cid", ["a", "A-b_c.d", "0" * 64, "k8s_POD.x-1"])
def test_valid_container_id(cid):
    assert parse_env(env_for("DEL", CNI_CONTAINERID=cid)).container_id == cid


@pytest.mark.parametrize("ifname", ["x" * 16, ".", "..", "a/b", "a:b", "a b", "a\tb", "a\nb",
                                    "a\u00a0b", "a\u3000b", "é" * 8])
def test_invalid_ifname(ifname):
    assert code_of(parse_env, env_for("ADD", CNI_IFNAME=ifname)) == 4


@pytest.mark.parametrize("ifname", ["eth0", "x" * 15, "net1.100", "é" * 7, "a\x1cb", "..."])
def test_valid_ifname(ifname):
    assert parse_env(env_for("CHECK", CNI_IFNAME=ifname)).ifname == ifname


def test_ifname_with_bad_surrogate():
    assert code_of(parse_env, env_for("ADD", CNI_IFNAME="a\ud800")) == 4
    # an undecodable byte from os.environ (surrogate escape) counts as one byte
    assert parse_env(env_for("ADD", CNI_IFNAME="eth\udcff")).ifname == "eth\udcff"


_env_text = st.one_of(st.sampled_from(["", "ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "eth0",
                                       "abc", "/p", "IgnoreUnknown=1;X=y"]), st.text(max_size=20))


@given(st.fixed_dictionaries({}, optional={
    k: _env_text for k in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")}))
def test_parse_env_total(environ):
    try:
        e = parse_env(environ)
    except CNIError as err:
        assert err.code == ERR_INVALID_ENVIRONMENT_VARIABLES
    else:
        assert e.command in ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")
        if e.command in ("ADD", "CHECK", "DEL"):
            assert e.container_id and e.ifname and e.path
        if e.command in ("ADD", "CHECK"):
            assert e.netns


# -- CNI_ARGS -----------------------------------------------------------------

def test_parse_cni_args_basic():
    assert parse_cni_args("") == {}
    assert parse_cni_args("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u") == {
        "K8S_POD_NAMESPACE": "ns", "K8S_POD_NAME": "p", "K8S_POD_INFRA_CONTAINER_ID": "abc", "K8S_POD_UID": "u"}
    assert parse_cni_args("K8S_POD_NAME=a;K8S_POD_NAME=b") == {"K8S_POD_NAME": "b"}
    assert parse_cni_args("K8S_POD_NAME=") == {"K8S_POD_NAME": ""}


@pytest.mark.parametrize("flag", ["1", "true", "TRUE", "True"])
def test_ignore_unknown(flag):
    assert parse_cni_args(f"FOO=bar;IgnoreUnknown={flag}") == {"FOO": "bar", "IgnoreUnknown": flag}


@pytest.mark.parametrize("s", [
    "FOO=bar",                               # unknown
    "FOO=bar;IgnoreUnknown=0",               # unknown, not ignored
    "FOO=bar;IgnoreUnknown=false",
    "IgnoreUnknown=yes",                     # not a bool
    "K8S_POD_NAME",                          # no '='
    "K8S_POD_NAME=a=b",                      # two '='
    "K8S_POD_NAME=a;",                       # empty pair
    ";K8S_POD_NAME=a",
    "k8s_pod_name=a",                        # keys are case-sensitive
    "=x",                                    # empty key is unknown
    "IP=10.0.0.300",
    "IP=10.0.0.1,",
    "IP=10.0.0.1,,10.0.0.2",
    "IP=fe80::1%eth0",
    "IP=hello",
])
def test_parse_cni_args_errors(s):
    assert code_of(parse_cni_args, s) == ERR_INVALID_ENVIRONMENT_VARIABLES


def test_parse_cni_args_ip_list():
    assert parse_cni_args("IP=10.0.0.1, fd00::1 ,10.1.0.0/16") == {"IP": "10.0.0.1, fd00::1 ,10.1.0.0/16"}
    assert parse_cni_args("IP=") == {"IP": ""}
    assert parse_cni_args("=x;IgnoreUnknown=1") == {"": "x", "IgnoreUnknown": "1"}


def test_parse_env_bad_cni_args_is_code_4():
    assert code_of(parse_env, env_for("ADD", CNI_ARGS="NOPE=1")) == 4
    assert code_of(parse_env, env_for("DEL", CNI_ARGS="IP=bad")) == 4


_arg_value = st.text(st.characters(blacklist_characters=";=", blacklist_categories=("Cs",)), max_size=20)
_ip = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(
    st.fixed_dictionaries({}, optional={
        "K8S_POD_NAMESPACE": _arg_value,
        "K8S_POD_NAME": _arg_value,
        "K8S_POD_INFRA_CONTAINER_ID": _arg_value,
        "K8S_POD_UID": _arg_value,
        "IP": st.lists(_ip, max_size=4).map(",".join),
        "IgnoreUnknown": st.sampled_from(["1", "true", "TRUE", "0", "false", "False"]),
    }),
    st.data(),
)
def test_parse_cni_args_round_trip(known, data):
    d = dict(known)
    ignore = d.get("IgnoreUnknown", "0").lower() in ("1", "true")
    if ignore:
        extra = data.draw(st.dictionaries(_arg_value.filter(lambda k: k not in KNOWN_CNI_ARGS),
                                          _arg_value, max_size=3))
        d.update(extra)
    if not d:
        return
    items = list(d.items())
    data.draw(st.randoms()).shuffle(items)
    s = ";".join(f"{k}={v}" for k, v in items)
    assert parse_cni_args(s) == d


@given(st.text(max_size=80))
def test_parse_cni_args_total(s):
    try:
        out = parse_cni_args(s)
    except CNIError as e:
        assert e.code == ERR_INVALID_ENVIRONMENT_VARIABLES
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())
        assert set(out) <= KNOWN_CNI_ARGS or out.get("IgnoreUnknown", "").lower() in ("1", "true")


def test_parse_ip():
    assert parse_ip("10.1.2.3") == ipaddress.ip_address("10.1.2.3")
    assert parse_ip("10.1.2.3/24") == ipaddress.ip_address("10.1.2.3")
    assert parse_ip("fd00::5/64") == ipaddress.ip_address("fd00::5")
    for bad in ["10.1.2.3/33", "010.1.2.3", "", "fe80::1%eth0", "10.1.2.3/24/1"]:
        with pytest.raises(ValueError):
            parse_ip(bad)
    with pytest.raises(ValueError):
        parse_ip(5)  # type: ignore[arg-type]


# ==========================================================================
# netconf
# ==========================================================================

def test_parse_netconf_basic():
    raw = {"cniVersion": "1.0.0", "name": "net1", "type": "bridge",
           "ipam": {"type": "cni-ipam", "pool": "a"},
           "runtimeConfig": {"ips": ["10.0.0.9"]}, "args": {"cni": {"ips": []}},
           "prevResult": {"cniVersion": "1.0.0", "ips": []}, "extra": 1}
    c = parse_netconf(json.dumps(raw).encode(), "ADD")
    assert c == NetConf(cni_version="1.0.0", name="net1", type="bridge",
                        ipam={"type": "cni-ipam", "pool": "a"},
                        runtime_config={"ips": ["10.0.0.9"]}, args={"cni": {"ips": []}},
                        prev_result={"cniVersion": "1.0.0", "ips": []},
                        valid_attachments=None, raw=raw)


@pytest.mark.parametrize("version_field", [{}, {"cniVersion": ""}, {"cniVersion": None}])
def test_missing_version_is_010(version_field):
    doc = {"name": "n", **version_field}
    c = parse_netconf(json.dumps(doc).encode(), "ADD")
    assert c.cni_version == "0.1.0"
    assert (c.type, c.ipam, c.runtime_config, c.args, c.prev_result) == ("", {}, {}, {}, None)


def test_nulls_are_absent():
    c = parse_netconf(b'{"name":"n","cniVersion":"1.1.0","type":null,"ipam":null,'
                      b'"runtimeConfig":null,"args":null,"prevResult":null}', "ADD")
    assert (c.type, c.ipam, c.runtime_config, c.args, c.prev_result) == ("", {}, {}, {}, None)


@pytest.mark.parametrize("data", [
    b"", b"   ", b"not json", b"\xff\xfe{}", b'{"name": "n"', b"[1, 2]", b'"str"', b"42", b"null",
    b'{"name": "n", "x": NaN}', b'{"name": "n", "x": Infinity}', "\ufeff{}".encode(),
    b"[" * 100000 + b"]" * 100000, b'{"name": "\xc3\x28"}',
])
def test_decode_failures_are_6(data):
    assert code_of(parse_netconf, data, "ADD") == ERR_DECODING_FAILURE


@pytest.mark.parametrize("doc", [
    {"cniVersion": "1.1.0"},
    {"cniVersion": "1.1.0", "name": ""},
    {"cniVersion": "1.1.0", "name": None},
    {"cniVersion": "1.1.0", "name": 5},
    {"cniVersion": "1.1.0", "name": "-bad"},
    {"cniVersion": "1.1.0", "name": "has space"},
    {"cniVersion": "1.1.0", "name": "n", "ipam": []},
    {"cniVersion": "1.1.0", "name": "n", "ipam": "x"},
    {"cniVersion": "1.1.0", "name": "n", "type": 3},
    {"cniVersion": "1.1.0", "name": "n", "runtimeConfig": [1]},
    {"cniVersion": "1.1.0", "name": "n", "args": "a=b"},
    {"cniVersion": "1.1.0", "name": "n", "prevResult": []},
    {"cniVersion": 1.0, "name": "n"},
    {"cniVersion": "9.9.9"},                   # name is checked before the version (as in Go)
])
def test_invalid_config_is_7(doc):
    assert code_of(parse_netconf, json.dumps(doc).encode(), "ADD") == ERR_INVALID_NETWORK_CONFIG


@pytest.mark.parametrize("version,command", [
    ("9.9.9", "ADD"), ("1.0", "ADD"), ("x", "DEL"), ("0.3.1", "CHECK"), ("0.2.0", "CHECK"),
    ("1.0.0", "GC"), ("1.0.0", "STATUS"), ("0.4.0", "GC"),
])
def test_version_problems_are_1(version, command):
    assert code_of(parse_netconf, conf_bytes(version), command) == ERR_INCOMPATIBLE_CNI_VERSION


def test_missing_version_cannot_check():
    assert code_of(parse_netconf, conf_bytes(None), "CHECK") == ERR_INCOMPATIBLE_CNI_VERSION


@pytest.mark.parametrize("version,command", [
    ("0.4.0", "CHECK"), ("1.0.0", "CHECK"), ("1.1.0", "GC"), ("1.1.0", "STATUS"), ("0.1.0", "DEL"),
])
def test_version_allowed(version, command):
    assert parse_netconf(conf_bytes(version), command).cni_version == version


def test_error_carries_config_version_once_known():
    with pytest.raises(CNIError) as ei:
        parse_netconf(conf_bytes("0.4.0", ipam=[]), "ADD")
    assert ei.value.cni_version == "0.4.0"
    with pytest.raises(CNIError) as ei:
        parse_netconf(conf_bytes("0.3.1"), "CHECK")     # supported, but gated
    assert ei.value.cni_version == "0.3.1"
    with pytest.raises(CNIError) as ei:
        parse_netconf(conf_bytes("7.0.0"), "ADD")        # not ours: no version to echo
    assert ei.value.cni_version is None
    with pytest.raises(CNIError) as ei:
        parse_netconf(b'{"cniVersion": "0.2.0"}', "ADD")  # missing name, version known
    assert (ei.value.code, ei.value.cni_version) == (7, "0.2.0")
    with pytest.raises(CNIError) as ei:
        parse_netconf(b'{"name": "n", "ipam": 1}', "ADD")  # no cniVersion = 0.1.0
    assert (ei.value.code, ei.value.cni_version) == (7, "0.1.0")


def test_str_stdin_accepted():
    assert parse_netconf('{"name":"n","cniVersion":"0.3.1"}', "ADD").cni_version == "0.3.1"


# -- GC attachments -----------------------------------------------------------------

def test_valid_attachments():
    atts = [{"containerID": "c1", "ifname": "eth0"}, {"containerID": "c2", "ifname": "net1"}]
    c = parse_netconf(conf_bytes(**{"cni.dev/valid-attachments": atts}), "GC")
    assert c.valid_attachments == [("c1", "eth0"), ("c2", "net1")]
    c = parse_netconf(conf_bytes(**{"cni.dev/attachments": atts[:1]}), "GC")
    assert c.valid_attachments == [("c1", "eth0")]
    c = parse_netconf(conf_bytes(**{"cni.dev/valid-attachments": [],
                                    "cni.dev/attachments": atts}), "GC")
    assert c.valid_attachments == []              # the current key wins, even when empty
    assert parse_netconf(conf_bytes(), "GC").valid_attachments is None
    assert parse_netconf(conf_bytes(**{"cni.dev/valid-attachments": atts}), "ADD").valid_attachments is None


@pytest.mark.parametrize("value", [
    {"containerID": "c"}, "c1", [{"containerID": "c1"}], [{"ifname": "eth0"}],
    [{"containerID": 1, "ifname": "eth0"}], ["c1/eth0"],
])
def test_bad_attachments_are_7(value):
    with pytest.raises(CNIError) as ei:
        parse_netconf(conf_bytes(**{"cni.dev/valid-attachments": value}), "GC")
    assert ei.value.code == 7 and ei.value.cni_version == "1.1.0"


# -- requested IPs ------------------------------------------------------------------

def _env(args: dict | None = None) -> CNIEnv:
    return CNIEnv("ADD", "c1", "/ns", "eth0", args or {}, "/opt/cni/bin")


def _conf(**extra) -> NetConf:
    return parse_netconf(conf_bytes(**extra), "ADD")


A = ipaddress.ip_address


def test_requested_ips_none():
    assert requested_ips(_env(), _conf()) == []


def test_requested_ips_runtime_config():
    c = _conf(runtimeConfig={"ips": ["10.1.2.3/24", "fd00::7", "10.1.2.3"]})
    assert requested_ips(_env(), c) == [A("10.1.2.3"), A("fd00::7")]


def test_requested_ips_args_cni():
    c = _conf(args={"cni": {"ips": ["10.9.0.1"]}, "other": {"x": 1}})
    assert requested_ips(_env(), c) == [A("10.9.0.1")]


def test_requested_ips_cni_args():
    assert requested_ips(_env({"IP": "10.0.0.1,fd00::1"}), _conf()) == [A("10.0.0.1"), A("fd00::1")]


def test_requested_ips_precedence():
    env = _env({"IP": "10.0.0.1"})
    assert requested_ips(env, _conf(args={"cni": {"ips": ["10.0.0.2"]}})) == [A("10.0.0.2")]
    both = _conf(args={"cni": {"ips": ["10.0.0.2"]}}, runtimeConfig={"ips": ["10.0.0.3"]})
    assert requested_ips(env, both) == [A("10.0.0.3")]
    empty_rc = _conf(args={"cni": {"ips": ["10.0.0.2"]}}, runtimeConfig={"ips": []})
    assert requested_ips(env, empty_rc) == [A("10.0.0.2")]


@pytest.mark.parametrize("extra", [
    {"runtimeConfig": {"ips": "10.0.0.1"}},
    {"runtimeConfig": {"ips": [1]}},
    {"runtimeConfig": {"ips": ["10.0.0.256"]}},
    {"args": {"cni": ["10.0.0.1"]}},
    {"args": {"cni": {"ips": ["nope"]}}},
    {"args": {"cni": {"ips": {"a": 1}}}},
    # an unused (lower-precedence) source is still validated
    {"runtimeConfig": {"ips": ["10.0.0.1"]}, "args": {"cni": {"ips": ["bad"]}}},
])
def test_requested_ips_invalid_is_7(extra):
    assert code_of(requested_ips, _env(), _conf(**extra)) == ERR_INVALID_NETWORK_CONFIG


def test_requested_ips_bad_env_args_is_7():
    assert code_of(requested_ips, _env({"IP": "x"}), _conf()) == ERR_INVALID_NETWORK_CONFIG


# -- prevResult ---------------------------------------------------------------------

def _check_conf(version: str, prev: dict | None) -> NetConf:
    extra = {} if prev is None else {"prevResult": prev}
    return parse_netconf(conf_bytes(version, **extra), "CHECK" if version >= "0.4.0" else "DEL")


def test_prev_result_ips_current_format():
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.0.0.5/26", "gateway": "10.0.0.1", "interface": 0},
                    {"address": "fd00:0:0::5/64"}]}
    assert prev_result_ips(_check_conf("1.0.0", prev)) == {"10.0.0.5", "fd00::5"}


def test_prev_result_ips_040_format():
    prev = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.5/32"}]}
    assert prev_result_ips(_check_conf("0.4.0", prev)) == {"10.0.0.5"}


def test_prev_result_ips_020_format():
    prev = {"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.5/26", "gateway": "10.0.0.1"},
            "ip6": {"ip": "fd00::5/64"}}
    assert prev_result_ips(_check_conf("0.2.0", prev)) == {"10.0.0.5", "fd00::5"}


def test_prev_result_ips_empty():
    assert prev_result_ips(_check_conf("1.1.0", {"cniVersion": "1.1.0"})) == set()


def test_prev_result_missing_is_7():
    with pytest.raises(CNIError) as ei:
        prev_result_ips(_check_conf("1.1.0", None))
    assert ei.value.code == 7 and "prevResult" in ei.value.msg


@pytest.mark.parametrize("prev", [
    {"ips": "10.0.0.5/26"}, {"ips": ["10.0.0.5/26"]}, {"ips": [{"address": "bogus"}]},
    {"ips": [{"version": "4"}]}, {"ip4": "10.0.0.5"}, {"ip4": {"ip": 7}},
])
def test_prev_result_malformed_is_7(prev):
    assert code_of(prev_result_ips, _check_conf("1.1.0", prev)) == 7


# -- any input: NetConf or CNIError(1/6/7), nothing else ----------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
    max_leaves=15,
)
# name and cniVersion are mostly valid so that the other fields get exercised.
_required_fields = {
    "cniVersion": st.one_of(st.sampled_from(ALL_VERSIONS), st.sampled_from(ALL_VERSIONS),
                            st.sampled_from(ALL_VERSIONS), st.sampled_from(["", "2.0.0", "1.0"]), _json),
    "name": st.one_of(st.just("net1"), st.just("net1"), st.just("net1"),
                      st.sampled_from(["", "-x", "a b"]), _json),
}
_field_values = {
    "type": _json,
    "ipam": _json,
    "runtimeConfig": st.fixed_dictionaries({"ips": st.lists(_ip | _json, max_size=3)}) | _json,
    "args": st.fixed_dictionaries({"cni": st.fixed_dictionaries({"ips": st.lists(_ip | _json, max_size=3)})}) | _json,
    "prevResult": _json,
    "cni.dev/valid-attachments": st.lists(
        st.fixed_dictionaries({"containerID": _json, "ifname": _json}) | _json, max_size=3) | _json,
}
_commands = st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"])


def _check_total(data: bytes, command: str) -> None:
    try:
        conf = parse_netconf(data, command)
    except CNIError as e:
        assert e.code in (1, 6, 7), e
        return
    assert isinstance(conf, NetConf)
    assert conf.cni_version in SUPPORTED_VERSIONS
    # the derived helpers are total too
    for fn in (lambda: requested_ips(_env(), conf), lambda: prev_result_ips(conf)):
        try:
            fn()
        except CNIError as e:
            assert e.code == 7


@settings(max_examples=300)
@given(st.binary(max_size=200), _commands)
def test_parse_netconf_any_bytes(data, command):
    _check_total(data, command)


@settings(max_examples=300)
@given(st.fixed_dictionaries(_required_fields, optional=_field_values), _commands)
def test_parse_netconf_any_json_object(doc, command):
    _check_total(json.dumps(doc).encode(), command)


# ==========================================================================
# result
# ==========================================================================

V4 = IPConfig(ipaddress.ip_interface("10.0.0.5/26"), ipaddress.ip_address("10.0.0.1"))
V4B = IPConfig(ipaddress.ip_interface("10.0.1.5/26"))
V6 = IPConfig(ipaddress.ip_interface("fd00::5/64"), ipaddress.ip_address("fd00::1"))
ROUTES = [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}, {"dst": "::/0", "gw": "fd00::1"},
          {"dst": "192.168.0.0/16"}]
DNS = {"nameservers": ["10.0.0.2"], "domain": "cluster.local", "search": [], "options": None}


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_render_020(version):
    r = render_result(version, [V4, V4B, V6], ROUTES, DNS)
    assert r == {
        "cniVersion": version,
        "ip4": {"ip": "10.0.0.5/26", "gateway": "10.0.0.1",
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}, {"dst": "192.168.0.0/16"}]},
        "ip6": {"ip": "fd00::5/64", "gateway": "fd00::1", "routes": [{"dst": "::/0", "gw": "fd00::1"}]},
        "dns": {"nameservers": ["10.0.0.2"], "domain": "cluster.local"},
    }


def test_render_020_single_family_drops_other_routes():
    r = render_result("0.2.0", [V4B], ROUTES, None)
    assert r == {"cniVersion": "0.2.0",
                 "ip4": {"ip": "10.0.1.5/26",
                         "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}, {"dst": "192.168.0.0/16"}]}}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_render_040(version):
    r = render_result(version, [V4, V6], ROUTES[:1], None)
    assert r == {
        "cniVersion": version,
        "ips": [{"version": "4", "address": "10.0.0.5/26", "gateway": "10.0.0.1"},
                {"version": "6", "address": "fd00::5/64", "gateway": "fd00::1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
    }


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_render_100(version):
    r = render_result(version, [V4B], [], {"nameservers": ["10.0.0.2"]})
    assert r == {"cniVersion": version, "ips": [{"address": "10.0.1.5/26"}],
                 "dns": {"nameservers": ["10.0.0.2"]}}


def test_route_extra_fields_only_in_110():
    route = {"dst": "10.0.0.0/8", "gw": "10.0.0.1", "mtu": 1400, "priority": 10, "table": 100}
    assert render_result("1.1.0", [V4], [route], None)["routes"] == [route]
    assert render_result("1.0.0", [V4], [route], None)["routes"] == [{"dst": "10.0.0.0/8", "gw": "10.0.0.1"}]
    assert render_result("0.2.0", [V4], [route], None)["ip4"]["routes"] == [{"dst": "10.0.0.0/8", "gw": "10.0.0.1"}]


def test_route_objects_become_strings():
    route = {"dst": ipaddress.ip_network("10.0.0.0/8"), "gw": ipaddress.ip_address("10.0.0.1")}
    r = render_result("1.1.0", [V4], [route], None)
    assert r["routes"] == [{"dst": "10.0.0.0/8", "gw": "10.0.0.1"}]
    json.dumps(r)


def test_v4_route_via_v6_gateway_allowed():
    r = render_result("1.0.0", [V4], [{"dst": "10.0.0.0/8", "gw": "fe80::1"}], None)
    assert r["routes"] == [{"dst": "10.0.0.0/8", "gw": "fe80::1"}]


def test_empty_dns_omitted():
    for dns in (None, {}, {"nameservers": [], "search": [], "domain": ""}):
        assert "dns" not in render_result("1.1.0", [V4], [], dns)
        assert "dns" not in render_result("0.2.0", [V4], [], dns)


def test_render_unsupported_version():
    assert code_of(render_result, "2.0.0", [V4], [], None) == ERR_INCOMPATIBLE_CNI_VERSION


def test_render_rejects_bad_inputs():
    with pytest.raises(ValueError):
        render_result("1.1.0", [V4], [{"dst": "nope"}], None)
    with pytest.raises(ValueError):
        render_result("1.1.0", [V4], [{"gw": "10.0.0.1"}], None)
    with pytest.raises(TypeError):
        render_result("1.1.0", ["10.0.0.5/26"], [], None)  # type: ignore[list-item]


def test_ipconfig_validation():
    with pytest.raises(ValueError):
        IPConfig(ipaddress.ip_interface("10.0.0.5/24"), ipaddress.ip_address("fd00::1"))
    with pytest.raises(TypeError):
        IPConfig("10.0.0.5/24")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        IPConfig(ipaddress.ip_interface("10.0.0.5/24"), "10.0.0.1")  # type: ignore[arg-type]


_ipconfigs = st.one_of(
    st.builds(lambda a, p, g: IPConfig(ipaddress.IPv4Interface((a, p)), a + 1 if g and int(a) < 2**32 - 1 else None),
              st.ip_addresses(v=4), st.integers(0, 32), st.booleans()),
    st.builds(lambda a, p, g: IPConfig(ipaddress.IPv6Interface((a, p)), a + 1 if g and int(a) < 2**128 - 1 else None),
              st.ip_addresses(v=6), st.integers(0, 128), st.booleans()),
)
_routes = st.lists(st.one_of(
    st.builds(lambda n, gw: {"dst": str(ipaddress.IPv4Network((n, 16), strict=False)), **({"gw": str(gw)} if gw else {})},
              st.ip_addresses(v=4), st.none() | st.ip_addresses(v=4)),
    st.builds(lambda n: {"dst": str(ipaddress.IPv6Network((n, 48), strict=False)), "mtu": 1500},
              st.ip_addresses(v=6)),
), max_size=4)
_dns = st.none() | st.fixed_dictionaries({}, optional={
    "nameservers": st.lists(_ip, max_size=2), "domain": st.text(max_size=5),
    "search": st.lists(st.text(min_size=1, max_size=5), max_size=2),
    "options": st.lists(st.text(min_size=1, max_size=5), max_size=2)})


def _opt(key: str, present) -> set:
    return {key} if present else set()


@settings(max_examples=300)
@given(st.sampled_from(ALL_VERSIONS), st.lists(_ipconfigs, max_size=4), _routes, _dns)
def test_render_result_shape(version, ips, routes, dns):
    r = render_result(version, ips, routes, dns)
    assert r["cniVersion"] == version
    assert json.loads(json.dumps(r)) == r
    dns_nonempty = bool(dns) and any(v not in (None, "", [], {}) for v in dns.values())
    assert ("dns" in r) == dns_nonempty
    if dns_nonempty:
        assert r["dns"] == {k: v for k, v in dns.items() if v not in (None, "", [], {})}
    if version in ("0.1.0", "0.2.0"):
        expected = {"cniVersion"} | _opt("dns", dns_nonempty)
        for fam, key in ((4, "ip4"), (6, "ip6")):
            fam_ips = [ip for ip in ips if ip.version == fam]
            if not fam_ips:
                continue
            expected.add(key)
            first = fam_ips[0]
            fam_routes = [rt for rt in routes if ipaddress.ip_network(rt["dst"]).version == fam]
            entry_keys = {"ip"} | _opt("gateway", (first.gateway is not None)) | _opt("routes", bool(fam_routes))
            assert set(r[key]) == entry_keys
            assert r[key]["ip"] == str(first.address)
            for rt in r[key].get("routes", []):
                assert set(rt) <= {"dst", "gw"}
        assert set(r) == expected
    else:
        assert set(r) == {"cniVersion", "ips"} | _opt("routes", bool(routes)) | _opt("dns", dns_nonempty)
        assert len(r["ips"]) == len(ips)
        with_version = version in ("0.3.0", "0.3.1", "0.4.0")
        for out, ip in zip(r["ips"], ips):
            keys = {"address"} | _opt("version", with_version) | _opt("gateway", (ip.gateway is not None))
            assert set(out) == keys
            assert out["address"] == str(ip.address)
            assert "interface" not in out
            if with_version:
                assert out["version"] == str(ip.version)
        if routes:
            allowed = {"dst", "gw", "mtu"} if version == "1.1.0" else {"dst", "gw"}
            assert all(set(rt) <= allowed for rt in r["routes"])
            assert [rt["dst"] for rt in r["routes"]] == [rt["dst"] for rt in routes]
    assert "interfaces" not in r


# ==========================================================================
# skel
# ==========================================================================

class Recorder:
    """Handlers that record calls; ``fail`` makes every verb raise it."""

    def __init__(self, result=None, fail: BaseException | None = None):
        self.calls: list[tuple[str, CNIEnv, NetConf]] = []
        self.result = result
        self.fail = fail

    def _call(self, name, env, conf):
        self.calls.append((name, env, conf))
        if self.fail is not None:
            raise self.fail

    def add(self, env, conf):
        self._call("add", env, conf)
        if self.result is not None:
            return self.result
        return render_result(conf.cni_version, [V4], [], None)

    def delete(self, env, conf):
        self._call("delete", env, conf)

    def check(self, env, conf):
        self._call("check", env, conf)

    def gc(self, env, conf):
        self._call("gc", env, conf)

    def status(self, env, conf):
        self._call("status", env, conf)


class Out(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def invoke(environ, stdin: bytes, handlers=None):
    out = Out()
    handlers = Recorder() if handlers is None else handlers
    rc = run(environ, stdin, out, handlers)
    return rc, out, handlers


def one_doc(out: Out) -> dict:
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert out.flushes >= 1
    return json.loads(text)


class Explodes:
    def __getattr__(self, name):
        raise AssertionError(f"handler {name} must not be touched")


def test_skel_version():
    rc, out, _ = invoke({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"0.4.0"}', Explodes())
    assert rc == 0
    assert one_doc(out) == {"cniVersion": "0.4.0", "supportedVersions": ALL_VERSIONS}
    rc, out, _ = invoke({"CNI_COMMAND": "VERSION"}, b"", Explodes())
    assert rc == 0 and one_doc(out)["cniVersion"] == "1.1.0"


def test_skel_add():
    rc, out, h = invoke(env_for("ADD", CNI_ARGS="K8S_POD_NAME=p"), conf_bytes("0.4.0"))
    assert rc == 0
    assert one_doc(out) == {"cniVersion": "0.4.0",
                            "ips": [{"version": "4", "address": "10.0.0.5/26", "gateway": "10.0.0.1"}]}
    [(name, env, conf)] = h.calls
    assert name == "add" and env.args == {"K8S_POD_NAME": "p"} and conf.name == "net1"


@pytest.mark.parametrize("command,method,version", [
    ("DEL", "delete", "0.1.0"), ("CHECK", "check", "0.4.0"), ("GC", "gc", "1.1.0"),
    ("STATUS", "status", "1.1.0"),
])
def test_skel_dispatch_no_output(command, method, version):
    rc, out, h = invoke(env_for(command), conf_bytes(version))
    assert rc == 0
    assert out.getvalue() == ""
    assert [c[0] for c in h.calls] == [method]


def test_skel_del_empty_netns():
    rc, out, h = invoke(env_for("DEL", CNI_NETNS=""), conf_bytes())
    assert rc == 0 and h.calls[0][1].netns == ""


def test_skel_gc_minimal_env():
    rc, out, h = invoke({"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"},
                        conf_bytes(**{"cni.dev/valid-attachments": [{"containerID": "c", "ifname": "eth0"}]}))
    assert rc == 0 and h.calls[0][2].valid_attachments == [("c", "eth0")]


def test_skel_cni_error_from_handler():
    rc, out, _ = invoke(env_for("ADD"), conf_bytes("1.0.0"),
                        Recorder(fail=CNIError(11, "try again later", "etcd down")))
    assert rc == 1
    assert one_doc(out) == {"cniVersion": "1.0.0", "code": 11, "msg": "try again later",
                            "details": "etcd down"}


def test_skel_status_unavailable():
    rc, out, _ = invoke(env_for("STATUS"), conf_bytes(), Recorder(fail=CNIError(50, "plugin not available")))
    assert rc == 1 and one_doc(out)["code"] == 50


def test_skel_internal_error(tmp_path):
    from cni_ipam.log import log
    log.configure(str(tmp_path / "x.log"), "info")
    try:
        rc, out, _ = invoke(env_for("DEL"), conf_bytes("0.3.1"), Recorder(fail=RuntimeError("boom")))
    finally:
        log.close()
    assert rc == 1
    doc = one_doc(out)
    assert doc == {"cniVersion": "0.3.1", "code": 999, "msg": "internal error: RuntimeError: boom",
                   "details": ""}
    assert "Traceback" not in out.getvalue()
    logged = (tmp_path / "x.log").read_text()
    assert "internal error handling CNI DEL" in logged
    assert "Traceback" in logged and "RuntimeError: boom" in logged


@pytest.mark.parametrize("environ,code", [
    ({}, 4),
    ({"CNI_COMMAND": "FROB", "CNI_PATH": "/p"}, 4),
    (env_for("ADD", CNI_NETNS=None), 4),
    (env_for("ADD", CNI_IFNAME="way-too-long-ifname"), 4),
    (env_for("ADD", CNI_ARGS="UNKNOWN=1"), 4),
])
def test_skel_env_errors(environ, code):
    # the error echoes the config's version even though the env failed first ...
    rc, out, h = invoke(environ, conf_bytes("0.4.0"), Explodes())
    assert rc == 1
    doc = one_doc(out)
    assert doc["code"] == code and doc["cniVersion"] == "0.4.0"
    # ... and falls back to 1.1.0 when stdin tells nothing usable
    for stdin in (b"", b"junk", conf_bytes("5.0.0")):
        rc, out, h = invoke(environ, stdin, Explodes())
        doc = one_doc(out)
        assert (rc, doc["code"], doc["cniVersion"]) == (1, code, "1.1.0")


@pytest.mark.parametrize("stdin,command,code,version", [
    (b"{oops", "ADD", 6, "1.1.0"),
    (b"", "DEL", 6, "1.1.0"),
    (b'{"cniVersion":"0.4.0"}', "ADD", 7, "0.4.0"),
    (b'{"cniVersion":"0.5.0"}', "ADD", 7, "1.1.0"),
    (conf_bytes("0.4.0", ipam=5), "ADD", 7, "0.4.0"),
    (conf_bytes("3.0.0"), "ADD", 1, "1.1.0"),
    (conf_bytes("0.3.1"), "CHECK", 1, "0.3.1"),
    (conf_bytes("1.0.0"), "GC", 1, "1.0.0"),
])
def test_skel_config_errors(stdin, command, code, version):
    rc, out, _ = invoke(env_for(command), stdin, Explodes())
    assert rc == 1
    doc = one_doc(out)
    assert (doc["code"], doc["cniVersion"]) == (code, version)
    assert set(doc) == {"cniVersion", "code", "msg", "details"}


@pytest.mark.parametrize("result", [
    ["not", "a", "dict"],
    {"cniVersion": "0.4.0", "ips": []},           # wrong cniVersion (config says 1.1.0)
    {"cniVersion": "1.1.0", "ips": [object()]},   # not serialisable
])
def test_skel_bad_add_result_is_internal(result):
    h = Recorder(result=result)
    rc, out, _ = invoke(env_for("ADD"), conf_bytes("1.1.0"), h)
    assert rc == 1
    doc = one_doc(out)
    assert doc["code"] == ERR_INTERNAL and doc["cniVersion"] == "1.1.0"


def test_skel_missing_handler_method_is_internal():
    class OnlyAdd:
        def add(self, env, conf):
            return {}

    rc, out, _ = invoke(env_for("GC"), conf_bytes(), OnlyAdd())
    assert rc == 1 and one_doc(out)["code"] == ERR_INTERNAL


def test_skel_broken_stdout_does_not_raise():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    assert run(env_for("ADD"), conf_bytes(), Broken(), Recorder()) == 1
    assert run({"CNI_COMMAND": "VERSION"}, b"", Broken(), Explodes()) == 1
    assert run({}, b"", Broken(), Explodes()) == 1


@settings(max_examples=200)
@given(st.binary(max_size=200), st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]))
def test_skel_any_stdin_gives_one_document(data, command):
    rc, out, h = invoke(env_for(command), data)
    if rc == 0:
        assert len(h.calls) == 1
        if command == "ADD":
            doc = one_doc(out)
            assert doc["cniVersion"] in SUPPORTED_VERSIONS
        else:
            assert out.getvalue() == ""
    else:
        assert rc == 1 and h.calls == []
        doc = one_doc(out)
        assert doc["code"] in (1, 6, 7)
        assert set(doc) == {"cniVersion", "code", "msg", "details"}


def test_version_subprocess_is_import_light():
    code = (
        "import io, sys\n"
        "from cni_ipam.cni.skel import run\n"
        "out = io.StringIO()\n"
        "rc = run({'CNI_COMMAND': 'VERSION'}, b'', out, None)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'google', 'pyroute2', 'etcd3', 'requests', 'urllib3', 'hypothesis', 'pytest')"
        " or m.startswith(('cni_ipam.ipam', 'cni_ipam.datastore', 'cni_ipam.plugin', 'cni_ipam.config')))\n"
        "import json; print(json.dumps([rc, out.getvalue(), heavy]))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rc, text, heavy = json.loads(p.stdout)
    assert rc == 0
    assert text.endswith("\n")
    assert json.loads(text) == {"cniVersion": "1.1.0", "supportedVersions": ALL_VERSIONS}
    assert heavy == []
