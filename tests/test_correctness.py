"""Two attachments never share an address: regression tests for the ways found to break that
(handle identity, requested addresses vs. borrowing rules, the warm snapshot after an etcd
restore, reclaim under clock skew) and for the clean errors around them.  Real etcd, the
plugin exec'd as a runtime does."""
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cni_ipam.datastore import Put, open_datastore
from cni_ipam.ipam.block import Block
from cni_ipam.ipam.engine import IPAM, AssignRequest
from cni_ipam.ipam.errors import TryAgain
from cni_ipam.ipam.keys import LAYOUT
from cni_ipam.ipam.model import IPAMConfig
from cni_ipam.ipam.pool import make_pool
from tests.plugin_helpers import ROOT, assert_error, exec_plugin, netconf
from tests.support.etcd import EtcdServer, free_port

#: the last commit before layout 2 (handles keyed <net>/<cid>/<ifname>): "the old binary"
OLD_COMMIT = "0684c4a1bc10a9f4462c590fba7c01b6214e2792"


def dump(ds, prefix):
    return {kv.key: kv.value for kv in ds.get_prefix(prefix + "/")}


def holders(ipam):
    """{ip: handle id} from the blocks, and the same from the handle records: they must agree."""
    from_blocks = {}
    for kv in ipam.ds.get_prefix(ipam.keys.blocks):
        b = Block.from_json(kv.value)
        for o, hid in b.allocations.items():
            from_blocks[str(b.ip(o))] = hid
    from_handles = {}
    for h in ipam.handles():
        for a in h.addresses:
            assert str(a.ip) not in from_handles, f"{a.ip} in two handles"
            from_handles[str(a.ip)] = h.id
    assert from_blocks == from_handles
    return from_blocks


@pytest.fixture
def store(etcd_server, etcd_prefix):
    ds = open_datastore(etcd_server.endpoint)
    ipam = IPAM(ds, etcd_prefix)
    ipam.create_pool(make_pool("pool-a", "10.210.0.0/24", 29))
    yield ipam
    ds.close()


@pytest.fixture
def conf(etcd_server, etcd_prefix, tmp_path):
    def make(**kw):
        return netconf(etcd_server.endpoint, etcd_prefix, tmp_path, **kw)
    return make


def add_ip(r):
    assert r.rc == 0, r.stdout + r.stderr
    return r.out["ips"][0]["address"].split("/")[0]


# ----------------------------------------------------------------------------- 1. handle identity
@pytest.mark.parametrize("a,b", [
    (("net", "x.y", "eth0"), ("net.x", "y", "eth0")),          # dots in network and container ID
    (("net", "abc.eth0", "100"), ("net", "abc", "eth0.100")),  # dots in container ID and ifname
])
def test_attachments_whose_old_ids_collide_get_their_own_addresses(store, conf, a, b):
    ra = exec_plugin("ADD", conf(name=a[0]), container=a[1], ifname=a[2])
    rb = exec_plugin("ADD", conf(name=b[0]), container=b[1], ifname=b[2])
    ip_a, ip_b = add_ip(ra), add_ip(rb)
    assert ip_a != ip_b
    held = holders(store)
    assert held[ip_a] == "/".join(a) and held[ip_b] == "/".join(b)
    # a DEL of one releases exactly that one
    assert exec_plugin("DEL", conf(name=b[0]), container=b[1], ifname=b[2]).rc == 0
    assert holders(store) == {ip_a: "/".join(a)}
    # a repeated ADD of the other is still idempotent
    assert add_ip(exec_plugin("ADD", conf(name=a[0]), container=a[1], ifname=a[2])) == ip_a


