r"""Inverted-index search vs the dense product for LexVLA-like sparse lexical vectors (CPU, numpy).

  PYTHONPATH=. .venv/bin/python bench/sparse_search_bench.py
  PYTHONPATH=. .venv/bin/python bench/sparse_search_bench.py --sizes=1000,10000 --threads=1

Synthetic data (fixed `--seed`): a vocabulary of `--vocab` words (32,000: Llama 2's) whose
frequencies follow Zipf's law (word of frequency rank r used with probability proportional to
`1 / (r + 1) ** --zipf`). Every word enters a gallery item independently with probability
`min(1, c / (r + 1) ** zipf)`, c set so that an item has `--gallery_active` active words on average
(296: LexVLA's reported 98.27% sparsity of 32,000 entries); the `--queries` queries likewise with
`--query_active` (30) words; values are exponential (non-negative, like `log1p(relu(x))`).

For each gallery size of `--sizes` it reports, each the best of `--repeats` runs:

* index build: `InvertedIndex.build` of the gallery (CSR rows -> posting lists);
* sparse search: `InvertedIndex.search(queries, --k)`, per query;
* dense: float32 `queries @ gallery.T` plus the top-k, per query, the gallery densified in chunks
  of `--chunk` rows (bounded memory). ONLY the matmuls and the top-k selections are timed, not the
  densification of the queries or of the gallery chunks.

and whether the two give the same top-k ids on the first `--check_queries` queries (sparse scores
are exact float64 sums, dense ones float32 matmuls, so a near-tie could in principle swap).

Threads: the dense matmul uses the BLAS threads (OpenBLAS: `OPENBLAS_NUM_THREADS`, default all the
cores it may use); `--threads=N` sets them (the script restarts itself with the variables set, as
they are read when numpy loads). The sparse search runs on one thread.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

from vlalign.evaluation.sparse import InvertedIndex, SparseRows, dense_topk

_SIZES = flags.DEFINE_list("sizes", ["1000", "10000", "100000"], "Gallery sizes.")
_VOCAB = flags.DEFINE_integer("vocab", 32_000, "Vocabulary size V.")
_GALLERY_ACTIVE = flags.DEFINE_float("gallery_active", 296.0, "Mean active words of an item.")
_QUERY_ACTIVE = flags.DEFINE_float("query_active", 30.0, "Mean active words of a query.")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Queries.")
_ZIPF = flags.DEFINE_float("zipf", 1.0, "Zipf exponent of the word frequencies.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_CHUNK = flags.DEFINE_integer("chunk", 10_000, "Gallery rows densified at once (dense path).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_CHECK = flags.DEFINE_integer("check_queries", 50, "Queries whose top-k ids are compared.")
_SEED = flags.DEFINE_integer("seed", 0, "Data seed.")
_THREADS = flags.DEFINE_integer("threads", 0, "BLAS threads of the dense path; 0: as set/default.")

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def inclusion_probabilities(vocab: int, mean_active: float, zipf: float) -> np.ndarray:
  """`[V]` probability that a row uses each word (by frequency rank), summing to `mean_active`."""
  weights = 1.0 / np.arange(1, vocab + 1) ** zipf
  low, high = 0.0, mean_active / weights[-1]
  for _ in range(200):  # bisection on c: sum(min(1, c * w)) is increasing in c
    c = 0.5 * (low + high)
    low, high = (c, high) if np.minimum(1.0, c * weights).sum() < mean_active else (low, c)
  return np.minimum(1.0, c * weights)


def random_rows(
  rng: np.random.Generator, num_rows: int, probs: np.ndarray, words: np.ndarray
) -> SparseRows:
  """`num_rows` rows; word `words[r]` enters each row independently with probability `probs[r]`.

  Generated per word (a binomial count of rows, then which rows): O(nnz), not O(rows * V).
  """
  counts = rng.binomial(num_rows, probs)
  rows = np.concatenate([rng.choice(num_rows, n, replace=False) for n in counts])
  cols = np.repeat(words, counts).astype(np.int32)
  order = np.lexsort((cols, rows))
  rows, cols = rows[order], cols[order]
  indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num_rows))])
  values = rng.exponential(1.0, size=len(cols)).astype(np.float32)
  return SparseRows(indptr, cols, values, len(probs))


def dense_rows(rows: SparseRows, start: int, stop: int) -> np.ndarray:
  """Rows `start:stop` of `rows` as a dense `[stop - start, V]` float32 array."""
  first, last = rows.indptr[start], rows.indptr[stop]
  indptr = rows.indptr[start : stop + 1] - first
  part = SparseRows(indptr, rows.indices[first:last], rows.values[first:last], rows.num_cols)
  return part.to_dense()


def merge_topk(
  a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
  """The top-k (score descending, then lower id) of two `(scores [Q, *], ids [Q, *])` lists."""
  scores, ids = np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1)
  order = np.lexsort((ids, -scores), axis=-1)[:, :k]
  return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def dense_search(
  queries: np.ndarray, gallery: SparseRows, k: int, chunk: int
) -> tuple[tuple[np.ndarray, np.ndarray], float]:
  """`((scores [Q, k], ids [Q, k]), seconds)`: float32 matmul + top-k, chunk by chunk.

  Only the matmuls, the per-chunk top-k and the merges are timed.
  """
  best = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
  seconds = 0.0
  for start in range(0, gallery.num_rows, chunk):
    stop = min(start + chunk, gallery.num_rows)
    block = dense_rows(gallery, start, stop)  # not timed
    tic = time.perf_counter()
    top, ids = dense_topk(queries @ block.T, k)  # [Q, G_chunk] float32 scores
    best = merge_topk(best, (top, ids + start), k)
    seconds += time.perf_counter() - tic
    del block
  return best, seconds


def best_time(fn, repeats: int):
  """`(result of the last run, best seconds)` of `fn() -> (result, seconds)` over `repeats` runs."""
  times = []
  for _ in range(repeats):
    result, seconds = fn()
    times.append(seconds)
  return result, min(times)


def timed(fn):
  """`fn` wrapped to return `(result, wall seconds)`."""

  def run():
    tic = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - tic

  return run


def blas_threads() -> str:
  for var in _THREAD_VARS:
    if os.environ.get(var):
      return f"{os.environ[var]} ({var})"
  return f"default: {len(os.sched_getaffinity(0))} (the cores this process may use)"


def main(argv):
  del argv
  if _THREADS.value and any(os.environ.get(v) != str(_THREADS.value) for v in _THREAD_VARS):
    os.environ.update(dict.fromkeys(_THREAD_VARS, str(_THREADS.value)))
    os.execv(sys.executable, [sys.executable, *sys.argv])  # numpy reads them when it loads
  sizes = [int(s) for s in _SIZES.value]
  vocab, k = _VOCAB.value, _K.value
  rng = np.random.default_rng(_SEED.value)
  words = rng.permutation(vocab)  # word id of each frequency rank
  gallery_probs = inclusion_probabilities(vocab, _GALLERY_ACTIVE.value, _ZIPF.value)
  query_probs = inclusion_probabilities(vocab, _QUERY_ACTIVE.value, _ZIPF.value)
  queries = random_rows(rng, _QUERIES.value, query_probs, words)
  dense_queries = queries.to_dense()
  print(
    f"V={vocab}, zipf={_ZIPF.value}, {queries.num_rows} queries with "
    f"{queries.nnz / queries.num_rows:.1f} active words on average, k={k}, best of "
    f"{_REPEATS.value} runs, seed {_SEED.value}"
  )
  print(f"BLAS threads (dense matmul): {blas_threads()}; sparse search: 1 thread (numpy)")
  print(
    f"dense: float32 matmul + top-{k}, gallery densified in chunks of <= {_CHUNK.value} rows; "
    "only the matmuls and top-k selections are timed, not the densification\n"
  )
  rows = []
  for size in sizes:
    gallery = random_rows(np.random.default_rng([_SEED.value, size]), size, gallery_probs, words)
    index, build_s = best_time(timed(lambda g=gallery: InvertedIndex.build(g)), _REPEATS.value)
    lengths = np.diff(index.indptr)
    postings = np.array(
      [lengths[queries.indices[a:b]].sum() for a, b in zip(queries.indptr[:-1], queries.indptr[1:])]
    )
    (_, sparse_ids), sparse_s = best_time(
      timed(lambda i=index: i.search(queries, k)), _REPEATS.value
    )
    (_, dense_ids), dense_s = best_time(
      lambda g=gallery: dense_search(dense_queries, g, k, _CHUNK.value), _REPEATS.value
    )
    check = min(_CHECK.value, len(dense_ids))
    same = int(np.sum(np.all(sparse_ids[:check] == dense_ids[:check], axis=1)))
    sparse_ms, dense_ms = 1e3 * sparse_s / queries.num_rows, 1e3 * dense_s / queries.num_rows
    print(
      f"gallery {size}: {gallery.nnz / size:.1f} active words per item "
      f"({100 * (1 - gallery.nnz / (size * vocab)):.2f}% sparse), {postings.mean():.0f} posting "
      f"entries per query ({postings.mean() / size:.2f} per gallery item)",
      flush=True,
    )
    rows.append(
      f"| {size:,} | {build_s:.3f} | {sparse_ms:.3f} | {dense_ms:.3f} | "
      f"{dense_ms / sparse_ms:.1f}x | {same}/{check} |"
    )
  print()
  print(
    f"| gallery | index build (s) | sparse search (ms/query) | dense (ms/query) | speed-up | "
    f"same top-{k} ids |"
  )
  print("|---:|---:|---:|---:|---:|---:|")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
