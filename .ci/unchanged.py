"""CI's check that the package joins a user's stack.

``unchanged.py REPORT NAME...`` fails if pip's ``--dry-run --report`` REPORT would install (so replace) any of the
named distributions; ``unchanged.py --installed FLOORS`` fails unless every ``name==version`` of FLOORS is installed.
"""

import json
import sys
from importlib import metadata

from packaging.version import Version


def installed(name: str) -> Version:
    return Version(metadata.version(name))


if sys.argv[1] == "--installed":
    lines = [line.split("#")[0].strip() for line in open(sys.argv[2])]
    pins = {name: Version(version) for name, version in (line.split("==") for line in lines if line)}
    wrong = {name: (str(v), str(installed(name))) for name, v in pins.items() if installed(name) != v}
    print("at the floors:", ", ".join(f"{name} {installed(name)}" for name in pins))
    sys.exit(f"not at the floors (wanted, installed): {wrong}" if wrong else 0)

report = json.load(open(sys.argv[1]))
names = sorted(name.lower() for name in sys.argv[2:])
would = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in report["install"]}
replaced = {name: would[name] for name in names if name in would}
print("pip install -e . would install:", ", ".join(f"{n} {v}" for n, v in sorted(would.items())))
for name in names:
    print(f"{name} {installed(name)}: " + (f"REPLACED by {replaced[name]}" if name in replaced else "kept"))
sys.exit(f"installing the package would replace {replaced}" if replaced else 0)
