"""One home for the project's constants (and the one naming rule several modules check).

Imports nothing: it is on the plugin's exec path and costs one small module there.
"""

# -- CNI error codes (CNI spec 1.1, "Error": 0-99 the spec's, 100+ this plugin's) ----------------
ERR_INCOMPATIBLE_CNI_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT_VARIABLES = 4
ERR_IO_FAILURE = 5
ERR_DECODING_FAILURE = 6
ERR_INVALID_NETWORK_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
#: STATUS only: the plugin cannot service ADD requests at all.
ERR_PLUGIN_NOT_AVAILABLE = 50
#: STATUS only: the plugin can service ADD, but with limited connectivity.
ERR_LIMITED_CONNECTIVITY = 51
#: an engine error without a more specific code
ERR_IPAM = 100
#: no free address in any eligible pool
ERR_POOL_EXHAUSTED = 110
#: a specifically requested address is taken or reserved
ERR_ADDRESS_UNAVAILABLE = 111
#: a value in etcd could not be decoded (reported, never overwritten)
ERR_CORRUPT_DATA = 113
#: CHECK: what the runtime holds disagrees with what the store records
ERR_CHECK_MISMATCH = 114
#: the store's data layout needs a newer binary
ERR_INCOMPATIBLE_STORE = 115
#: an unexpected failure inside this plugin
ERR_INTERNAL = 999

# -- etcd ------------------------------------------------------------------------------------------
#: etcd's client port (an endpoint URL without a port means this one)
DEFAULT_ETCD_PORT = 2379
DEFAULT_ENDPOINTS = f"http://127.0.0.1:{DEFAULT_ETCD_PORT}"
#: every key this plugin writes lives under ``<prefix>/v1/``
DEFAULT_PREFIX = "/cni-ipam"

# -- Kubernetes names --------------------------------------------------------------------------
#: the prefix of the namespace/pod annotations that choose pools (Calico's: its manifests keep working)
DEFAULT_ANNOTATION_PREFIX = "cni.projectcalico.org"

# `cni-ipam exec-server` (cni_ipam/execserver.py): here so that the CLI's parser does not import
# the server (socket, selectors, signal: ~9 ms on every CLI command).  packaging/launcher.c has
# the same socket path compiled in (tests/test_deploy_manifests.py compares them).
EXEC_SERVER_SOCKET = "/run/cni-ipam/exec.sock"
EXEC_SERVER_MAX_CHILDREN = 128
#: a DNS subdomain (RFC 1123, lower case: Kubernetes' rule for object names and annotation prefixes)
DNS_SUBDOMAIN_RE = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
MAX_DNS_SUBDOMAIN = 253

_LDH = "-abcdefghijklmnopqrstuvwxyz0123456789"


def is_dns_subdomain(v: str) -> bool:
    """``DNS_SUBDOMAIN_RE`` (whole string) and at most ``MAX_DNS_SUBDOMAIN`` characters, without
    importing ``re`` (exec path)."""
    return 0 < len(v) <= MAX_DNS_SUBDOMAIN and all(
        label and not label.strip(_LDH) and label[0] != "-" and label[-1] != "-" for label in v.split("."))
