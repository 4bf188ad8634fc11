"""User-facing errors.

`InfqError` carries one line that names the problem and the fix. The CLI prints it as
`error: <message>` and exits with code 2, without a traceback. Library code raises it for bad
input (paths, configs, data); programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class InfqError(Exception):
    """Bad input: one line naming the problem and the fix; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
