"""The layer rule: README's "Which may import which" paragraph is rendered from the tables here,
and every module of ``common``, ``functions`` and ``migrations`` is checked against them."""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "common" / "src" / "common"
SHARED = ("settings", "errors")

# layer -> what its modules import of the service besides settings, errors and their own layer
IMPORTS: dict[str, tuple[str, ...]] = {
    "adapters": (),
    "domain": ("adapters",),
    "http": ("domain", "adapters"),
    "platform": ("http", "domain", "adapters"),
    "ops": ("domain", "adapters", "platform.runtime", "platform.logs"),
    "functions": ("http", "domain", "platform.runtime"),
    "migrations": ("adapters.db",),
    "errors": (),
    "settings": (),
}
# Why a layer imports what it does, where the rule alone would surprise.
NOTES = {
    "ops": "its command lines get their clients and logging there; platform runs them by name",
    "migrations": "the functions' own login",
}


@dataclass(frozen=True)
class Library:
    spelled: str  # as the README names it
    modules: tuple[str, ...]  # top-level import names
    where: tuple[str, ...]  # the layers or modules that may import it


# Every library the code imports outside the standard library: one place each.
LIBRARIES = (
    Library(
        "boto3 and botocore",
        ("boto3", "botocore", "mypy_boto3_s3", "mypy_boto3_sqs"),
        ("adapters.storage", "adapters.queue", "adapters.secrets"),
    ),
    Library("pg8000, the database driver,", ("pg8000",), ("adapters.db",)),
    Library("SQLAlchemy", ("sqlalchemy",), ("migrations",)),
    Library("google-auth and urllib3", ("google", "urllib3"), ("adapters.oidc", "adapters.queue")),
    Library("Flask and werkzeug", ("flask", "werkzeug"), ("http", "platform")),
    Library("functions-framework", ("functions_framework",), ("platform",)),
    Library("granian and apig-wsgi", ("granian", "apig_wsgi"), ("platform",)),
    Library("Alembic", ("alembic",), ("migrations", "platform.aws_lambda")),
    Library("cryptography", ("cryptography",), ("domain.idempotency",)),
    Library("itsdangerous", ("itsdangerous",), ("domain.records",)),
    Library("mutagen", ("mutagen",), ("domain.id3",)),
)
# The adapters' client factories: only platform.runtime calls them.
FACTORIES = ("Database.from_settings", "Storage.from_settings", "make_queue", "make_s3_client")
FACTORY_CALLERS = ("adapters", "platform.runtime")
# HTTP header names as HTTP spells them, which no domain module does.
HTTP_HEADERS = {
    "Allow",
    "Authorization",
    "Cache-Control",
    "Content-Disposition",
    "Content-Length",
    "Content-Range",
    "Content-Type",
    "ETag",
    "Location",
    "Prefer",
    "Retry-After",
    "WWW-Authenticate",
}


def _code(name: str) -> str:
    return f"`{name}`"


