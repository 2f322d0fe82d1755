"""What the safety checks of issue 24 cost at the start of a command: hashing what a stage's key holds.

Stage keys hold the content of local data files and of plain local model folders (SHA-256, remembered in
``$DPQ_CACHE/file-digests`` by path, size, mtime, ctime and inode). Prints, for the data folder's files and for a
model folder (``teachers.teacher_key``, as a plain ``--model`` or ``teacher.model`` folder is keyed): the first hash
(nothing remembered: the cache emptied, and the file pages dropped from memory where the OS lets us), and the median
of ``--repeats`` later ones (remembered: only a stat per file, in a new process each time). Also prints the
hidden-state KD check (the pieces two tokenizers read ``--sentences`` training sentences as).

    PYTHONPATH=src python benchmarks/safety_checks.py --data ../shared/data/sst2 \\
        --model sentence-transformers/all-mpnet-base-v2 --student sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SNIPPET = """
import sys, time
from pathlib import Path
from dpq.data import data_files, file_digest
from dpq.teachers import teacher_key
t0 = time.perf_counter()
for f in (data_files(sys.argv[1]) or {}).values():
    file_digest(Path(f))
t1 = time.perf_counter()
teacher_key(Path(sys.argv[2]), "", 0)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def _drop_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to forget the files' pages (POSIX_FADV_DONTNEED), so the first hash reads the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _hash_once(data: str, model: str, cache: Path) -> tuple[float, float]:
    env = dict(os.environ, DPQ_CACHE=str(cache), PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = subprocess.run([sys.executable, "-c", SNIPPET, data, model], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="data folder with train and dev files")
    ap.add_argument("--model", required=True, help="model folder or packaged id (resolved as dpq resolves it)")
    ap.add_argument("--student", help="a second model: time the hidden-state KD tokenizer check against --model")
    ap.add_argument("--repeats", type=int, default=5, help="remembered hashes to time (median)")
    ap.add_argument("--sentences", type=int, default=256, help="training sentences the tokenizer check reads")
    args = ap.parse_args()

    from dpq import models
    from dpq.data import data_files, load_data

    folder = Path(models.resolve(args.model))
    files = [Path(f) for f in (data_files(args.data) or {}).values()]
    weights = [p for p in folder.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files) / 1e6, sum(p.stat().st_size for p in weights) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"data {size[0]:.1f} MB in {len(files)} files, model folder {size[1]:.0f} MB ({folder})")
    cache = Path(tempfile.mkdtemp(prefix="dpq-digests-"))
    try:
        dropped = _drop_page_cache(files + weights)
        first = _hash_once(args.data, str(folder), cache)
        later = [_hash_once(args.data, str(folder), cache) for _ in range(args.repeats)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    for i, what in enumerate(("data files", "model folder")):
        print(f"{what}: first hash {first[i] * 1e3:.0f} ms{' (pages dropped first)' if dropped else ''}, "
              f"remembered {statistics.median(x[i] for x in later) * 1e3:.1f} ms (median of {args.repeats})")

    if args.student:
        from dpq.distill import KDConfig, check_same_tokens

        texts = load_data(args.data).split("train").texts[: args.sentences]
        s_tok, t_tok = models.load_tokenizer(args.student), models.load_tokenizer(args.model)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            check_same_tokens(KDConfig(hidden_weight=1.0), s_tok, t_tok, texts)
            times.append(time.perf_counter() - t0)
        print(f"hidden-state KD check, {len(texts)} sentences: {statistics.median(times) * 1e3:.1f} ms "
              f"(median of {args.repeats}); the tokenizers read the same pieces")


if __name__ == "__main__":
    main()
