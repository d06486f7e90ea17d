"""Set the fused-linear dispatch in ``kernels/launch.py`` from a sweep's output.

    python3 benches/apply_dispatch.py gpu_gemv_sweep.txt     # rewrites launch.py in place

Reads the ``routing: NAME = value`` and ``table:`` lines that ``bench_gpu_gemv_sweep.py``
prints under "## dispatch" and replaces the assignments of those names and the whole
``TILED_TABLE`` dict; prints what changed. Comments above the settings are left for a person
to update with the figures.
"""

from __future__ import annotations

import os
import re
import sys

LAUNCH = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "python", "qtensors", "torch", "kernels"
)


def parse(text: str) -> tuple[dict[str, str], list[str]]:
    settings: dict[str, str] = {}
    table: list[str] = []
    for line in text.splitlines():
        m = re.match(r"routing: (\w+) = (.+?)(\s{2,}\(now .*\))?$", line)
        if m:
            settings[m.group(1)] = m.group(2).strip()
        elif line.startswith("table:") and "TILED_TABLE" not in line and line != "table: }":
            table.append(line[len("table:") :])
    if not settings:
        raise SystemExit("no 'routing:' lines: is this the output of bench_gpu_gemv_sweep.py?")
    return settings, table


def apply(source: str, settings: dict[str, str], table: list[str]) -> str:
    for name, value in settings.items():
        # a one-line value, or a call spread over lines (``TiledConfig(\n ...\n)``)
        pattern = rf"^{name} = (?:\w+\([^()]*\)|.*)$"
        source, n = re.subn(pattern, f"{name} = {value}", source, flags=re.M)
        if n != 1:
            raise SystemExit(f"{name}: expected one assignment in launch.py, found {n}")
    head = "TILED_TABLE: dict[tuple[int, int, int], TiledConfig] = "
    # the dict as written, empty ("{}") or one entry per line
    pattern = rf"^{re.escape(head)}(?:\{{\}}|\{{\n.*?\n\}})$"
    new = head + ("{\n" + "\n".join(table) + "\n}" if table else "{}")
    source, n = re.subn(pattern, lambda _: new, source, count=1, flags=re.M | re.S)
    if n != 1:
        raise SystemExit("TILED_TABLE not found in launch.py")
    return source


def main() -> None:
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    path = sys.argv[2] if len(sys.argv) == 3 else os.path.join(LAUNCH, "launch.py")
    with open(sys.argv[1]) as fh:
        settings, table = parse(fh.read())
    with open(path) as fh:
        old = fh.read()
    new = apply(old, settings, table)
    with open(path, "w") as fh:
        fh.write(new)
    for name, value in settings.items():
        print(f"{name} = {value}")
    print(f"TILED_TABLE: {len(table)} entries")


if __name__ == "__main__":
    main()