def _listing(names: tuple[str, ...] | list[str]) -> str:
    quoted = [_code(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def rule_text() -> str:
    """The README's paragraph, word for word."""
    sentences = [
        "Which may import which: `settings` and `errors` are imported by every layer and import "
        "nothing of the service's own, and the modules of a layer import each other."
    ]
    for layer, allowed in IMPORTS.items():
        if layer in SHARED:  # the first sentence's
            continue
        subject = "The handlers in `functions/`" if layer == "functions" else _code(layer)
        if layer == "migrations":
            subject = "The Alembic environment in `migrations/`"
        verb = "import" if layer in ("adapters", "functions") else "imports"
        what = f"{verb} {_listing(allowed)}" if allowed else f"{verb} only those two"
        note = f" ({NOTES[layer]})" if layer in NOTES else ""
        sentences.append(f"{subject} {what}{note}.")
    sentences.append("Nothing in `common` imports a handler or a migration.")
    libraries = "; ".join(f"{lib.spelled} only in {_listing(lib.where)}" for lib in LIBRARIES)
    sentences.append(f"Each library has its place: {libraries}.")
    sentences.append(
        f"The adapters' client factories ({_listing(FACTORIES)}) are called only in "
        f"{_listing(FACTORY_CALLERS)}: the other layers get their clients passed in."
    )
    sentences.append(
        "`domain` spells no path of the service's routes and no HTTP header, and `errors` no "
        "HTTP header: those live in `http`."
    )
    sentences.append("`tests/unit/test_layers.py` checks all of this.")
    return " ".join(sentences)


def _in(module: str, places: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in places)


def _imported(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "common":
                found.update(f"common.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _own(name: str) -> str:
    """``common.domain.jobs`` -> ``domain.jobs``; ``common.errors`` -> ``errors``."""
    return name.removeprefix("common.")


def _strings(tree: ast.AST) -> list[str]:
    """Every string constant; of an f-string, only its leading literal part."""
    inner = {
        id(part)
        for node in ast.walk(tree)
        if isinstance(node, ast.JoinedStr)
        for part in node.values[1:]
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner
    ]


def _called(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            names.add(func.id)
        elif isinstance(func, ast.Attribute):
            names.add(func.attr)
            if isinstance(func.value, ast.Name):
                names.add(f"{func.value.id}.{func.attr}")
    return names


def route_segments() -> set[str]:
    """The first path segment of every path the ``http`` layer spells (records, users, ...)."""
    segments: set[str] = set()
    for path in (PACKAGE / "http").rglob("*.py"):
        for text in _strings(ast.parse(path.read_text())):
            match = re.match(r"^/([A-Za-z_][\w-]*)", text)
            if match:
                segments.add(match.group(1))
    return segments


def violations(module: str, source: str, routes: set[str] | None = None) -> list[str]:
    """What ``source``, the module ``module`` (``domain.uploads``, ``functions.get_record``,
    ``migrations.env``), breaks of the rule."""
    layer = module.split(".")[0]
    tree = ast.parse(source)
    wrong: list[str] = []
    allowed = (layer, *SHARED, *IMPORTS[layer])
    for name in sorted(_imported(tree)):
        top = name.split(".")[0]
        if top == "common":
            if not _in(_own(name), allowed) and _own(name) != "common":
                wrong.append(f"imports {name}")
            continue
        if top == "__future__" or top in sys.stdlib_module_names:
            continue
        owners = [lib for lib in LIBRARIES if top in lib.modules]
        if not owners:
            wrong.append(f"imports {name}, a library without a place in LIBRARIES")
        elif not _in(module, owners[0].where):
            wrong.append(f"imports {name} (only in {', '.join(owners[0].where)})")
    if not _in(module, FACTORY_CALLERS):
        wrong.extend(f"calls {f}" for f in sorted(_called(tree) & set(FACTORIES)))
    if layer in ("domain", "errors"):
        segments = route_segments() if routes is None else routes
        for text in _strings(tree):
            match = re.match(r"^/([A-Za-z_][\w-]*)", text)
            if match and match.group(1) in segments:
                wrong.append(f"spells the route path {text!r}")
            if text in HTTP_HEADERS:
                wrong.append(f"spells the HTTP header {text!r}")
    return wrong


def _modules() -> dict[str, Path]:
    found = {
        ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and p.parent != PACKAGE
    }
    found.update({name: PACKAGE / f"{name}.py" for name in SHARED})
    found.update({f"functions.{p.parent.name}": p for p in (ROOT / "functions").glob("*/main.py")})
    found["migrations.env"] = ROOT / "migrations" / "env.py"
    found.update(
        {f"migrations.versions.{p.stem}": p for p in (ROOT / "migrations/versions").glob("*.py")}
    )
    return found


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_keeps_the_rule(module: str) -> None:
    wrong = violations(module, MODULES[module].read_text(), route_segments())
    assert not wrong, f"{module}: {wrong}"


def test_shared_modules_import_nothing_of_the_service() -> None:
    for name in SHARED:
        imported = _imported(ast.parse((PACKAGE / f"{name}.py").read_text()))
        assert not {m for m in imported if m.startswith("common")}, name


def test_every_layer_is_known() -> None:
    layers = {m.split(".")[0] for m in MODULES}
    top_level = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert layers == set(IMPORTS), layers ^ set(IMPORTS)
    assert top_level == set(SHARED), top_level


def test_readme_states_the_rule_word_for_word() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Which may import which:")
    paragraph = readme[start : readme.index("\n\n", start)]
    assert " ".join(paragraph.split()) == rule_text()


# --- the checker itself, on modules written for the purpose -------------------------------------

ROUTES = {"records", "users", "record"}


def test_a_boto3_import_in_the_domain_is_refused() -> None:
    assert violations("domain.uploads", "import boto3\n", ROUTES) == [
        "imports boto3 (only in adapters.storage, adapters.queue, adapters.secrets)"
    ]
    assert violations("domain.jobs", "from botocore.exceptions import BotoCoreError\n", ROUTES)
    assert not violations("adapters.storage", "import boto3\n", ROUTES)


def test_a_route_path_in_the_domain_is_refused() -> None:
    source = 'UPLOADS = "/records/uploads"\nURL = f"/users/{1}/token"\nKEY = "users/1.mp3"\n'
    assert violations("domain.uploads", source, ROUTES) == [
        "spells the route path '/records/uploads'",
        "spells the route path '/users/'",
    ]
    assert not violations("domain.conversion", 'PATH = "/usr/bin:/bin"\n', ROUTES)
    assert not violations("http.routes", source, ROUTES)


def test_a_header_in_the_domain_is_refused() -> None:
    assert violations("domain.jobs", 'HEADERS = {"Location": "x"}\n', ROUTES) == [
        "spells the HTTP header 'Location'"
    ]
    # The errors the domain raises carry fields; http.responses spells them as headers.
    assert violations("errors", 'HEADERS = {"Retry-After": "1"}\n', ROUTES)
    assert not violations("http.responses", 'HEADERS = {"Retry-After": "1"}\n', ROUTES)


def test_imports_against_the_direction_are_refused() -> None:
    assert violations("domain.records", "from common.http import jobs\n", ROUTES) == [
        "imports common.http"
    ]
    assert violations("adapters.db", "import common.domain.users\n", ROUTES)
    assert violations("functions.get_record", "from common.ops.sweep import sweep\n", ROUTES)
    assert violations("ops.sweep", "from common.platform.serve import main\n", ROUTES)
    assert not violations("ops.sweep", "from common.platform.runtime import Services\n", ROUTES)


def test_flask_outside_http_and_platform_is_refused() -> None:
    assert violations("domain.users", "import flask\n", ROUTES)
    assert violations("adapters.storage", "from werkzeug import Request\n", ROUTES)
    assert violations("functions.create_user", "import flask\n", ROUTES)
    assert violations("functions.get_record", "import functions_framework\n", ROUTES)
    assert not violations("functions.create_user", "from common.http import Request\n", ROUTES)


def test_a_library_without_a_place_is_refused() -> None:
    assert violations("domain.users", "import requests\n", ROUTES) == [
        "imports requests, a library without a place in LIBRARIES"
    ]
    assert not violations("domain.users", "import json\nfrom typing import Any\n", ROUTES)


def test_a_client_made_outside_the_platform_is_refused() -> None:
    source = "def f(s):\n    return Storage.from_settings(s), make_queue(s)\n"
    assert violations("domain.records", source, ROUTES) == [
        "calls Storage.from_settings",
        "calls make_queue",
    ]
    assert not violations("platform.runtime", source, ROUTES)
