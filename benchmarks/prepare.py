"""How fast `stalwart prepare` turns a corpus into shards, and in how much memory.

For each tokenizer (byte, gpt2 from the local vocabulary) and worker count, side by side:
  prepare    `python -m stalwart prepare CORPUS --workers W` in a subprocess: MB/s of document
             text, tokens/s, peak resident memory of the whole process tree (sum of RSS of the
             process and its workers, polled every 50 ms: shared pages count once per process,
             so this over-estimates)
  alone      the tokenizer alone on the first `--sample-mb` of the same documents, already in
             memory, split over W processes (no reading, no writing, no IPC during the timing):
             the limit prepare can approach; for gpt2 also tiktoken's own threads
             (`encode_ordinary_batch(num_threads=W)` in one process) on the same texts
  nanogpt    nanoGPT's way (gpt2 only), re-implemented here as its data/openwebtext/prepare.py
             does it: HF `datasets` load (json + parquet) -> `map(process, num_proc=W)` with
             tiktoken `encode_ordinary` + eot -> one np.memmap written in 1024 contiguous
             batches. (A re-implementation: this machine has no network to fetch nanoGPT.)

    python benchmarks/prepare_corpus.py --out /tmp/corpus --size-mb 2000
    flock /tmp/cpu.lock python benchmarks/prepare.py --corpus /tmp/corpus --tokenizers byte \
        --json /tmp/prepare-byte.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPT2_FILE = ROOT.parent / "shared" / "data" / "gpt2.tiktoken"


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; wall seconds and the peak RSS of its process tree."""
    # files, not pipes: a child that prints more than a pipe holds (HF progress bars) would block
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=ROOT, stdout=out,
                                stderr=err, text=True)  # fmt: skip
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{cmd} failed: {err.read()[-2000:]}")
        return {"wall_s": wall, "peak_rss_bytes": peak, "stdout": out.read()}


def tokenizer_spec(name: str) -> str:
    return f"gpt2:{GPT2_FILE}" if name == "gpt2" else name


def run_prepare(corpus: Path, tok: str, workers: int, scratch: Path) -> dict:
    out = scratch / f"ds-{tok}-{workers}"
    cmd = [sys.executable, "-m", "stalwart", "prepare", str(corpus), "--out", str(out),
           "--tokenizer", tokenizer_spec(tok), "--workers", str(workers), "--quiet"]  # fmt: skip
    r = measure(cmd)
    meta = json.loads((out / "meta.json").read_text())
    text = meta["train_bytes"] + meta["val_bytes"]
    tokens = meta["train_tokens"] + meta["val_tokens"]
    shutil.rmtree(out)
    return {"wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"], "text_bytes": text,
            "tokens": tokens, "MB_per_s": text / 1e6 / r["wall_s"],
            "tokens_per_s": tokens / r["wall_s"]}  # fmt: skip


def run_alone(corpus: Path, tok: str, workers: int, sample_mb: int) -> dict:
    cmd = [sys.executable, __file__, "--_alone", str(corpus), tok, str(workers), str(sample_mb)]
    return json.loads(measure(cmd)["stdout"].strip().splitlines()[-1])


def run_nanogpt(corpus: Path, workers: int, scratch: Path) -> dict:
    cache = scratch / "hf-cache"
    cmd = [sys.executable, __file__, "--_nanogpt", str(corpus), str(workers), str(scratch)]
    r = measure(cmd, env={"HF_DATASETS_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"})
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    shutil.rmtree(cache, ignore_errors=True)
    (scratch / "nanogpt-train.bin").unlink(missing_ok=True)
    return {"wall_s": r["wall_s"], "peak_rss_bytes": r["peak_rss_bytes"], **res,
            "MB_per_s": res["text_bytes"] / 1e6 / r["wall_s"],
            "tokens_per_s": res["tokens"] / r["wall_s"]}  # fmt: skip


# ---- in child processes ----------------------------------------------------------------------


def _alone_slice(args) -> tuple[int, float]:
    from stalwart.data import encode

    spec, texts, start_at = args
    encode.init_worker(spec, None, "uint16", 0.1)
    tok = encode._state["tok"]
    while time.time() < start_at:  # every worker starts together, after loading
        time.sleep(0.001)
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 256):
        batch = texts[i : i + 256]
        if spec == "byte":
            n += sum(len(t.encode("utf-8")) for t in batch)
        else:  # the call prepare makes (tiktoken's encode_to_numpy)
            n += sum(map(len, encode.token_arrays(tok, batch, encode._state["dtype"])))
    return n, time.perf_counter() - t0


