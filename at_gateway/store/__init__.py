"""The gateway's state in stdlib sqlite3: client keys, the request log, usage and cost.

:mod:`.db` opens a database (pragmas, file mode, ordered migrations); the rest of the package
builds on it. Everything here follows sqlite's own advice: WAL, one writer per process, short
transactions, and no call on the event loop (callers run them on a thread).
"""
