"""Long help texts: `cni-ipam --help` examples, `cni-ipam help connection|output|exit-codes`.

``OUTPUT`` is also docs/cli-output.md (a test keeps the two identical)."""
from __future__ import annotations

EPILOG = """\
examples:
  cni-ipam apply -f pools.yaml                 create/update pools (calicoctl manifests work)
  cni-ipam show                                usage per pool (-o wide: every column)
  cni-ipam show --ip 10.244.1.7                who holds an address, or why it is free/reserved
  cni-ipam pool list -o yaml > backup.yaml     pools as manifests (apply -f restores them)
  cni-ipam check                               consistency report (exit 0 clean, 1 problems, 3 could not check)
  cni-ipam release --ip 10.244.1.7 --dry-run   what a release would free (it asks before it does)

environment:
  ETCD_ENDPOINTS, CNI_IPAM_ETCD_PREFIX, ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE,
  ETCD_USERNAME, ETCD_PASSWORD_FILE    the etcd connection (flags win over them)
  CNI_IPAM_CONFIG                      the CLI config file (default /etc/cni-ipam/cli.yaml)
  CNI_COMMAND                          set by a container runtime: run as the CNI plugin
  CNI_IPAM_DEBUG=1                     a traceback for internal errors

more: `cni-ipam help connection` (flags, environment, CLI config file),
      `cni-ipam help output` (the -o json / -o yaml shapes), `cni-ipam help exit-codes`
"""

EXIT_CODES = """\
exit codes of the admin CLI

  0  done (check: the store is clean)
  1  the command failed, or was refused; one line `cni-ipam: error: ...` on stderr says
     what to do (check: problems were found -- one line per finding on stdout)
  2  usage error (unknown command or flag; argparse's usage text on stderr)
  3  check only: could not check (etcd unreachable, bad credentials or TLS settings,
     no pools under the prefix)
  130 interrupted (Ctrl-C)

Commands that release addresses (release, pool delete --force, check --fix, release --leaked)
show what they will do and ask on the terminal; with no answer on stdin they refuse (exit 1)
and name --yes; --dry-run shows and changes nothing (exit 0).
"""

