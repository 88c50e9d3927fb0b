"""What every CLUE Edge daemon shares, below all of them: exit codes (`service.exit_codes`), the
argument parser (`service.cli`), logging (`service.logs`) and systemd's notify protocol and
watchdog (`service.notify`).

It imports nothing from the daemons (`agent`, `mds`, `broker`, `edge_sim`), so each of them can
use it without pulling in another.
"""
