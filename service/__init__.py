"""What every CLUE Edge daemon shares, below all of them: how it runs (`service.runner`: signals,
readiness, the watchdog, the exit code), its inbox thread (`service.worker`), its settings
(`service.settings`: file, environment, flags, the broker connection), exit codes
(`service.exit_codes`), the argument parser (`service.cli`), logging (`service.logs`) and
systemd's notify protocol and watchdog (`service.notify`), and the Prometheus metrics endpoint
(`service.metrics`). A daemon is its handlers, its settings
model and a `build` function; `serve` does the rest.

It imports nothing from the daemons (`agent`, `mds`, `broker`, `edge_sim`), so each of them can
use it without pulling in another.
"""