def test_gc_matches_attachments_by_their_records(store, conf):
    c = conf(name="net", version="1.1.0")
    ips = {cid: add_ip(exec_plugin("ADD", c, container=cid)) for cid in ("x.y", "x")}
    add_ip(exec_plugin("ADD", conf(name="net.x", version="1.1.0"), container="y"))
    gc = dict(c, **{"cni.dev/valid-attachments": [{"containerID": "x.y", "ifname": "eth0"}]})
    r = exec_plugin("GC", gc, container=None, ifname=None, netns=None)
    assert r.rc == 0, r.stdout
    # net's x.y stays, net's x goes, net.x's y (another network) stays
    assert sorted(holders(store).values()) == ["net.x/y/eth0", "net/x.y/eth0"]
    assert ips["x.y"] in holders(store)


# ----------------------------------------------------------------------------- upgrade: old + new
def _code_at(commit: str, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("old-cni-ipam")
    arch = subprocess.run(["git", "-C", ROOT, "archive", commit, "cni_ipam"], capture_output=True)
    assert arch.returncode == 0, ("the rolling-upgrade tests run the previous version from git history; "
                                  f"a full clone is needed: {arch.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(d)], input=arch.stdout, check=True)
    return str(d)


@pytest.fixture(scope="module")
def old_code(tmp_path_factory):
    """The plugin/CLI as of OLD_COMMIT (layout 1), from this repository's history."""
    return _code_at(OLD_COMMIT, tmp_path_factory)


#: the last commit before the kept handle records (layout 2, warm snapshots, no handle-*.json)
PRE_HANDLE_FILES_COMMIT = "ded796740692641926296a06afa96d047c47ab3c"


@pytest.fixture(scope="module")
def pre_handle_files_code(tmp_path_factory):
    return _code_at(PRE_HANDLE_FILES_COMMIT, tmp_path_factory)


def old_plugin(old_code, *a, **kw):
    env = dict(kw.pop("env", None) or {}, PYTHONPATH=old_code)
    # -P: not the current directory first on sys.path (that may be a checkout of the new code)
    return exec_plugin(*a, env=env, argv=[sys.executable, "-P", "-m", "cni_ipam"], **kw)


def cli(code_dir, etcd_server, etcd_prefix, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "ETCD_"))}
    env.update(PYTHONPATH=code_dir, ETCD_ENDPOINTS=etcd_server.endpoint, CNI_IPAM_ETCD_PREFIX=etcd_prefix)
    return subprocess.run([sys.executable, "-P", "-m", "cni_ipam", *args], env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


def test_upgrade_on_a_node_finds_and_releases_what_the_old_version_wrote(store, conf, old_code, etcd_server,
                                                                        etcd_prefix):
    c = conf(name="net", version="1.1.0")
    # the old version on this node: four attachments (one whose old id collides with a new attachment)
    old = {cid: add_ip(old_plugin(old_code, "ADD", c, container=cid)) for cid in ("a", "b", "x.y", "gc-me")}
    keys = [kv.key for kv in store.ds.get_prefix(store.keys.handles)]
    assert keys and all("/" not in k[len(store.keys.handles):] for k in keys)   # layout 1 indeed
    # upgraded: a repeated ADD returns what the old version allocated
    assert add_ip(exec_plugin("ADD", c, container="a")) == old["a"]
    # CHECK finds it
    prev = {"cniVersion": "1.1.0", "ips": [{"address": old["a"] + "/29"}]}
    assert exec_plugin("CHECK", dict(c, prevResult=prev), container="a").rc == 0
    # ("net.x", "y", "eth0") had the same old id as ("net", "x.y", "eth0"): it must not get that address
    new_xy = add_ip(exec_plugin("ADD", conf(name="net.x", version="1.1.0"), container="y"))
    assert new_xy != old["x.y"]
    # DEL releases an old record; GC releases old records not in the list and keeps the listed ones
    assert exec_plugin("DEL", c, container="b").rc == 0
    gc = dict(c, **{"cni.dev/valid-attachments": [{"containerID": cid, "ifname": "eth0"} for cid in ("a", "x.y")]})
    assert exec_plugin("GC", gc, container=None, ifname=None, netns=None).rc == 0
    held = holders(store)
    assert held == {old["a"]: "net.a.eth0", old["x.y"]: "net.x.y.eth0", new_xy: "net.x/y/eth0"}
    # the new CLI: check is clean over both layouts; release --handle takes an old id
    r = cli(ROOT, etcd_server, etcd_prefix, "check", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout + r.stderr
    r = cli(ROOT, etcd_server, etcd_prefix, "release", "--handle", "net.x.y.eth0", "--yes")
    assert r.returncode == 0, r.stderr
    assert set(holders(store)) == {old["a"], new_xy}
    # and the schema record says layout 2 now
    assert json.loads(store.ds.get(store.keys.schema).value)["layout"] == LAYOUT


def test_old_and_new_nodes_share_one_store(store, conf, old_code, etcd_server, etcd_prefix):
    """A rolling upgrade: node-a still runs the old version, node-b the new one, in turns."""
    ca, cb = conf(name="net", node="node-a"), conf(name="net", node="node-b")
    live = {}
    for i in range(12):
        live[("a", i)] = add_ip(old_plugin(old_code, "ADD", ca, container=f"a{i}"))
        live[("b", i)] = add_ip(exec_plugin("ADD", cb, container=f"b{i}"))
        if i % 3 == 2:   # and some DELs on both
            assert old_plugin(old_code, "DEL", ca, container=f"a{i - 1}").rc == 0
            assert exec_plugin("DEL", cb, container=f"b{i - 1}").rc == 0
            del live[("a", i - 1)], live[("b", i - 1)]
    assert len(set(live.values())) == len(live)
    assert set(holders(store)) == set(live.values())
    # each version's check is clean over the mixed store
    for code_dir in (ROOT, old_code):
        r = cli(code_dir, etcd_server, etcd_prefix, "check", "-o", "json")
        assert r.returncode == 0 and json.loads(r.stdout)["clean"], (code_dir, r.stdout, r.stderr)
    # the old node's repeated ADDs still find its own records after the new node raised the schema
    assert json.loads(store.ds.get(store.keys.schema).value)["layout"] == LAYOUT
    assert add_ip(old_plugin(old_code, "ADD", ca, container="a0")) == live[("a", 0)]
    # node-a upgraded: the new version releases everything the old one wrote there
    for (n, i) in list(live):
        assert exec_plugin("DEL", ca if n == "a" else cb, container=f"{n}{i}").rc == 0
    assert holders(store) == {}
    assert list(store.ds.get_prefix(store.keys.handles)) == []


def test_a_store_of_a_newer_layout_is_refused_cleanly(store, conf, etcd_server, etcd_prefix):
    c = conf()
    ip = add_ip(exec_plugin("ADD", c, container="c1"))
    store.ds.commit([], [Put(store.keys.schema, json.dumps(
        {"layout": LAYOUT + 1, "minLayout": LAYOUT + 1, "writtenBy": "cni-ipam 9.9"}).encode())])
    before = dump(store.ds, etcd_prefix)
    for verb in ("ADD", "DEL"):
        out = assert_error(exec_plugin(verb, c, container="c2" if verb == "ADD" else "c1"), 115)
        assert f"layout {LAYOUT + 1}" in out["msg"] and "upgrade" in out["msg"], out
    assert dump(store.ds, etcd_prefix) == before and holders(store) == {ip: "testnet/c1/eth0"}
    r = cli(ROOT, etcd_server, etcd_prefix, "show")
    assert r.returncode != 0 and "upgrade" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a newer layout that is still readable (minLayout <= ours) is used
    store.ds.commit([], [Put(store.keys.schema, json.dumps({"layout": LAYOUT + 1, "minLayout": LAYOUT}).encode())])
    assert add_ip(exec_plugin("ADD", c, container="c2")) != ip


# ----------------------------------------------------------------------------- 2. requested addresses
def other_nodes_block(store, conf, mode="bridge"):
    """node-b holds a block with one address allocated; returns (block, a free address in it)."""
    ip = ipaddress.ip_address(add_ip(exec_plugin("ADD", conf(node="node-b", mode=mode), container="b1")))
    b = store.pool_block = Block.from_json(store.ds.get(store.keys.block(
        ipaddress.ip_network(f"{ip}/29", strict=False))).value)
    assert b.node == "node-b"
    return b, ip + 2


@pytest.mark.parametrize("how", ["CNI_ARGS", "runtimeConfig", "args"])   # (the ipAddrs annotation: same path)
def test_requested_address_in_another_nodes_block_is_refused_in_bridge_mode(store, conf, how, etcd_prefix):
    blk, want = other_nodes_block(store, conf)
    c, args = conf(node="node-a"), None
    if how == "CNI_ARGS":
        args = f"IP={want}"
    elif how == "runtimeConfig":
        c["capabilities"] = {"ips": True}
        c["runtimeConfig"] = {"ips": [f"{want}/29"]}
    else:
        c["args"] = {"cni": {"ips": [str(want)]}}
    before = dump(store.ds, etcd_prefix)
    out = assert_error(exec_plugin("ADD", c, container="a1", args=args), 111, names="node-b")
    assert "bridge mode never borrows" in out["msg"]
    assert dump(store.ds, etcd_prefix) == before


def test_requested_address_borrowing_follows_strict_affinity_in_routed_mode(store, conf, etcd_prefix):
    blk, want = other_nodes_block(store, conf, mode="routed")
    c = conf(node="node-a", mode="routed")
    store.set_config(IPAMConfig(strict_affinity=True))
    before = dump(store.ds, etcd_prefix)
    out = assert_error(exec_plugin("ADD", c, container="a1", args=f"IP={want}"), 111, names="node-b")
    assert "strict affinity" in out["msg"]
    assert dump(store.ds, etcd_prefix) == before
    # without strict affinity routed mode may borrow it (as Calico does): recorded in node-b's block
    store.set_config(IPAMConfig(strict_affinity=False))
    assert add_ip(exec_plugin("ADD", c, container="a1", args=f"IP={want}")) == str(want)
    b = Block.from_json(store.ds.get(store.keys.block(blk.cidr)).value)
    assert b.node == "node-b" and b.holder(want) == "testnet/a1/eth0"
    h = store.get_handle("testnet/a1/eth0")
    assert h.node == "node-a"     # a borrowed address: the handle's node is not the block's


# ----------------------------------------------------------------------------- 3. snapshot after a restore
def etcdctl(server, *args):
    env = dict(os.environ, ETCDCTL_API="3")
    p = subprocess.run(["etcdctl", "--endpoints", server.endpoint, *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def restore(server, backup):
    """Restore ``server`` (a single member) from ``backup`` the documented way: new data dir."""
    server.kill()
    shutil.rmtree(server.data_dir)
    env = dict(os.environ, ETCDCTL_API="3")
    subprocess.run(["etcdctl", "snapshot", "restore", backup, "--data-dir", server.data_dir,
                    "--name", server.name, "--initial-cluster", f"{server.name}={server.peer_url}",
                    "--initial-cluster-token", server.initial_cluster_token,
                    "--initial-advertise-peer-urls", server.peer_url], env=env, check=True,
                   capture_output=True, timeout=60)
    server.restart()


def test_warm_snapshot_cannot_hand_out_addresses_after_an_etcd_restore(tmp_path):
    """The node's snapshot remembers its block at revision R; the restored store's block reaches
    revision R again with OTHER content.  The fast path must not plan from the remembered content."""
    server = EtcdServer(name="restore").start()
    try:
        prefix = "/restore"
        ds = open_datastore(server.endpoint)
        ipam = IPAM(ds, prefix)
        ipam.create_pool(make_pool("pool-a", "10.220.0.0/24", 28))
        c = netconf(server.endpoint, prefix, tmp_path / "node", node="node-a")   # the node (snapshot on)
        (tmp_path / "node").mkdir()
        add_ip(exec_plugin("ADD", c, container="c1"))
        backup = str(tmp_path / "backup.db")
        etcdctl(server, "snapshot", "save", backup)
        add_ip(exec_plugin("ADD", c, container="c2"))
        ip3 = add_ip(exec_plugin("ADD", c, container="c3"))     # fast path: snapshot has the block at R
        bkey = ipam.keys.block(ipaddress.ip_network(f"{ip3}/28", strict=False))
        r_block = ds.get(bkey).mod_revision
        restore(server, backup)
        ds.close()
        ds = open_datastore(server.endpoint)
        ipam = IPAM(ds, prefix)
        assert ds.get(bkey).mod_revision < r_block
        # the restored store moves on: filler writes, then another writer (an admin's tool on this
        # node, its own lock dir: no snapshot) allocates so that the block's revision is R again
        ds.get("/filler")
        while ds.last_revision < r_block - 1:
            ds.commit([], [Put("/filler", b"x")])
        assert ds.last_revision == r_block - 1, (ds.last_revision, r_block)
        other = netconf(server.endpoint, prefix, tmp_path / "other", node="node-a")
        (tmp_path / "other").mkdir()
        ip_other = add_ip(exec_plugin("ADD", other, container="restored-1"))
        assert ds.get(bkey).mod_revision == r_block
        assert ip_other == add_ip(exec_plugin("ADD", other, container="restored-1"))
        # the node's next ADD, with its warm snapshot of the old timeline
        ip4 = add_ip(exec_plugin("ADD", c, container="c4"))
        held = holders(ipam)
        assert held[ip_other] == "testnet/restored-1/eth0"
        assert ip4 != ip_other and held[ip4] == "testnet/c4/eth0"
        assert "testnet/c3/eth0" not in held.values()   # the lost timeline's allocation is not resurrected
        ds.close()
    finally:
        server.stop()


def test_snapshot_plan_from_stale_content_at_the_same_revision_is_refused(store, conf, tmp_path):
    """The same guard without a restore: the snapshot file claims other content at the block's
    current revision (what a restore produces); the one-request commit must fail and re-read."""
    from cni_ipam.ipam import snapshot as snapshots
    c = conf()
    ip1 = add_ip(exec_plugin("ADD", c, container="c1"))   # claims the block (no snapshot kept after a claim)
    add_ip(exec_plugin("ADD", c, container="c0"))         # the usual way: the snapshot is written
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("snapshot-")]
    d = json.loads(path.read_text())
    (row,) = [r for r in d["blocks"] if r[2] is not None]
    blk = Block.from_json(snapshots._unb(row[2]))
    ip_forgotten = ipaddress.ip_address(ip1)
    blk.release(ip_forgotten, "testnet/c1/eth0")   # the snapshot "forgets" c1's address...
    row[2] = snapshots._b(blk.to_json())            # ...at the same revision
    path.write_text(json.dumps(d))
    ips = {add_ip(exec_plugin("ADD", c, container=f"n{i}")) for i in range(6)}
    assert ip1 not in ips and len(ips) == 6
    assert holders(store)[ip1] == "testnet/c1/eth0"


# ----------------------------------------------------------------------------- 4. reclaim vs clock skew
def test_reclaim_ignores_the_releasing_nodes_clock(store, conf, tmp_path, etcd_prefix):
    """A one-block bridge pool; node-b's block emptied with a timestamp from a clock hours behind
    (or ours hours ahead).  node-a must not take it at once; only after seeing it empty at the
    same revision for RECLAIM_EMPTY_AFTER by its own clock."""
    from cni_ipam.ipam import reclaim
    store.ds.commit([], [Put(store.keys.pool("pool-a"), make_pool("pool-a", "10.210.0.0/24", 29, disabled=True)
                             .to_json())])
    store.create_pool(make_pool("tiny", "10.230.0.0/29", 29))
    cb = conf(node="node-b", ipv4_pools=["tiny"])
    add_ip(exec_plugin("ADD", cb, container="b1"))
    assert exec_plugin("DEL", cb, container="b1").rc == 0
    bkey = store.keys.block(ipaddress.ip_network("10.230.0.0/29"))
    blk = Block.from_json(store.ds.get(bkey).value)
    blk.empty_since -= 6 * 3600                      # node-b's clock: six hours behind
    store.ds.commit([], [Put(bkey, blk.to_json())])
    ca = conf(node="node-a", ipv4_pools=["tiny"])
    out = assert_error(exec_plugin("ADD", ca, container="a1"), 110)
    assert "no unclaimed block" in out["msg"]
    assert Block.from_json(store.ds.get(bkey).value).node == "node-b"
    # node-b can still use its block meanwhile
    assert add_ip(exec_plugin("ADD", cb, container="b2")).startswith("10.230.0.")
    assert exec_plugin("DEL", cb, container="b2").rc == 0
    # node-a saw it empty at an older revision: that observation does not count any more
    path = reclaim.file_path(ca["ipam"]["lock_file"])
    seen = json.loads(open(path).read())
    seen["seen"] = {k: [rev, t - 2 * reclaim.RECLAIM_EMPTY_AFTER] for k, (rev, t) in seen["seen"].items()}
    open(path, "w").write(json.dumps(seen))
    assert_error(exec_plugin("ADD", ca, container="a1"), 110)
    # now its observation at the current revision is RECLAIM_EMPTY_AFTER old (by its clock): taken
    seen = json.loads(open(path).read())
    seen["seen"] = {k: [rev, t - reclaim.RECLAIM_EMPTY_AFTER] for k, (rev, t) in seen["seen"].items()}
    open(path, "w").write(json.dumps(seen))
    assert add_ip(exec_plugin("ADD", ca, container="a1")).startswith("10.230.0.")
    assert Block.from_json(store.ds.get(bkey).value).node == "node-a"


# ----------------------------------------------------------------------------- 5. clean errors
@pytest.mark.parametrize("what", ["empty", "directory", "under a regular file", "read-only filesystem"])
def test_unusable_lock_file_is_a_clean_config_error(store, conf, tmp_path, what, etcd_prefix):
    if what == "empty":
        path, code = "", 7
    elif what == "directory":
        path, code = str(tmp_path), 7
    elif what == "under a regular file":
        (tmp_path / "file").write_text("x")
        path, code = str(tmp_path / "file" / "lock"), 7
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a read-only tmpfs needs root")
        path, code = str(ro / "lock"), 7
    try:
        before = dump(store.ds, etcd_prefix)
        c = conf(lock_file=path)
        for verb in ("ADD", "DEL"):
            out = assert_error(exec_plugin(verb, c), code)
            assert "lock_file" in out["msg"] + out.get("details", ""), out
        gc = dict(c, cniVersion="1.1.0", **{"cni.dev/valid-attachments": []})
        assert_error(exec_plugin("GC", gc, container=None, ifname=None, netns=None), code)
        assert dump(store.ds, etcd_prefix) == before
    finally:
        if what == "read-only filesystem":
            subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)


def test_stdin_over_the_cap_is_refused_without_parsing(conf):
    c = conf()
    big = json.dumps(dict(c, routes=[{"dst": "10.0.0.0/8"}] * 300_000)).encode()
    assert len(big) > 4 * 1024 * 1024
    out = assert_error(exec_plugin("ADD", None, raw_stdin=big), 7)
    assert "larger than 4 MiB" in out["msg"]


def test_ipv4_mapped_ipv6_pool_is_refused(etcd_server, etcd_prefix, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: mapped}\n"
                 "spec: {cidr: '::ffff:10.88.0.0/118', blockSize: 122}\n")
    r = cli(ROOT, etcd_server, etcd_prefix, "apply", "-f", str(f))
    assert r.returncode != 0 and "IPv4-mapped" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_a_lost_commit_answer_says_the_allocation_may_be_recorded(tmp_path):
    """etcd stops answering between the plan and the commit: code 11 says the allocation may
    have been recorded; once etcd answers again a retried ADD returns exactly that."""
    server = EtcdServer(name="lost").start()
    try:
        ds = open_datastore(server.endpoint, transport="gateway", timeout=1.0)
        ipam = IPAM(ds, "/lost")
        ipam.create_pool(make_pool("p", "10.240.0.0/24", 29))
        real_commit = ds.commit

        def commit_into_silence(compares, ops):
            server.pause()
            return real_commit(compares, ops)
        ds.commit = commit_into_silence
        req = AssignRequest(handle_id="n/c1/eth0", node="n1", network="n", container_id="c1", ifname="eth0")
        with pytest.raises(TryAgain) as e:
            ipam.assign(req)
        assert "may have been recorded" in e.value.msg and "a retried ADD returns" in e.value.msg
        server.resume()
        ds.commit = real_commit
        time.sleep(0.2)
        first = ipam.assign(req)
        again = ipam.assign(req)
        assert again.existing and again.handle.addresses == first.handle.addresses
        # a refused connection is not "may have been recorded"
        ds2 = open_datastore(f"http://127.0.0.1:{free_port()}", transport="gateway", timeout=0.5)
        with pytest.raises(TryAgain) as e2:
            IPAM(ds2, "/lost").release("n/c1/eth0")
        assert "may have been recorded" not in e2.value.msg
        ds.close()
    finally:
        server.stop()


@pytest.mark.parametrize("change", ["node", "mode", "requested address"])
def test_repeated_add_that_does_not_fit_the_existing_handle_is_an_error(store, conf, change, etcd_prefix):
    ip = add_ip(exec_plugin("ADD", conf(), container="c1"))
    before = dump(store.ds, etcd_prefix)
    args = None
    if change == "node":
        c = conf(node="node-z")
    elif change == "mode":
        c = conf(mode="routed")
    else:
        c, args = conf(), f"IP={ipaddress.ip_address(ip) + 1}"
    out = assert_error(exec_plugin("ADD", c, container="c1", args=args), 7)
    assert "already holds" in out["msg"] and ip in out["msg"], out
    assert dump(store.ds, etcd_prefix) == before


def test_kept_handle_records_across_an_upgrade_on_one_node(store, conf, pre_handle_files_code, tmp_path):
    """The kept handle records (``handle-<hash>.json``, next to the snapshot) when the old and the
    new version take turns on one node: the old DEL does not know the file and leaves it; the
    new DEL of that attachment is refused by the handle's content compare and releases nothing
    else (the old version's allocation stays); an attachment the old version added has no file
    and the new DEL releases it the usual way."""
    c = conf(name="net", node="node-a")

    def kept():
        return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("handle-"))

    add_ip(exec_plugin("ADD", c, container="n1"))
    assert len(kept()) == 1
    assert old_plugin(pre_handle_files_code, "DEL", c, container="n1").rc == 0   # the file stays behind
    assert len(kept()) == 1 and holders(store) == {}
    ip_old = add_ip(old_plugin(pre_handle_files_code, "ADD", c, container="o1"))
    assert len(kept()) == 1
    log = tmp_path / "cni-ipam.log"
    before = log.read_text()
    assert exec_plugin("DEL", c, container="n1").rc == 0            # stale file: refused, dropped
    assert "the cached handle or the snapshot is stale" in log.read_text()[len(before):]
    assert kept() == [] and holders(store) == {ip_old: "net/o1/eth0"}
    assert exec_plugin("DEL", c, container="o1").rc == 0            # no file: the usual way
    assert holders(store) == {} and kept() == []
