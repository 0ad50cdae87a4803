"""The lsync client: the `lsync` command, the SSH connection, the watcher and sync engine.

Importing it first silences the one warning a dependency prints on import that is no
concern of lsync's users: cryptography >= 48 deprecates DSA, and asyncssh (which keeps
supporting ssh-dss keys, never offered by lsync) names the DSA classes at import time, ten
`CryptographyDeprecationWarning` lines on every start. Only that message from asyncssh's
own modules is ignored; every other warning is shown as usual.
"""

import warnings

warnings.filterwarnings("ignore", message=r"DSA is deprecated", module=r"asyncssh(\.|$)")
