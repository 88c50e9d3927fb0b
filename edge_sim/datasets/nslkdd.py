"""NSL-KDD intrusion-detection records (``KDDTrain+.txt`` / ``KDDTest+.txt``) encoded to 122 inputs.

A record is 43 comma-separated fields with no header: the 41 KDD'99 features, the attack name and
the difficulty level. Encoding, fixed so that a test file alone encodes exactly as it would beside
the training file:

- ``protocol_type`` (3), ``service`` (70) and ``flag`` (11) become one-hot groups over the full
  category lists of the data set, written out below. A category outside them is a ValueError
  (a silent all-zero row would hide a wrong file).
- The 38 numeric features map to [0, 1]: rates and 0/1 flags as they are; bounded counts divided
  by their cap; heavy-tailed counts (duration, bytes, ...) as ``log1p(v) / log1p(cap)``. Caps sit
  at or above the largest value in the real train and test files; a larger value saturates at 1.
- Encoded column order follows the record: duration, protocol, service, flag, then the other 37
  numeric features (see ``FEATURE_NAMES``).
- Labels: 0 normal, 1 DoS, 2 Probe, 3 R2L, 4 U2R, by the usual attack-to-category map, including
  the attacks that only appear in the test file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

PROTOCOLS = ("tcp", "udp", "icmp")
SERVICES = (
    "aol", "auth", "bgp", "courier", "csnet_ns", "ctf", "daytime", "discard", "domain",
    "domain_u", "echo", "eco_i", "ecr_i", "efs", "exec", "finger", "ftp", "ftp_data", "gopher",
    "harvest", "hostnames", "http", "http_2784", "http_443", "http_8001", "imap4", "IRC",
    "iso_tsap", "klogin", "kshell", "ldap", "link", "login", "mtp", "name", "netbios_dgm",
    "netbios_ns", "netbios_ssn", "netstat", "nnsp", "nntp", "ntp_u", "other", "pm_dump", "pop_2",
    "pop_3", "printer", "private", "red_i", "remote_job", "rje", "shell", "smtp", "sql_net",
    "ssh", "sunrpc", "supdup", "systat", "telnet", "tftp_u", "tim_i", "time", "urh_i", "urp_i",
    "uucp", "uucp_path", "vmnet", "whois", "X11", "Z39_50",
)  # fmt: skip
FLAGS = ("OTH", "REJ", "RSTO", "RSTOS0", "RSTR", "S0", "S1", "S2", "S3", "SF", "SH")

CLASS_NAMES = ("normal", "DoS", "Probe", "R2L", "U2R")
_CATEGORY_ATTACKS = {
    "normal": ("normal",),
    "DoS": (
        "back", "land", "neptune", "pod", "smurf", "teardrop",
        "apache2", "mailbomb", "processtable", "udpstorm",
    ),
    "Probe": ("ipsweep", "nmap", "portsweep", "satan", "mscan", "saint"),
    "R2L": (
        "ftp_write", "guess_passwd", "imap", "multihop", "phf", "spy", "warezclient",
        "warezmaster", "named", "sendmail", "snmpgetattack", "snmpguess", "worm", "xlock",
        "xsnoop",
    ),
    # httptunnel is filed under U2R as in most NSL-KDD work (DARPA'99 listed it as R2L).
    "U2R": (
        "buffer_overflow", "loadmodule", "perl", "rootkit",
        "httptunnel", "ps", "sqlattack", "xterm",
    ),
}  # fmt: skip
# Records per class in KDDTrain+.txt; usable as make_synthetic_nslkdd's class_weights.
TRAIN_CLASS_COUNTS = (67_343, 45_927, 11_656, 995, 52)
ATTACK_CLASS: dict[str, int] = {
    attack: CLASS_NAMES.index(category)
    for category, attacks in _CATEGORY_ATTACKS.items()
    for attack in attacks
}

# The 38 numeric features in record order: (name, scaling, cap). "linear": v / cap;
# "log": log1p(v) / log1p(cap); both clipped to [0, 1].
_NUMERIC_SPEC = (
    ("duration", "log", 60_000.0),
    ("src_bytes", "log", 2.0**31),
    ("dst_bytes", "log", 2.0**31),
    ("land", "linear", 1.0),
    ("wrong_fragment", "linear", 3.0),
    ("urgent", "log", 16.0),
    ("hot", "log", 128.0),
    ("num_failed_logins", "linear", 5.0),
    ("logged_in", "linear", 1.0),
    ("num_compromised", "log", 8192.0),
    ("root_shell", "linear", 1.0),
    ("su_attempted", "linear", 2.0),
    ("num_root", "log", 8192.0),
    ("num_file_creations", "log", 128.0),
    ("num_shells", "log", 8.0),
    ("num_access_files", "log", 16.0),
    ("num_outbound_cmds", "linear", 1.0),
    ("is_host_login", "linear", 1.0),
    ("is_guest_login", "linear", 1.0),
    ("count", "linear", 511.0),
    ("srv_count", "linear", 511.0),
    ("serror_rate", "linear", 1.0),
    ("srv_serror_rate", "linear", 1.0),
    ("rerror_rate", "linear", 1.0),
    ("srv_rerror_rate", "linear", 1.0),
    ("same_srv_rate", "linear", 1.0),
    ("diff_srv_rate", "linear", 1.0),
    ("srv_diff_host_rate", "linear", 1.0),
    ("dst_host_count", "linear", 255.0),
    ("dst_host_srv_count", "linear", 255.0),
    ("dst_host_same_srv_rate", "linear", 1.0),
    ("dst_host_diff_srv_rate", "linear", 1.0),
    ("dst_host_same_src_port_rate", "linear", 1.0),
    ("dst_host_srv_diff_host_rate", "linear", 1.0),
    ("dst_host_serror_rate", "linear", 1.0),
    ("dst_host_srv_serror_rate", "linear", 1.0),
    ("dst_host_rerror_rate", "linear", 1.0),
    ("dst_host_srv_rerror_rate", "linear", 1.0),
)
NUMERIC_NAMES = tuple(name for name, _, _ in _NUMERIC_SPEC)
# Numeric features that only take the values 0 and 1.
BINARY_NAMES = ("land", "logged_in", "root_shell", "is_host_login", "is_guest_login")

N_FEATURES = 122
PROTOCOL_COLUMNS = slice(1, 4)
SERVICE_COLUMNS = slice(4, 74)
FLAG_COLUMNS = slice(74, 85)
# Encoded positions of the 38 numeric features, in NUMERIC_NAMES order.
NUMERIC_COLUMNS = (0, *range(85, N_FEATURES))
FEATURE_NAMES = (
    "duration",
    *(f"protocol_type={p}" for p in PROTOCOLS),
    *(f"service={s}" for s in SERVICES),
    *(f"flag={f}" for f in FLAGS),
    *NUMERIC_NAMES[1:],
)

_N_FIELDS = 43
# Record fields: 0 duration, 1 protocol, 2 service, 3 flag, 4..40 numeric, 41 label, 42 difficulty.
_NUMERIC_FIELDS = (0, *range(4, 41))
_IS_LOG = np.array([kind == "log" for _, kind, _ in _NUMERIC_SPEC])
_CAPS = np.array([cap for _, _, cap in _NUMERIC_SPEC])


def load_nslkdd(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode an NSL-KDD file (``KDDTrain+.txt`` layout) as ``x`` float32 (N, 122), ``y`` int64 (N,).

    Blank lines are skipped and a KDD'99-style trailing dot on the label is accepted. Any
    malformed record raises ValueError naming the file and line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text file ({exc})") from exc
    records: list[list[str]] = []
    line_nos: list[int] = []
    for no, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        fields = line.split(",")
        if len(fields) != _N_FIELDS:
            raise ValueError(
                f"{path}:{no}: {len(fields)} fields, want {_N_FIELDS} (41 features, label, difficulty)"
            )
        records.append(fields)
        line_nos.append(no)
    if not records:
        raise ValueError(f"{path}: no records")
    columns = list(zip(*records))

    def fail(row: int, what: str) -> ValueError:
        return ValueError(f"{path}:{line_nos[row]}: {what}")

    numeric = _parse_numbers([columns[i] for i in _NUMERIC_FIELDS], NUMERIC_NAMES, fail)
    difficulty = _parse_numbers([columns[42]], ("difficulty",), fail)[:, 0]
    bad = np.flatnonzero(difficulty != np.round(difficulty))
    if bad.size:
        raise fail(bad[0], f"difficulty {columns[42][bad[0]]!r} is not a whole number")

    x = np.zeros((len(records), N_FEATURES), dtype=np.float32)
    rows = np.arange(len(records))
    for field, name, choices, block in (
        (1, "protocol_type", PROTOCOLS, PROTOCOL_COLUMNS),
        (2, "service", SERVICES, SERVICE_COLUMNS),
        (3, "flag", FLAGS, FLAG_COLUMNS),
    ):
        codes = _lookup(columns[field], {c: i for i, c in enumerate(choices)}, name, fail)
        x[rows, block.start + codes] = 1.0
    x[:, NUMERIC_COLUMNS] = _scale(numeric)

    labels = [name.removesuffix(".") for name in columns[41]]
    y = _lookup(labels, ATTACK_CLASS, "attack label", fail)
    return x, y


_Fail = Callable[[int, str], ValueError]


def _parse_numbers(columns: Sequence[Sequence[str]], names: Sequence[str], fail: _Fail) -> np.ndarray:
    """Columns of decimal strings as an (N, len(columns)) float64 array, finite and non-negative."""
    try:
        values = np.array(columns, dtype=np.float64).T
    except ValueError:
        # Slow path only to name the offending line and field.
        for column, name in zip(columns, names):
            for row, text in enumerate(column):
                try:
                    np.float64(text)
                except ValueError:
                    raise fail(row, f"{name} is {text!r}, not a number") from None
        raise
    bad = np.argwhere(~np.isfinite(values) | (values < 0))
    if bad.size:
        row, col = bad[0]
        raise fail(row, f"{names[col]} is {columns[col][row]!r}; want a finite value >= 0")
    return values


def _lookup(column: Sequence[str], index: dict[str, int], what: str, fail: _Fail) -> np.ndarray:
    codes = np.fromiter((index.get(v, -1) for v in column), dtype=np.int64, count=len(column))
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        raise fail(bad[0], f"unknown {what} {column[bad[0]]!r}")
    return codes


def _scale(numeric: np.ndarray) -> np.ndarray:
    """Raw numeric features (N, 38) -> [0, 1] by the fixed per-feature caps."""
    scaled = np.where(_IS_LOG, np.log1p(numeric) / np.log1p(_CAPS), numeric / _CAPS)
    return np.clip(scaled, 0.0, 1.0)
