"""The plugin's kubeconfig written by ``cni-ipam install --kubeconfig`` (cli/credentials.py), against
the HTTPS Kubernetes stand-in: a TokenRequest token when the API allows it, the mounted token
when it does not, refreshed at a quarter of the remaining lifetime and when the mounted token
rotates."""
from __future__ import annotations

import base64
import json
import os
import stat
import time

import pytest

from cni_ipam.cli.credentials import TokenKeeper, jwt_claims, service_account_of
from cni_ipam.k8s import K8sError, KubeClient
from tests.support.k8s_standin import K8sStandin

SA = "system:serviceaccount:cni-ipam:cni-ipam-node"


def fake_jwt(claims: dict) -> str:
    def b64(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")
    return f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2lnbmF0dXJl"


@pytest.fixture
def cluster(tmp_path):
    with K8sStandin(tmp_path) as api:
        api.add_node("node-1")
        sa = tmp_path / "sa"
        sa.mkdir()
        mounted = fake_jwt({"sub": SA, "exp": int(time.time()) + 3600})
        api.tokens = {mounted: SA}
        (sa / "token").write_text(mounted)
        (sa / "ca.crt").write_bytes(open(api.pki["ca"], "rb").read())
        (sa / "namespace").write_text("cni-ipam")
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
        yield api, sa, env, mounted


def keeper_for(tmp_path, sa, env, **kw) -> TokenKeeper:
    logs = []
    k = TokenKeeper(str(tmp_path / "net.d" / "cni-ipam" / "kubeconfig"), sa_dir=str(sa), environ=env,
                    log=logs.append, **kw)
    k.logs = logs
    return k


def test_service_account_from_the_token_claims(tmp_path):
    tok = fake_jwt({"sub": SA})
    assert jwt_claims(tok)["sub"] == SA and jwt_claims("not-a-jwt") == {}
    assert service_account_of(tok, str(tmp_path), {}) == ("cni-ipam", "cni-ipam-node")
    assert service_account_of("opaque", str(tmp_path), {"POD_NAMESPACE": "x", "CNI_IPAM_SERVICE_ACCOUNT": "y"}) \
        == ("x", "y")


def test_kubeconfig_holds_a_token_request_token_that_authenticates(cluster, tmp_path):
    api, sa, env, mounted = cluster
    k = keeper_for(tmp_path, sa, env, token_ttl=3600)
    t0 = time.time()
    k.write()
    st = os.stat(k.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    cfg = json.loads(open(k.path).read())
    token = cfg["users"][0]["user"]["token"]
    assert token != mounted and token.startswith("issued-"), token
    assert k.source == "TokenRequest"
    assert ("POST", "/api/v1/namespaces/cni-ipam/serviceaccounts/cni-ipam-node/token", SA) in api.requests
    # the plugin's own client reads it and is let in (CA inline, bearer token)
    with KubeClient.from_kubeconfig(k.path) as c:
        assert c.get_node("node-1")["metadata"]["name"] == "node-1"
    assert api.requests[-1] == ("GET", "/api/v1/nodes/node-1", SA)
    # next refresh after about a quarter of the lifetime (+ up to 10 % jitter)
    assert t0 + 3600 * 0.25 - 5 <= k.next_refresh <= t0 + 3600 * 0.25 * 1.1 + 5
    assert k.due() is None


def test_mounted_token_when_the_api_has_no_token_request(cluster, tmp_path):
    api, sa, env, mounted = cluster
    api.token_requests = False
    k = keeper_for(tmp_path, sa, env)
    k.write()
    cfg = json.loads(open(k.path).read())
    assert cfg["users"][0]["user"]["token"] == mounted
    assert k.source.startswith("mounted token (") and "404" in k.source
    assert abs(k.expires - jwt_claims(mounted)["exp"]) < 1
    with KubeClient.from_kubeconfig(k.path) as c:
        c.get_node("node-1")
    # a 403 (no RBAC for serviceaccounts/token) falls back the same way
    api.token_requests = True
    api.denied_users.add(SA)
    k.write()
    assert "403" in k.source and json.loads(open(k.path).read())["users"][0]["user"]["token"] == mounted


def test_refreshed_before_expiry_and_when_the_mounted_token_rotates(cluster, tmp_path):
    api, sa, env, mounted = cluster
    k = keeper_for(tmp_path, sa, env, token_ttl=4, min_interval=0.2)
    k.write()
    first = json.loads(open(k.path).read())["users"][0]["user"]["token"]
    assert k.due() is None
    time.sleep(max(0.0, k.next_refresh - time.time()) + 0.05)
    assert k.due() == "refresh before expiry"
    k.write(k.due())
    second = json.loads(open(k.path).read())["users"][0]["user"]["token"]
    assert second != first
    time.sleep(max(0.0, api.token_expiry[first] - time.time()) + 1.1)
    with pytest.raises(K8sError) as e:       # the old token has expired: 401 ...
        KubeClient(api.url, ca_file=api.pki["ca"], token=first).get_node("node-1")
    assert e.value.status == 401
    k.write(k.due() or "")
    with KubeClient.from_kubeconfig(k.path) as c:   # ... the kubeconfig never held it that long
        c.get_node("node-1")
    # kubelet rotates the projected token: written again at once
    assert k.due() is None
    rotated = fake_jwt({"sub": SA, "exp": int(time.time()) + 7200})
    api.tokens[rotated] = SA
    (sa / "token").write_text(rotated)
    assert k.due() == "the service account token or CA changed"
    os.unlink(k.path)
    assert k.due() == "it was missing"


def test_without_in_cluster_env_it_says_what_is_missing(cluster, tmp_path):
    from cni_ipam.cli.credentials import CredentialsError
    _api, sa, _env, _ = cluster
    k = keeper_for(tmp_path, sa, {})
    with pytest.raises(CredentialsError, match="KUBERNETES_SERVICE_HOST"):
        k.write()
