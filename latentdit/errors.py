"""The one exception type for problems a user can cause (bad config, missing file, wrong shape...).

Every tool catches it at the top (see :func:`latentdit.cli.run_main`), prints the message to stderr
and exits with status 2. Messages name the thing at fault and what was expected.
"""


class LatentDiTError(Exception):
    """A user-facing error: the message alone must tell the user what is wrong and what to do."""
