"""`python -m lsync.agent`: run the agent on stdin/stdout (used when lsync is installed)."""

from lsync.agent.main import main

main()