def alone(corpus: str, tok: str, workers: int, sample_mb: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from stalwart.data.sources import Corpus

    texts, size = [], 0
    for _, text in Corpus([corpus]):
        texts.append(text)
        size += len(text.encode())
        if size >= sample_mb * 1e6:
            break
    slices = [texts[w::workers] for w in range(workers)]
    start_at = time.time() + 3.0 + 0.5 * sample_mb / 100 * workers  # after pickling the slices
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_alone_slice, [(tokenizer_spec(tok), s, start_at) for s in slices]))
    wall = max(t for _, t in done)
    tokens = sum(n for n, _ in done) + len(texts)  # + one end-of-text per document
    out = {"text_bytes": size, "tokens": tokens, "wall_s": wall,
           "MB_per_s": size / 1e6 / wall, "tokens_per_s": tokens / wall}  # fmt: skip
    if tok == "gpt2":  # tiktoken's own thread pool, in this one process, on the same texts
        from stalwart.data import encode

        encode.init_worker(tokenizer_spec(tok), None, "uint16", 0.1)
        enc = encode._state["tok"]._enc
        t0 = time.perf_counter()
        for i in range(0, len(texts), 256):
            enc.encode_ordinary_batch(texts[i : i + 256], num_threads=workers)
        out["threads_MB_per_s"] = size / 1e6 / (time.perf_counter() - t0)
    return out


def nanogpt(corpus: str, workers: int, scratch: str) -> dict:
    """nanoGPT data/openwebtext/prepare.py, step for step, on our files (no val split)."""
    import numpy as np
    import tiktoken
    from datasets import concatenate_datasets, load_dataset
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import r50k_pat_str

    enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                            mergeable_ranks=load_tiktoken_bpe(str(GPT2_FILE)),
                            special_tokens={"<|endoftext|>": 50256})  # fmt: skip
    files = sorted(Path(corpus).iterdir())
    parts = []
    jsonl = [str(f) for f in files if f.name.endswith(".jsonl.gz")]
    parquet = [str(f) for f in files if f.name.endswith(".parquet")]
    if jsonl:
        parts.append(load_dataset("json", data_files=jsonl, split="train", num_proc=workers))
    if parquet:
        parts.append(load_dataset("parquet", data_files=parquet, split="train", num_proc=workers))
    dset = concatenate_datasets(parts)

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids), "nbytes": len(example["text"].encode())}

    tokenized = dset.map(process, remove_columns=["text"], num_proc=workers)
    arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(Path(scratch) / "nanogpt-train.bin", dtype=np.uint16, mode="w+",
                    shape=(arr_len,))  # fmt: skip
    idx, total_batches = 0, 1024
    for b in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=b, contiguous=True)
        arr_batch = np.concatenate(batch.with_format("numpy")["ids"])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    return {"text_bytes": int(np.sum(tokenized["nbytes"])), "tokens": arr_len}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizers", nargs="+", default=["byte", "gpt2"])
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--sample-mb", type=int, default=100, help="tokenizer-alone sample")
    p.add_argument("--no-nanogpt", action="store_true")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    corpus = Path(a.corpus)
    results = {"corpus_bytes_on_disk": sum(f.stat().st_size for f in corpus.iterdir()),
               "load": os.getloadavg(), "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        for tok in a.tokenizers:
            for w in a.workers:
                row = {"tokenizer": tok, "workers": w}
                row["prepare"] = run_prepare(corpus, tok, w, Path(scratch))
                row["alone"] = run_alone(corpus, tok, w, a.sample_mb)
                if tok == "gpt2" and not a.no_nanogpt:
                    row["nanogpt"] = run_nanogpt(corpus, w, Path(scratch))
                results["runs"].append(row)
                print(summary(row), flush=True)
    results["load_after"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


def summary(row: dict) -> str:
    pr, al = row["prepare"], row["alone"]
    line = (f"{row['tokenizer']:5s} x{row['workers']}: prepare {pr['MB_per_s']:6.1f} MB/s "
            f"{pr['tokens_per_s'] / 1e6:5.2f}M tok/s peak {pr['peak_rss_bytes'] / 2**20:5.0f} MiB"
            f" ({pr['wall_s']:.0f} s) | alone {al['MB_per_s']:6.1f} MB/s -> "
            f"{pr['MB_per_s'] / al['MB_per_s']:.0%}")  # fmt: skip
    if "threads_MB_per_s" in al:
        line += f" | tiktoken {row['workers']} threads {al['threads_MB_per_s']:5.1f} MB/s"
    if "nanogpt" in row:
        ng = row["nanogpt"]
        line += (f" | nanoGPT {ng['MB_per_s']:5.1f} MB/s peak "
                 f"{ng['peak_rss_bytes'] / 2**20:5.0f} MiB -> {pr['MB_per_s'] / ng['MB_per_s']:.2f}x")  # fmt: skip
    return line


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    if len(sys.argv) > 1 and sys.argv[1] == "--_alone":
        c, t, w, mb = sys.argv[2:6]
        print(json.dumps(alone(c, t, int(w), int(mb))))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_nanogpt":
        c, w, s = sys.argv[2:5]
        print(json.dumps(nanogpt(c, int(w), s)))
    else:
        main()