OUTPUT = """\
# `-o json` / `-o yaml` output of the cni-ipam CLI

`-o json` and `-o yaml` print the same data; it is a public interface: fields are added in
new versions, never renamed or removed, so scripts can rely on the names below.  Tables
(the default output, and `-o wide` for `show` and `pool list`) are for people and may change.
Absent values are `null`.  Numbers are JSON numbers (IPv6 pools can have very large ones).

## show

    {"pools": [{
        "name": "external-pool", "cidr": "172.16.0.0/26", "blockSize": 29, "disabled": false,
        "addresses": 64,          # the pool's size (with --node: that node's blocks' size)
        "capacity": 40,           # addresses that can be handed out (see below)
        "reserved": 24,           # never handed out because of the block layout (network, gateway, broadcast)
        "ipReserved": 0,          # unallocated addresses inside IPReservations (not in capacity)
        "inUse": 40, "free": 0,   # free = capacity - inUse
        "utilization": 100.0,     # percent of capacity in use
        "blocksClaimed": 8, "blocksTotal": 8, "blockAddresses": 8,
        "unclaimedBlocks": 0,
        "unclaimedBlocksCountedAs": {"mode": "bridge", "capacityPerBlock": 5},
        "node": "node-a"          # only with --node
      }],
     "blocks": [{"cidr": "172.16.0.0/29", "pool": "external-pool", "node": "node-a",
                 "mode": "bridge", "inUse": 5, "capacity": 5, "free": 0}]}   # only with --blocks

capacity: a claimed block counts what it can hand out (in bridge mode its network, gateway
and broadcast addresses are not capacity); an unclaimed block counts as a block of the mode
most of the pool's claimed blocks use, or bridge (the plugin's default) while none is claimed
(routed when blocks are too small for bridge mode).

## show --ip ADDR

    {"ip": "...", "allocated": true, "pool": "...", "block": "...", "blockNode": "...",
     "handle": "...", "node": "...", "namespace": "...", "pod": "...", "network": "...",
     "containerID": "...", "interface": "eth0", "created": "2026-01-01T00:00:00Z",
     "reason": null,          # when not allocated: why (free, reserved, not in any pool, ...)
     "keptFor": null}         # an address kept for a StatefulSet pod (handle sts/<ns>/<sts>/<n>):
                              # {"namespace", "statefulSet", "ordinal", "pod", "podUID", "network",
                              #  "containerID", "ifname", "since"} (pod, network...: its last attachment)

## show --borrowed

    {"borrowed": [{"ip", "block", "pool", "blockNode", "node", "handle", "namespace", "pod"}]}

## pool list, pool get

`pool get NAME` is a manifest `apply -f` accepts; `pool list` is a list of them:

    {"apiVersion": "cni-ipam/v1", "kind": "IPPoolList", "items": [
      {"apiVersion": "cni-ipam/v1", "kind": "IPPool", "metadata": {"name": "external-pool"},
       "spec": {"cidr", "blockSize", "disabled", "nodeSelector", "allowedUses",
                "ipipMode", "vxlanMode", "natOutgoing", "disableBGPExport",
                "assignmentMode", "namespaceSelector"}}]}
    # ipipMode .. disableBGPExport only when set (kept for Calico; no effect on allocation);
    # assignmentMode only when Manual, namespaceSelector only when not all()

## pool split

    {"pool": "big", "cidr": "10.0.0.0/16", "into": [{"name": "big-0", "cidr": "10.0.0.0/17"}, ...],
     "blocks": 12,                 # blocks whose pool field was (or, --dry-run, would be) rewritten
     "steps": ["one transaction"]} # or the steps of the safe sequence; [] with --dry-run

## reservation list, reservation get

`reservation get NAME` is a manifest `apply -f` accepts; `reservation list` is a list of them:

    {"apiVersion": "projectcalico.org/v3", "kind": "IPReservationList", "items": [
      {"apiVersion": "projectcalico.org/v3", "kind": "IPReservation", "metadata": {"name": "infra"},
       "spec": {"reservedCIDRs": ["192.168.0.0/28", "192.168.7.77/32"]}}]}

## pool delete

    {"pool": "...", "releasedHandles": ["..."], "blocksDeleted": 8, "affinitiesDeleted": 0,
     "undecodable": false}
    # --dry-run:
    {"dryRun": true, "pool": "...", "refusedWithoutForce": true,
     "wouldRelease": [{"handle", "node", "namespace", "pod", "addresses", "inPool"}]}

## apply

    {"dryRun": false, "resources": [{"kind": "IPPool" | "IPReservation" | "IPAMConfig", "name": "...",
       "action": "created" | "configured" | "unchanged",
       "changed": {"disabled": {"from": false, "to": true}}}]}

## config show, configure, config set

    {"strictAffinity": false, "autoAllocateBlocks": true, "maxBlocksPerHost": 0,
     "ipCooldownSeconds": 120}     # only when set (not 0)

## release

    {"released": [{"ip", "handle"}], "notFound": ["10.0.0.9 is not allocated"]}
    # --dry-run:
    {"dryRun": true, "wouldRelease": [{"ip", "handle", "node", "namespace", "pod"}], "notFound": []}
    # --leaked:
    {"leaked": [...], "released": [...], "skipped": [...], "confirmed": true}

## check

    {"clean": false,
     "findings": [{"kind": "block-without-affinity", "key": "/cni-ipam/v1/blocks/...",
                   "message": "...", "fix": "`cni-ipam check --fix` writes ...", "fixable": true,
                   "ip", "block", "handle", "node", "pool", "affinityNodes"}],   # as the kind has them
     "summary": {"block-without-affinity": 1},
     "scanned": {"pools", "blocks", "affinities", "handles", "allocations"}}
    # --fix:
    {"dryRun": false, "confirmed": true,
     "fixes": [{"kind", "key", "action", "done", "why"}], "remaining": [finding, ...]}

Finding kinds: undecodable, allocation-without-handle, allocation-handle-mismatch,
handle-not-held, handle-key-mismatch, block-key-mismatch, block-outside-pools,
block-pool-mismatch, block-wrong-size, block-without-affinity, affinity-other-node,
duplicate-affinity, affinity-without-block, allocation-in-reservation (+ "reservation": its
name), leaked (with --kubeconfig).

## namespace get/list, node get/list

    {"name": "shop", "annotations": {"cni.projectcalico.org/ipv4pools": "[\\"external-pool\\"]"}}
    # + "labels": {...} when the namespace has labels (`namespace label`, for namespaceSelector)
    [{"name": "shop", "annotations": {...}}]          # list
    {"name": "node-a", "labels": {"zone": "a"}}       # node get; node list is a list of them
"""

TOPICS = {"connection": None, "output": OUTPUT, "exit-codes": EXIT_CODES}
