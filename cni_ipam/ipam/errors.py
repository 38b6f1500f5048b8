"""Engine errors.  Each carries the CNI error code the plugin reports."""
from ..constants import (ERR_ADDRESS_UNAVAILABLE, ERR_CORRUPT_DATA, ERR_INCOMPATIBLE_STORE, ERR_IPAM,
                         ERR_INVALID_NETWORK_CONFIG, ERR_POOL_EXHAUSTED, ERR_TRY_AGAIN_LATER)


class IPAMError(Exception):
    code = ERR_IPAM

    def __init__(self, msg: str, *, code: int | None = None, details: str = ""):
        super().__init__(msg)
        self.msg = msg
        self.details = details
        if code is not None:
            self.code = code


class InvalidRequest(IPAMError):
    """Bad pool names, bad requested IPs, unusable pools: the config is at fault."""
    code = ERR_INVALID_NETWORK_CONFIG


class PoolExhausted(IPAMError):
    """No free address in any eligible pool."""
    code = ERR_POOL_EXHAUSTED


class AddressUnavailable(IPAMError):
    """A specifically requested address is taken or reserved."""
    code = ERR_ADDRESS_UNAVAILABLE


class CorruptData(IPAMError):
    """A value in etcd could not be decoded; it is reported, never overwritten."""
    code = ERR_CORRUPT_DATA


class TryAgain(IPAMError):
    """Out of CAS retries, or etcd unavailable: CNI code 11."""
    code = ERR_TRY_AGAIN_LATER


class IncompatibleStore(IPAMError):
    """The store was written in a data layout this binary is too old to use safely
    (``<prefix>/v1/schema``'s ``minLayout`` is above ``keys.LAYOUT``): upgrade the binary."""
    code = ERR_INCOMPATIBLE_STORE


# -- refusals of the admin commands (cli/) ---------------------------------------

class AdminError(IPAMError):
    """An admin operation was refused; ``msg`` is one line for the operator."""
    code = 1


class NotFound(AdminError):
    pass


class Conflict(AdminError):
    """A compare-and-swap lost against a concurrent writer."""


def unavailable(what: str, e) -> TryAgain:
    """Code 11 for an etcd that did not answer (``e``: a ``DatastoreUnavailable``); when it was a
    commit that went unanswered, the change may have been applied: say so, and what a retry does."""
    text = str(e)
    if getattr(e, "commit_sent", False):
        done = "allocation" if what.startswith("assign") else "change"
        return TryAgain(f"etcd did not answer the commit of {what} ({text}): the {done} may have been "
                        f"recorded; a retried ADD returns what was allocated and a DEL releases it")
    if text.startswith("etcd unavailable"):
        return TryAgain(f"{text} (during {what})")
    return TryAgain(f"etcd unavailable during {what}: {text}")
