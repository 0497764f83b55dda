"""``${NAME}`` placeholders filled in as envsubst fills them: the project's one template renderer.

The native stack renders the router's nginx template with it (the compose stack's nginx image
runs envsubst on the same file), and ``scripts/deploy_gcp.sh`` the Cloud Run YAML:
``python -m devstack.templates 'NAMES' < template`` replaces the placeholders that NAMES
mentions with their environment values (empty when unset) and keeps every other ``$``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def render_template(text: str, values: Mapping[str, str]) -> str:
    """``text`` with each ``${NAME}`` whose NAME is in ``values`` replaced; the others kept."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        return values[name] if name in values else match.group(0)

    return PLACEHOLDER.sub(substitute, text)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python -m devstack.templates 'NAMES' < template > rendered")
    names = set(PLACEHOLDER.findall(argv[0]))
    values = {name: os.environ.get(name, "") for name in names}
    sys.stdout.write(render_template(sys.stdin.read(), values))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
