"""One exception type for every user-facing mistake.

Library code raises :class:`EsaError` with the bad value *and* the remedy; the CLI prints it as a single line
and exits with status 2. Internal invariants use ``assert`` instead.
"""


class EsaError(Exception):
    """A problem the user can fix: the message names what was wrong and how to fix it."""
