"""The GPU kit: what bench/gpu_check.sh needs on the lent GPU machine, gathered here into one
git-ignored folder (default `.gpu_kit/`) that travels with the device tool's `carry`.

Why: that machine has no network and an image without deepspeed, datasets' pure-Python deps,
pydantic, hjson and moe_dist's pinned transformers 5.23 / peft 0.21.2 (it has 5.17 and some
peft); it has torch 2.11+cu130, pyarrow, pandas, msgpack, ninja, py-cpuinfo, psutil, einops,
tokenizers, safetensors, accelerate, huggingface_hub (/work/.library/device/KINDS.md). So the
kit holds, for CPython 3.12 on manylinux x86_64 (its Python is 3.12.3):

  wheels/   one wheel per package in WHEELS (no dependency resolution there: --no-deps, each
            dependency named here); deepspeed 0.19.8 is an sdist on PyPI, so it is built HERE
            with DS_BUILD_OPS=0 into a pure-Python py3-none-any wheel (nothing compiles there:
            moe_dist uses torch's AdamW, no DeepSpeed op)
  cache/    a copy of the embedded base (.cache/moe_dist/tiny-olmoe-s0-p600, ~8 MB), so the
            GPU machine does not spend minutes pre-training it
  manifest.json  every file with its size and sha256, and why each wheel is there

The device tool carries at most 64 MiB with the working tree (~1.5 MB), so the kit must stay
under LIMIT_MIB (60): pyarrow (~40 MB) is NOT carried, the image's is used.

    .venv/bin/python bench/gpu_kit.py          # gather (downloads from PyPI, builds deepspeed)
    python3 bench/gpu_kit.py --list            # no downloads: the plan, and an existing kit checked
                                               #   against its manifest and the size limit
    python3 bench/gpu_kit.py --check-env       # on the target, after installing the wheels: does
                                               #   this Python meet each carried wheel's requirements?

Gathering needs this project's environment (.venv): deepspeed's setup.py imports torch (built
with --no-build-isolation) and a missing embedded base is built with moe_dist. `--list` needs
the standard library only, `--check-env` also `packaging`, so the image's Python runs both.
Exit status 1 when the kit is over the limit, incomplete, or disagrees with its manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_KIT = ROOT / ".gpu_kit"
LIMIT_MIB = 60  # the device tool carries 64 MiB with the working tree
MIB = 1 << 20

# (distribution, version, why). Versions are those of this project's .venv (where the tests
# pass), except where the image already holds a good enough one (not listed).
WHEELS = [
    ("transformers", "5.23.0", "moe_dist pins >=5.23,<5.24; the image has 5.17"),
    ("peft", "0.21.2", "moe_dist pins 0.21.2 (the layer bench's baseline); the image's version is unknown"),
    ("deepspeed", "0.19.8", "the engine and launcher; not in the image (built here, DS_BUILD_OPS=0)"),
    ("hjson", "3.1.0", "deepspeed"),
    ("pydantic", "2.14.4", "deepspeed's config"),
    ("pydantic_core", "2.50.5", "pydantic (the one compiled wheel, cp312)"),
    ("annotated_types", "0.8.0", "pydantic"),
    ("typing_inspection", "0.4.5", "pydantic"),
    ("typing_extensions", "4.16.0", "pydantic needs >=4.16; the image's may be older"),
    ("datasets", "5.2.0", "moe_dist.data (the trainer imports it; pyarrow/pandas/xxhash are the image's)"),
    ("dill", "0.4.1", "datasets"),
    ("multiprocess", "0.70.19", "datasets"),
]
BUILT_HERE = {"deepspeed"}  # sdist only on PyPI
PY_VERSION = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
MODEL_DIR = "tiny-olmoe-s0-p600"  # moe_dist.models.embedded.model_dir_name(0, DEFAULT_PRETRAIN_STEPS)


def norm(name: str) -> str:
    """A distribution name as wheel files spell it (PEP 427/503: lower case, '_' for '-' and '.')."""
    return name.lower().replace("-", "_").replace(".", "_")


def wheel_of(directory: Path, name: str) -> list[Path]:
    return sorted(p for p in directory.glob("*.whl") if norm(p.name.split("-")[0]) == norm(name))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kit_files(kit: Path) -> list[Path]:
    return sorted(p for p in kit.rglob("*") if p.is_file() and p.name != "manifest.json")


def tree_bytes() -> int | None:
    """What else travels: the tracked and untracked-not-ignored files of this checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((ROOT / n).stat().st_size for n in out.decode().split("\0") if n and (ROOT / n).is_file())


