"""Leaked addresses: handles whose Kubernetes pod no longer exists.

A handle records the pod (``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` of its ADD).
It is leaked when no pod of that namespace/name exists.  Handles without a pod
name (podman, plain containerd) are never judged here.  (Deliberately not
judged by node: a ``nodename`` that differs from the Kubernetes node name would
make every live address look leaked.)

Order matters: the handles are read BEFORE the pods are listed, so a pod
created in between is in the list and its fresh handle was not read; listing
pods first could see a new pod's handle without the pod and free a live
address.  :func:`release_leaks` lists the pods again right before releasing
and releases only handles that are still leaked.
"""
from __future__ import annotations

from cni_ipam._records import dataclass, field

from .errors import AdminError, IPAMError

from ..log import log


@dataclass
class Leak:
    handle_id: str
    namespace: str
    pod: str
    node: str
    addresses: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict:
        return {"handle": self.handle_id, "namespace": self.namespace, "pod": self.pod, "node": self.node,
                "addresses": list(self.addresses), "reason": self.reason}


def live_pods(client) -> dict[tuple[str, str], str]:
    """{(namespace, name): uid} of every pod the API server knows (paged list)."""
    out = {}
    for p in client.list_pods():
        md = p.get("metadata") or {}
        out[(md.get("namespace", ""), md.get("name", ""))] = md.get("uid") or ""
    return out


def _judge(h, live: dict) -> str | None:
    key = (h.namespace, h.pod)
    if key not in live:
        return f"pod {h.namespace}/{h.pod} does not exist"
    # a pod recreated under the same name (a StatefulSet) is another pod
    if h.pod_uid and live[key] and live[key] != h.pod_uid:
        return f"pod {h.namespace}/{h.pod} was recreated (uid {h.pod_uid} is gone)"
    return None


def find_leaks(ipam, client, *, handles=None, pods: dict | None = None) -> list[Leak]:
    """Handles whose pod is gone (``handles``/``pods`` may be given to skip the reads)."""
    hs = [h for h in (ipam.handles() if handles is None else handles) if h.pod and h.namespace]
    if not hs:
        return []
    live = live_pods(client) if pods is None else pods
    out = []
    for h in sorted(hs, key=lambda h: h.id):
        why = _judge(h, live)
        if why:
            out.append(Leak(h.id, h.namespace, h.pod, h.node, [str(a.ip) for a in h.addresses], why))
    return out


def release_leaks(ipam, client, leaks: list[Leak]) -> tuple[list[Leak], list[tuple[Leak, str]]]:
    """Release leaked handles, re-checking each against a fresh pod list first.
    Returns (released, [(leak, why not released)])."""
    if not leaks:
        return [], []
    live = live_pods(client)
    done, skipped = [], []
    for lk in leaks:
        h = ipam.get_handle(lk.handle_id)
        if h is None:
            skipped.append((lk, "already released"))
            continue
        if not _judge(h, live):
            skipped.append((lk, f"pod {h.namespace}/{h.pod} exists again"))
            continue
        try:
            ipam.release(lk.handle_id)
            done.append(lk)
            log.info("released leaked handle %s (%s)", lk.handle_id, ", ".join(lk.addresses))
        except IPAMError as e:
            skipped.append((lk, e.msg))
    return done, skipped


# -- for the CLI (`check --kubeconfig`, `release --leaked --kubeconfig [--yes]`) ------

def open_client(kubeconfig: str, timeout: float = 10.0):
    """A Kubernetes client for a kubeconfig; raises IPAMError (one clear line) on failure."""
    from ..k8s import K8sError, KubeClient
    try:
        return KubeClient.from_kubeconfig(kubeconfig, timeout=timeout)
    except K8sError as e:
        raise IPAMError(e.msg) from None


def _listed(fn, *args):
    from ..k8s import K8sError
    try:
        return fn(*args)
    except K8sError as e:
        raise IPAMError(e.msg) from None


def findings(ipam, kubeconfig: str, timeout: float = 10.0) -> list[dict]:
    """`check --kubeconfig`: one finding (the check report's shape) per leaked handle."""
    with open_client(kubeconfig, timeout) as client:
        leaks = _listed(find_leaks, ipam, client)
    return [{"kind": "leaked", "key": ipam.keys.handle(lk.handle_id),
             "message": f"{', '.join(lk.addresses) or 'no address'} (handle {lk.handle_id}, node {lk.node}): "
                        f"{lk.reason}", **lk.to_dict()} for lk in leaks]


def release_command(ipam, kubeconfig: str, *, yes: bool, timeout: float = 10.0,
                    ask=None, out=None) -> dict:
    """`release --leaked`: show what will be released, ask (unless ``yes``), release.
    Returns {"leaked": [...], "released": [...], "skipped": [...], "confirmed": bool}."""
    import sys
    out = out or sys.stderr
    with open_client(kubeconfig, timeout) as client:
        leaks = _listed(find_leaks, ipam, client)
        res = {"leaked": [lk.to_dict() for lk in leaks], "released": [], "skipped": [], "confirmed": False}
        if not leaks:
            print("no leaked addresses: every handle's pod exists", file=out)
            return res
        print(f"{len(leaks)} handle(s) whose pod no longer exists will be released:", file=out)
        for lk in leaks:
            print(f"  {', '.join(lk.addresses) or '-':<32} {lk.namespace}/{lk.pod} on {lk.node} "
                  f"(handle {lk.handle_id})", file=out)
        if not yes:
            ask = ask or _ask
            if not ask("release them? [y/N] "):
                print("nothing released", file=out)
                return res
        res["confirmed"] = True
        done, skipped = _listed(release_leaks, ipam, client, leaks)
    res["released"] = [lk.to_dict() for lk in done]
    res["skipped"] = [dict(lk.to_dict(), why=why) for lk, why in skipped]
    return res


def _ask(prompt: str) -> bool:
    """Prompt on stderr, answer from stdin (a terminal or a pipe).  No answer at all (stdin
    at its end: not a terminal) is an error naming --yes, as for every command that asks."""
    import sys
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline() if sys.stdin else ""
    if not line:
        sys.stderr.write("\n")
        raise AdminError("release --leaked: no answer on stdin (not a terminal?): add --yes to go ahead "
                         "without asking; `cni-ipam check --kubeconfig PATH` only lists them")
    return line.strip().lower() in ("y", "yes")
