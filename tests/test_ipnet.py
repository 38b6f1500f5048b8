"""cni_ipam.ipnet against the standard library's ipaddress: same text, ints, comparisons,
hashes and errors, and mixing the two works both ways (issue 17: the exec path no longer
imports ipaddress)."""
import ipaddress
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from cni_ipam import ipnet

# addresses biased towards runs of zero groups (where IPv6 text compression is decided)
v6_groups = st.lists(st.one_of(st.just(0), st.just(0), st.integers(0, 0xFFFF), st.sampled_from([1, 0xFFFF, 0x10])),
                     min_size=8, max_size=8)
v6_ints = v6_groups.map(lambda gs: sum(g << (16 * (7 - i)) for i, g in enumerate(gs)))
v4_ints = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 255, 256, 2**32 - 1, 0x0A000000]))
addrs = st.one_of(v4_ints.map(lambda n: (4, n)), v6_ints.map(lambda n: (6, n)))


def std_addr(v, n):
    return ipaddress.IPv4Address(n) if v == 4 else ipaddress.IPv6Address(n)


@settings(max_examples=800, deadline=None)
@given(addrs)
def test_address_text_int_hash_and_parse_match_ipaddress(a):
    v, n = a
    std = std_addr(v, n)
    ours = ipnet.Address(v, n)
    assert str(ours) == str(std)
    assert int(ours) == int(std) and ours.version == std.version
    assert ours == std and std == ours and hash(ours) == hash(std)
    assert {std: 1}[ours] == 1 and ours in {std}
    assert ipnet.ip_address(str(std)) == ours
    assert ipnet._parse(str(std)) == (v, n)          # canonical text takes the fast path
    assert repr(ours) == repr(std)
    assert f"{ours}" == f"{std}"
    assert ours.is_private == std.is_private          # handed to ipaddress


@settings(max_examples=500, deadline=None)
@given(addrs, st.integers(0, 128))
def test_network_matches_ipaddress(a, plen):
    v, n = a
    plen = min(plen, 32 if v == 4 else 128)
    std = (ipaddress.IPv4Network if v == 4 else ipaddress.IPv6Network)((n, plen), strict=False)
    ours = ipnet.ip_network(str(std))
    assert isinstance(ours, ipnet.Network)
    assert str(ours) == str(std) and repr(ours) == repr(std)
    assert ours == std and std == ours and hash(ours) == hash(std)
    assert ours.num_addresses == std.num_addresses and ours.prefixlen == std.prefixlen
    assert ours.network_address == std.network_address
    assert ours.broadcast_address == std.broadcast_address
    inside = ipnet.Address(v, n)
    assert inside in ours and inside in std and std_addr(v, n) in ours
    assert ipnet.network_of(v, n, plen) == std
    assert ours.subnet_of(std) and std.subnet_of(ours) and ours.supernet_of(std)
    assert ipnet.ip_network(f"{std_addr(v, n)}/{plen}", strict=False) == std
    assert ours.netmask == std.netmask                 # handed to ipaddress
    if plen < (32 if v == 4 else 128):
        sub = next(std.subnets())
        assert ipnet.ip_network(str(sub)).subnet_of(ours) and not ours.subnet_of(sub)
        assert list(ours.subnets())[0] == sub


@pytest.mark.parametrize("text", ["010.1.2.3", "1.2.3", "1.2.3.4.5", "256.1.1.1", "FD00::1", "fd00:0::1",
                                  "::ffff:1.2.3.4", "fe80::1%eth0", "1:2:3:4:5:6:7:8:9", "::1::2", "",
                                  " 1.2.3.4", "1.2.3.4 ", "+1.2.3.4", "1_0.0.0.1", "١.٢.٣.٤", "0:0:0:0:0:0:0:0",
                                  "fd00::", "::", "1::", "::1", "1:0:0:1::1", "garbage"])
