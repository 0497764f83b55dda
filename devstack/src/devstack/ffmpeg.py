"""The native stack's ffmpeg: the image's minimal static build, made once into ``.tools/ffmpeg``.

``make tools`` builds it with the image's own script, so the native stack converts with the
same binary (and memory) as the upload_record container; where it cannot be built the stack
runs the ``ffmpeg`` on ``PATH`` and says so. docs/development.md, "The native stack's ffmpeg",
has when it is built, rebuilt and overridden.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the checkout
BUILD_SCRIPT = ROOT / "infra" / "ffmpeg" / "build.sh"
TOOLS_DIR = ROOT / ".tools" / "ffmpeg"
BINARY = TOOLS_DIR / "bin" / "ffmpeg"
STAMP = TOOLS_DIR / "build-script.sha256"  # which build.sh made the binary
BUILD_PACKAGES = (
    "gcc", "libc6-dev", "make", "nasm", "pkg-config", "dpkg-dev", "xz-utils", "libmp3lame-dev",
)  # fmt: skip
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCE_PARTS = Path("/etc/apt/sources.list.d")


def _script_digest() -> str:
    return hashlib.sha256(BUILD_SCRIPT.read_bytes()).hexdigest()


def built() -> Path | None:
    """The minimal ffmpeg if it was built by the current build script, else None."""
    if not (BINARY.is_file() and os.access(BINARY, os.X_OK) and STAMP.is_file()):
        return None
    return BINARY if STAMP.read_text().strip() == _script_digest() else None


def source_lists(sources_list: str, parts: dict[str, str]) -> tuple[str, dict[str, str]]:
    """deb-src twins of the machine's apt sources: one-line ``deb`` entries and deb822 stanzas.

    Returned as (the one-line file, {name: deb822 file}) for a private apt configuration: the
    machine's own sources and package lists stay untouched.
    """
    one_line = [
        "deb-src " + line.strip()[len("deb ") :]
        for line in sources_list.splitlines()
        if line.strip().startswith("deb ")
    ]
    stanzas: dict[str, str] = {}
    for name, text in parts.items():
        if name.endswith(".list"):
            one_line += [
                "deb-src " + line.strip()[len("deb ") :]
                for line in text.splitlines()
                if line.strip().startswith("deb ")
            ]
            continue
        if not name.endswith(".sources"):
            continue
        kept = []
        for stanza in text.split("\n\n"):
            fields = [x for x in stanza.splitlines() if x.strip() and not x.startswith("#")]
            types = next((x for x in fields if x.lower().startswith("types:")), None)
            if types is None or "deb" not in types.split(":", 1)[1].split():
                continue
            kept.append("\n".join("Types: deb-src" if x is types else x for x in fields))
        if kept:
            stanzas[name] = "\n\n".join(kept) + "\n"
    return "\n".join(one_line) + ("\n" if one_line else ""), stanzas


def _apt_options(state: Path) -> list[str]:
    """A private apt configuration under ``state``: deb-src lists, its own package lists."""
    parts = {
        p.name: p.read_text()
        for p in sorted(APT_SOURCE_PARTS.glob("*"))
        if p.is_file() and p.suffix in (".list", ".sources")
    }
    one_line, stanzas = source_lists(APT_SOURCES.read_text() if APT_SOURCES.exists() else "", parts)
    (state / "parts").mkdir(parents=True)
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "sources.list").write_text(one_line)
    for name, text in stanzas.items():
        (state / "parts" / name).write_text(text)
    return [
        "-o", f"Dir::Etc::SourceList={state / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={state / 'parts'}",
        "-o", f"Dir::State::Lists={state / 'lists'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def can_build() -> bool:
    debian = Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None
    return os.geteuid() == 0 and debian


def build(log: Callable[[str], None]) -> Path:
    """Install the build packages, fetch Debian's ffmpeg source and build; the binary."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def run(command: list[str], cwd: Path | None = None) -> None:
        subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)

    log("building the minimal static ffmpeg (infra/ffmpeg/build.sh, about a minute)")
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *BUILD_PACKAGES])
    with tempfile.TemporaryDirectory(prefix="ffmpeg-build-") as tmp:
        work = Path(tmp)
        options = _apt_options(work / "apt")
        run(["apt-get", *options, "update", "-qq"])
        run(["apt-get", *options, "source", "-qq", "ffmpeg"], cwd=work)
        sources = [p for p in work.glob("ffmpeg-*") if p.is_dir()]
        if len(sources) != 1:
            raise RuntimeError(f"apt-get source ffmpeg left {len(sources)} source directories")
        prefix = work / "prefix"
        done = subprocess.run(["sh", str(BUILD_SCRIPT), str(sources[0]), str(prefix)],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"build.sh failed:\n{(done.stdout + done.stderr)[-3000:]}")
        # Into place whole: an interrupted build leaves no half-made binary behind.
        staged = TOOLS_DIR.with_name(TOOLS_DIR.name + ".new")
        shutil.rmtree(staged, ignore_errors=True)
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(prefix / "bin" / "ffmpeg", staged / "bin" / "ffmpeg")
        (staged / STAMP.name).write_text(_script_digest() + "\n")
        shutil.rmtree(TOOLS_DIR, ignore_errors=True)
        staged.rename(TOOLS_DIR)
    log(f"minimal ffmpeg ready: {BINARY.relative_to(ROOT)}")
    return BINARY


def ensure(log: Callable[[str], None]) -> Path | None:
    """The minimal ffmpeg, built if it is missing and this machine can build it; else None."""
    found = built()
    if found is not None:
        return found
    if not can_build():
        log("the minimal ffmpeg is not built (needs root on Debian); the native stack runs the "
            "ffmpeg on PATH (same conversion, about 50 MiB more resident per upload)")  # fmt: skip
        return None
    try:
        return build(log)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        log(f"could not build the minimal ffmpeg ({exc}); the native stack runs the ffmpeg on PATH")
        return None


if __name__ == "__main__":
    result = ensure(lambda message: print(f"[ffmpeg] {message}", file=sys.stderr, flush=True))
    print(result or shutil.which("ffmpeg") or "ffmpeg")