# ---- gathering ---------------------------------------------------------------------------------

def current(wheels_dir: Path, name: str, version: str) -> bool:
    """Whether the kit holds `name` at `version`; any other version of it is removed (one each)."""
    found = wheel_of(wheels_dir, name)
    for stale in [p for p in found if p.name.split("-")[1] != version]:
        stale.unlink()
    return len(found) > 0 and any(p.name.split("-")[1] == version for p in found)


def download(wheels_dir: Path) -> None:
    names = [f"{n}=={v}" for n, v, _ in WHEELS if n not in BUILT_HERE and not current(wheels_dir, n, v)]
    if not names:
        return
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           PY_VERSION, "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
           "-d", str(wheels_dir), *names]
    subprocess.run(cmd, check=True)


def build_deepspeed(wheels_dir: Path, version: str) -> None:
    """`pip wheel` of the sdist without its ops: a py3-none-any wheel (checked)."""
    if not current(wheels_dir, "deepspeed", version):
        env = dict(os.environ, DS_BUILD_OPS="0", DS_ACCELERATOR="cpu")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels_dir), f"deepspeed=={version}"], check=True, env=env)
    for whl in wheel_of(wheels_dir, "deepspeed"):
        with zipfile.ZipFile(whl) as z:
            compiled = [n for n in z.namelist() if n.endswith(".so")]
        if not whl.name.endswith("-py3-none-any.whl") or compiled:
            raise SystemExit(f"gpu_kit: {whl.name} is not pure Python (py3-none-any, no .so: {compiled[:3]}); "
                             "rebuild it with DS_BUILD_OPS=0")


def copy_model_cache(kit: Path, cache_dir: Path) -> None:
    src, dst = cache_dir / MODEL_DIR, kit / "cache" / MODEL_DIR
    if not (src / "build.json").is_file():  # built once here (a few minutes on 2 cores), never on the GPU
        sys.path.insert(0, str(ROOT))
        from moe_dist.models.embedded import ensure_embedded_model, model_dir_name

        assert model_dir_name(0, 600) == MODEL_DIR
        ensure_embedded_model(cache_dir, 0, 600)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".*"))


def write_manifest(kit: Path) -> dict:
    versions = {norm(n): (v, why) for n, v, why in WHEELS}
    wheels, cache = [], []
    for p in kit_files(kit):
        row = {"file": str(p.relative_to(kit)), "bytes": p.stat().st_size, "sha256": sha256(p)}
        if p.parent == kit / "wheels":
            parts = p.name[:-4].split("-")
            row.update(name=parts[0], version=parts[1], tag="-".join(parts[-3:]),
                       why=versions.get(norm(parts[0]), ("", "?"))[1])
            wheels.append(row)
        else:
            cache.append(row)
    manifest = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "python": PY_VERSION, "platforms": PLATFORMS,
                "model_dir": f"cache/{MODEL_DIR}", "wheels": wheels, "model_cache": cache,
                "total_bytes": sum(r["bytes"] for r in wheels + cache)}
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ---- checking ----------------------------------------------------------------------------------