def test_any_text_means_what_ipaddress_says(text):
    """Non-canonical text goes to ipaddress: accepted exactly when it accepts, same value,
    same error type."""
    try:
        std = ipaddress.ip_address(text)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            ipnet.ip_address(text)
        assert str(got.value) == str(e)
        return
    assert ipnet.ip_address(text) == std and std == ipnet.ip_address(text) and str(ipnet.ip_address(text)) == str(std)


@pytest.mark.parametrize("text,strict", [("10.0.0.0/24", True), ("10.0.0.1/24", True), ("10.0.0.1/24", False),
                                         ("10.0.0.0/33", True), ("10.0.0.0/024", True), ("10.0.0.0", True),
                                         ("fd00::/48", True), ("fd00::1/48", False), ("fd00::/129", True),
                                         ("10.0.0.0/255.255.255.0", True), ("0.0.0.0/0", True), ("x/8", True)])
def test_network_text_means_what_ipaddress_says(text, strict):
    try:
        std = ipaddress.ip_network(text, strict=strict)
    except ValueError as e:
        with pytest.raises(ValueError) as got:
            ipnet.ip_network(text, strict=strict)
        assert str(got.value) == str(e)
        return
    ours = ipnet.ip_network(text, strict=strict)
    assert ours == std and str(ours) == str(std)


def test_ordering_arithmetic_and_mixing():
    a, b = ipnet.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    assert a < b and b > a and a <= b and not a >= b and sorted([b, a]) == [a, b]
    assert a + 1 == b and b - 1 == a and str(a + 255) == "10.0.1.0"
    with pytest.raises(ValueError):
        ipnet.ip_address("255.255.255.255") + 1
    with pytest.raises(TypeError):
        a < ipnet.ip_address("::1")
    n1, n2 = ipnet.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.0.1.0/24")
    assert n1 < n2 and n2 > n1 and sorted([n2, n1]) == [n1, n2]
    assert a != n1 and n1 != a and ipnet.ip_network("10.0.0.0/24") not in n1 and n2 not in n1
    assert ipaddress.ip_network("10.0.0.0/16").overlaps(n1) and n1.overlaps(ipaddress.ip_network("10.0.0.0/16"))
    assert list(ipnet.ip_network("10.0.0.0/30")) == list(ipaddress.ip_network("10.0.0.0/30"))
    assert ipnet.ip_network("10.0.0.0/30")[1] == ipaddress.ip_address("10.0.0.1")
    assert pickle.loads(pickle.dumps(n1)) == n1 and pickle.loads(pickle.dumps(a)) == a
    with pytest.raises(ValueError):
        ipnet.Network(4, 1, 24)   # host bits set


def test_interface_is_what_the_result_needs():
    i = ipnet.Interface(ipnet.ip_address("fd00::5"), 122)
    std = ipaddress.ip_interface("fd00::5/122")
    assert str(i) == str(std) and repr(i) == repr(std) and i.version == 6
    assert i.network == std.network and i.ip == std.ip
    assert i == std and std == i and hash(i) == hash(std)
    assert i.with_netmask == std.with_netmask


def test_the_exec_path_does_not_import_ipaddress(tmp_path):
    """The plugin's modules load without ipaddress (its import costs a fifth of an ADD)."""
    code = ("import sys\n"
            "import cni_ipam.plugin, cni_ipam.ipam.engine, cni_ipam.datastore.gateway, cni_ipam.cni.skel\n"
            "from cni_ipam.ipam.block import Block\n"
            "from cni_ipam.ipam.model import Handle\n"
            "b = Block.from_json(b'{\"cidr\":\"10.1.0.64/26\",\"pool\":\"p\",\"node\":\"n\",\"allocations\":{},"
            "\"free\":[2,3]}')\n"
            "ip = b.allocate('h')\n"
            "assert str(ip) == '10.1.0.66', ip\n"
            "print('ipaddress' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
