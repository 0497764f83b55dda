"""Audit the locked dependencies for known vulnerabilities: ``make audit`` (runs in CI).

Runs pip-audit on the project's environment (installed from uv.lock). Fails on any known
vulnerability that ``security/audit-allowlist.txt`` does not list with a reason. Packages the
vulnerability service could not look up are counted and named, never silently passed: when
the service is unreachable (a machine without that network) the run says plainly that
nothing was audited.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWLIST = ROOT / "security" / "audit-allowlist.txt"


def allowlisted() -> dict[str, str]:
    """Vulnerability id -> reason, from 'ID  reason' lines ('#' starts a comment)."""
    entries: dict[str, str] = {}
    if ALLOWLIST.exists():
        for line in ALLOWLIST.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                vuln_id, _, reason = line.partition(" ")
                if not reason.strip():
                    sys.exit(f"{ALLOWLIST}: {vuln_id} has no reason")
                entries[vuln_id] = reason.strip()
    return entries


def main() -> int:
    result = subprocess.run(
        [sys.executable, "-m", "pip_audit", "--format", "json", "--skip-editable",
         "--progress-spinner", "off"],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except ValueError:
        print(result.stdout, result.stderr, sep="\n", file=sys.stderr)
        print("audit: pip-audit gave no report", file=sys.stderr)
        return 1
    allowed = allowlisted()
    audited, skipped, findings = 0, [], []
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            skipped.append(dep["name"])
            continue
        audited += 1
        for vuln in dep.get("vulns", []):
            ids = {vuln["id"], *vuln.get("aliases", [])}
            if ids & allowed.keys():
                print(f"audit: {dep['name']} {dep['version']} {vuln['id']}: allowed "
                      f"({allowed[next(iter(ids & allowed.keys()))]})")  # fmt: skip
            else:
                fixed = ", ".join(vuln.get("fix_versions", [])) or "-"
                findings.append(f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixed})")
    for finding in findings:
        print(f"audit: VULNERABLE {finding}", file=sys.stderr)
    print(f"audit: {audited} packages audited, {len(findings)} unexplained vulnerabilities, "
          f"{len(skipped)} could not be looked up")  # fmt: skip
    if skipped and audited == 0:
        print(
            "audit: WARNING the vulnerability service was unreachable from this machine; "
            "nothing was audited (run `make audit` where PyPI's JSON API is reachable)"
        )
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