def validate(kit: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(file, bytes) rows of the kit and what is wrong with it: a planned wheel missing or
    present twice, a file that is not in the manifest or differs from it (size), the model
    cache missing, the total over LIMIT_MIB."""
    problems = []
    rows = [(str(p.relative_to(kit)), p.stat().st_size) for p in kit_files(kit)]
    for name, version, _ in WHEELS:
        found = wheel_of(kit / "wheels", name)
        if len(found) != 1:
            problems.append(f"{name}: {len(found)} wheels ({', '.join(p.name for p in found) or 'none'}); want one, "
                            f"{version}")
        elif found[0].name.split("-")[1] != version:
            problems.append(f"{name}: {found[0].name} is not version {version}")
    extra = [p.name for p in (kit / "wheels").glob("*.whl")
             if norm(p.name.split("-")[0]) not in {norm(n) for n, _, _ in WHEELS}]
    if extra:
        problems.append(f"wheels not in the plan: {', '.join(extra)}")
    if not (kit / "cache" / MODEL_DIR / "build.json").is_file():
        problems.append(f"no model cache cache/{MODEL_DIR} (with its build.json)")
    manifest_path = kit / "manifest.json"
    if not manifest_path.is_file():
        problems.append("no manifest.json")
    else:
        listed = {r["file"]: r["bytes"] for r in (lambda m: m["wheels"] + m["model_cache"])(
            json.loads(manifest_path.read_text()))}
        have = dict(rows)
        for f in sorted(listed.keys() ^ have.keys()):
            problems.append(f"{f}: {'in the manifest, not in the kit' if f in listed else 'not in the manifest'}")
        for f in sorted(listed.keys() & have.keys()):
            if listed[f] != have[f]:
                problems.append(f"{f}: {have[f]} bytes, the manifest says {listed[f]}")
    total = sum(b for _, b in rows)
    if total > LIMIT_MIB * MIB:
        problems.append(f"total {total / MIB:.1f} MiB is over the {LIMIT_MIB} MiB limit")
    return rows, problems


def print_table(rows: list[tuple[str, int]]) -> None:
    """Wheels one by one, the model cache's files summed per directory."""
    shown: dict[str, list[int]] = {}
    for f, b in rows:
        key = f if f.startswith("wheels/") else str(Path(f).parent) + "/"
        shown.setdefault(key, []).append(b)
    width = max([len(k) for k in shown] + [10])
    for k, sizes in shown.items():
        files = f"  ({len(sizes)} files)" if len(sizes) > 1 else ""
        print(f"  {k:<{width}} {sum(sizes) / MIB:8.2f} MiB{files}")
    total = sum(b for _, b in rows)
    print(f"  {'total':<{width}} {total / MIB:8.2f} MiB (limit {LIMIT_MIB} MiB)")
    tree = tree_bytes()
    if tree is not None:
        print(f"  {'+ working tree':<{width}} {tree / MIB:8.2f} MiB -> {(tree + total) / MIB:.2f} of the 64 MiB "
              "the device tool carries")


def check_env(kit: Path) -> int:
    """On the target: every carried wheel importable by this Python (its dist-info found on
    sys.path, the carried version) and each one's requirements (no extras) met by what is
    installed there. Prints the image's versions of what the kit relies on. A version below a
    requirement is reported, not fatal (the steps will show whether it matters); a carried
    package that resolves to another version, or a requirement with nothing installed, is fatal."""
    from importlib import metadata

    from packaging.requirements import Requirement

    fatal, soft, relied = [], [], {}
    carried = {norm(n): v for n, v, _ in WHEELS}
    for name, version, _ in WHEELS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            fatal.append(f"{name} {version}: not importable (was the kit installed onto PYTHONPATH?)")
            continue
        if dist.version != version:
            fatal.append(f"{name}: {dist.version} found first on sys.path, the kit carries {version}")
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                fatal.append(f"{name} needs {req}: not installed")
                continue
            if norm(req.name) not in carried:
                relied[norm(req.name)] = have
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                soft.append(f"{name} needs {req}, found {have}")
    print("gpu_kit: from the image: " + ", ".join(f"{k} {v}" for k, v in sorted(relied.items())))
    for s in soft:
        print(f"gpu_kit: WARNING: {s}")
    for f in fatal:
        print(f"gpu_kit: ERROR: {f}")
    print(f"gpu_kit: {len(WHEELS)} carried packages, {len(fatal)} error(s), {len(soft)} version warning(s)")
    return 1 if fatal else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", "--kit", dest="kit", default=str(DEFAULT_KIT), help="the kit folder (default .gpu_kit)")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "moe_dist"), help="where the embedded base is cached")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="no downloads: the plan; an existing kit checked")
    mode.add_argument("--check-env", action="store_true", help="on the target: requirements of the carried wheels")
    args = ap.parse_args()
    kit = Path(args.kit)
    if args.check_env:
        return check_env(kit)
    if args.list:
        print(f"gpu_kit: plan for CPython {PY_VERSION} manylinux x86_64, into {kit}:")
        for n, v, why in WHEELS:
            print(f"  {n + '==' + v:<26} {why}")
        print(f"  cache/{MODEL_DIR}/ (copied from {args.cache_dir})")
        if not kit.is_dir():
            print(f"gpu_kit: no kit at {kit} yet (python bench/gpu_kit.py gathers it)")
            return 0
    else:
        (kit / "wheels").mkdir(parents=True, exist_ok=True)
        download(kit / "wheels")
        build_deepspeed(kit / "wheels", dict((n, v) for n, v, _ in WHEELS)["deepspeed"])
        copy_model_cache(kit, Path(args.cache_dir))
        write_manifest(kit)
    rows, problems = validate(kit)
    print(f"gpu_kit: {kit}:")
    print_table(rows)
    for p in problems:
        print(f"gpu_kit: PROBLEM: {p}")
    print(f"gpu_kit: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
