"""Engine errors.  Each carries the CNI error code the plugin reports."""


class IPAMError(Exception):
    code = 100

    def __init__(self, msg: str, *, code: int | None = None, details: str = ""):
        super().__init__(msg)
        self.msg = msg
        self.details = details
        if code is not None:
            self.code = code


class InvalidRequest(IPAMError):
    """Bad pool names, bad requested IPs, unusable pools: the config is at fault."""
    code = 7


class PoolExhausted(IPAMError):
    """No free address in any eligible pool."""
    code = 110


class AddressUnavailable(IPAMError):
    """A specifically requested address is taken or reserved."""
    code = 111


class CorruptData(IPAMError):
    """A value in etcd could not be decoded; it is reported, never overwritten."""
    code = 113


class TryAgain(IPAMError):
    """Out of CAS retries, or etcd unavailable: CNI code 11."""
    code = 11


class IncompatibleStore(IPAMError):
    """The store was written in a data layout this binary is too old to use safely
    (``<prefix>/v1/schema``'s ``minLayout`` is above ``keys.LAYOUT``): upgrade the binary."""
    code = 115


# -- refusals of the admin commands (cli/) ---------------------------------------

class AdminError(IPAMError):
    """An admin operation was refused; ``msg`` is one line for the operator."""
    code = 1


class NotFound(AdminError):
    pass


class Conflict(AdminError):
    """A compare-and-swap lost against a concurrent writer."""

