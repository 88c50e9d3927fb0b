"""The exit codes of every CLUE Edge daemon, defined once so the systemd units can rely on them.

A bad configuration exits `EXIT_CONFIG` (sysexits' EX_CONFIG): the units list it in
`RestartPreventExitStatus=78`, so systemd stops instead of restarting a daemon that cannot start.
A crash exits `EXIT_CRASH`, which `Restart=on-failure` restarts.
"""

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 78

__all__ = ["EXIT_CONFIG", "EXIT_CRASH", "EXIT_OK"]
