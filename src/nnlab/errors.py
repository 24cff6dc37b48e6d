"""One exception type for every mistake a user can make (bad file, bad config, bad request).

The CLI turns it into a one-line message on stderr and exit code 2; library users can catch it.
Anything else that escapes is a bug in nnlab and keeps its traceback.
"""


class NnlabError(Exception):
    """A user-facing error: the message is one line and names the file, key or value at fault."""


class ConfigError(NnlabError):
    """A bad recipe, override or config value."""


class DataError(NnlabError):
    """A missing, corrupt or unusable data file."""
