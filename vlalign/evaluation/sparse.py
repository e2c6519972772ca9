"""Sparse lexical vectors: sparsification, a CSR row container and an inverted index (numpy only).

LexVLA represents images and captions as non-negative vectors over a vocabulary of V words (one
entry per word). Retrieval with sparsified vectors goes through an `InvertedIndex`: for each word
the gallery items that use it (a posting list), so that a query's scores are accumulated over the
query's active words only and cost the length of their postings, not `G * V` for a gallery of G
items.

Ranking rule (shared by `InvertedIndex.search` and `dense_topk`): by score, highest first; equal
scores by the lower gallery id. A gallery item that shares no word with a query scores exactly 0,
so with non-negative values (lexical vectors) every item the query's postings touch ranks before
every untouched one, and the untouched ones follow in id order. The rule is applied to the exact
scores in general (negative values and explicit zeros included), so `search` gives the same
top-k as the dense product `queries @ gallery.T` ranked by `dense_topk`.

Sparsifying:

* `sparsify_topk(x, k)` keeps the k largest entries of each row; entries <= 0 are never kept (a row
  with fewer than k positive entries keeps all of them); a tie at the k-th place keeps the lower
  column index.
* `sparsify_threshold(x, t)` keeps the entries strictly above `t >= 0`.

Inputs are expected to be finite.
"""

import dataclasses
from typing import Any

import numpy as np

# Rows processed at once by the dense row-wise helpers: bounds their [rows, V] temporaries.
_CHUNK_ROWS = 256

# Smallest row norm divided by in `SparseRows.l2_normalised` (an all-zero row stays zero).
_NORM_EPS = 1e-12


def _check_matrix(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"expected a [N, V] matrix; got shape {x.shape}")
  return x


def _check_k(k: Any) -> int:
  if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
    raise ValueError(f"k must be a positive int; got {k!r}")
  return int(k)


def _topk_mask(x: np.ndarray, k: int) -> np.ndarray:
  """`[N, V]` bool: the `min(k, V)` largest entries of each row, ties kept by lower column."""
  num_cols = x.shape[1]
  k = min(k, num_cols)
  keep = np.empty(x.shape, bool)
  for start in range(0, len(x), _CHUNK_ROWS):
    rows = x[start : start + _CHUNK_ROWS]
    kth = np.partition(rows, num_cols - k, axis=1)[:, num_cols - k, None]  # k-th largest
    chunk_keep = rows >= kth
    crowded = np.flatnonzero(np.sum(chunk_keep, axis=1) > k)  # rows with ties at the k-th place
    if len(crowded):
      rows, kth = rows[crowded], kth[crowded]
      above, tied = rows > kth, rows == kth
      need = k - np.sum(above, axis=1, keepdims=True)  # >= 1 tied entries still to keep
      chunk_keep[crowded] = above | (tied & (np.cumsum(tied, axis=1) <= need))
    keep[start : start + _CHUNK_ROWS] = chunk_keep
  return keep


def sparsify_topk(x: np.ndarray, k: int) -> np.ndarray:
  """Keeps the k largest positive entries of each row (module docstring), zeroes the rest.

  Args:
    x: `[N, V]`.
    k: entries kept per row, >= 1 (`k >= V` keeps every positive entry).

  Returns:
    `[N, V]`, `x`'s dtype.
  """
  x = _check_matrix(x)
  k = _check_k(k)
  if x.shape[1] == 0:
    return x.copy()
  return np.where(_topk_mask(x, k) & (x > 0), x, 0).astype(x.dtype)


def sparsify_threshold(x: np.ndarray, t: float) -> np.ndarray:
  """Keeps the entries strictly above `t`, zeroes the rest.

  Args:
    x: `[N, V]`.
    t: threshold, finite and >= 0 (so entries <= 0 are never kept).

  Returns:
    `[N, V]`, `x`'s dtype.
  """
  x = _check_matrix(x)
  if isinstance(t, bool) or not np.isfinite(t) or t < 0:
    raise ValueError(f"threshold must be a finite number >= 0; got {t!r}")
  return np.where(x > t, x, 0).astype(x.dtype)


def dense_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Each row's top-k by the module's ranking rule (score descending, then lower id).

  Args:
    scores: `[Q, G]` dense scores.
    k: results per row, >= 1.

  Returns:
    `(top_scores [Q, min(k, G)], ids [Q, min(k, G)] int64)`, best first.
  """
  scores = _check_matrix(scores)
  k = min(_check_k(k), scores.shape[1])
  if k == 0:
    return scores[:, :0].copy(), np.zeros((len(scores), 0), np.int64)
  _, ids = np.nonzero(_topk_mask(scores, k))  # row-major: k ids per row, ascending
  ids = ids.reshape(len(scores), k)
  top = np.take_along_axis(scores, ids, axis=1)
  order = np.lexsort((ids, -top), axis=-1)
  return np.take_along_axis(top, order, axis=1), np.take_along_axis(ids, order, axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class SparseRows:
  """Rows of a `[N, num_cols]` matrix in CSR form.

  Row i holds the entries `values[indptr[i]:indptr[i + 1]]` at the columns
  `indices[indptr[i]:indptr[i + 1]]`, strictly increasing within a row.

  Attributes:
    indptr: `[N + 1]` int64 row offsets (0 first, nnz last, non-decreasing).
    indices: `[nnz]` int32 column of each entry.
    values: `[nnz]` float32 value of each entry.
    num_cols: the number of columns (V).
  """

  indptr: np.ndarray
  indices: np.ndarray
  values: np.ndarray
  num_cols: int

  def __post_init__(self):
    indptr = np.asarray(self.indptr, np.int64)
    indices = np.asarray(self.indices, np.int32)
    values = np.asarray(self.values, np.float32)
    num_cols = int(self.num_cols)
    if indptr.ndim != 1 or len(indptr) < 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
      raise ValueError("indptr must be [N + 1] non-decreasing offsets starting at 0")
    if indices.shape != (indptr[-1],) or values.shape != indices.shape:
      raise ValueError(
        f"indices {indices.shape} and values {values.shape} must both be [nnz] = [{indptr[-1]}]"
      )
    if len(indices) and (indices.min() < 0 or indices.max() >= num_cols):
      raise ValueError(f"column indices must lie in [0, {num_cols})")
    increasing = np.diff(indices) > 0
    increasing[indptr[1:-1][(indptr[1:-1] > 0) & (indptr[1:-1] < len(indices))] - 1] = True
    if not increasing.all():
      raise ValueError("column indices must be strictly increasing within each row")
    object.__setattr__(self, "indptr", indptr)
    object.__setattr__(self, "indices", indices)
    object.__setattr__(self, "values", values)
    object.__setattr__(self, "num_cols", num_cols)

  @property
  def num_rows(self) -> int:
    return len(self.indptr) - 1

  @property
  def shape(self) -> tuple[int, int]:
    return self.num_rows, self.num_cols

  @property
  def nnz(self) -> int:
    return len(self.indices)

  def row_ids(self) -> np.ndarray:
    """`[nnz]` int64 row of each entry."""
    return np.repeat(np.arange(self.num_rows), np.diff(self.indptr))

  @classmethod
  def from_dense(cls, x: np.ndarray) -> "SparseRows":
    """The non-zero entries of `x` `[N, V]`."""
    x = _check_matrix(x)
    rows, cols = np.nonzero(x)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(x)))])
    return cls(indptr, cols, x[rows, cols], x.shape[1])

  def to_dense(self) -> np.ndarray:
    """`[N, num_cols]` float32."""
    out = np.zeros(self.shape, np.float32)
    out[self.row_ids(), self.indices] = self.values
    return out

  @classmethod
  def vstack(cls, parts: "list[SparseRows]") -> "SparseRows":
    """The rows of `parts` (same `num_cols`, at least one part), one after another."""
    if not parts or len({p.num_cols for p in parts}) != 1:
      raise ValueError("vstack needs at least one part, all with the same num_cols")
    offsets = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)])
    return cls(
      indptr,
      np.concatenate([p.indices for p in parts]),
      np.concatenate([p.values for p in parts]),
      parts[0].num_cols,
    )

  def l2_normalised(self) -> "SparseRows":
    """The rows divided by their L2 norms (float64 norms; an all-zero row stays zero)."""
    squares = np.bincount(
      self.row_ids(), weights=np.square(self.values, dtype=np.float64), minlength=self.num_rows
    )
    norms = np.maximum(np.sqrt(squares), _NORM_EPS)
    values = self.values / np.repeat(norms, np.diff(self.indptr))
    return SparseRows(self.indptr, self.indices, values, self.num_cols)


def active_counts(x: "np.ndarray | SparseRows") -> np.ndarray:
  """`[N]` int64 number of non-zero entries of each row of `x` (`[N, V]` or `SparseRows`)."""
  if isinstance(x, SparseRows):
    return np.bincount(x.row_ids()[x.values != 0], minlength=x.num_rows)
  return np.count_nonzero(_check_matrix(x), axis=1).astype(np.int64)


def sparsity_stats(x: "np.ndarray | SparseRows") -> dict[str, float]:
  """`{"active": mean non-zero entries per row, "sparsity": percent of zero entries}` of `x`."""
  num_rows, num_cols = x.shape if isinstance(x, SparseRows) else _check_matrix(x).shape
  if num_rows == 0 or num_cols == 0:
    raise ValueError(f"sparsity_stats needs a non-empty matrix; got shape {(num_rows, num_cols)}")
  active = active_counts(x)
  return {
    "active": float(np.mean(active)),
    "sparsity": float(100.0 * (1.0 - np.sum(active) / (num_rows * num_cols))),
  }


def _rank_touched(
  ids: np.ndarray, scores: np.ndarray, k: int, num_items: int
) -> tuple[np.ndarray, np.ndarray]:
  """One query's top-k by the ranking rule, from the scores of the items its postings touched.

  Every item not in `ids` scores 0. Costs O(T + k) for T touched items (O((T + k) log(T + k))
  when fewer than k touched items score above 0), never O(G).

  Args:
    ids: `[T]` distinct touched item ids.
    scores: `[T]` their exact scores.
    k: results wanted, `1 <= k <= num_items`.
    num_items: the gallery size G.

  Returns:
    `(scores [k] float64, ids [k] int64)`, best first.
  """

  def best(ids: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < len(scores):  # Keep the n largest and every score tied with the n-th.
      kth = np.partition(scores, len(scores) - n)[len(scores) - n]
      ids, scores = ids[scores >= kth], scores[scores >= kth]
    order = np.lexsort((ids, -scores))[:n]
    return ids[order], scores[order]

  positive = scores > 0
  out_ids, out_scores = best(ids[positive], scores[positive], k)
  if len(out_ids) < k:  # Zero scores next (touched items scoring 0 and untouched ones) by id.
    scored = ids[scores != 0]
    need = k - len(out_ids)
    candidates = np.arange(min(num_items, need + len(scored)))
    zero_ids = candidates[~np.isin(candidates, scored)][:need]
    out_ids = np.concatenate([out_ids, zero_ids])
    out_scores = np.concatenate([out_scores, np.zeros(len(zero_ids))])
  if len(out_ids) < k:  # Negative scores last.
    negative = scores < 0
    neg_ids, neg_scores = best(ids[negative], scores[negative], k - len(out_ids))
    out_ids = np.concatenate([out_ids, neg_ids])
    out_scores = np.concatenate([out_scores, neg_scores])
  return out_scores, out_ids


@dataclasses.dataclass(frozen=True, eq=False)
class InvertedIndex:
  """Posting lists of a gallery: for each word, the gallery items using it and their values.

  Word w's posting list is `item_ids[indptr[w]:indptr[w + 1]]` (ascending) with the values
  `values[indptr[w]:indptr[w + 1]]`: the gallery in CSR form over words (its transpose).

  Attributes:
    indptr: `[V + 1]` int64 offsets of the posting lists.
    item_ids: `[nnz]` int32 gallery row of each posting.
    values: `[nnz]` float32 gallery value of each posting.
    num_items: the gallery size G.
  """

  indptr: np.ndarray
  item_ids: np.ndarray
  values: np.ndarray
  num_items: int

  @property
  def num_words(self) -> int:
    return len(self.indptr) - 1

  @classmethod
  def build(cls, gallery: SparseRows) -> "InvertedIndex":
    """The posting lists of `gallery` (`[G, V]` rows); O(nnz log nnz)."""
    order = np.argsort(gallery.indices, kind="stable")  # by word, then by row (row-major input)
    counts = np.bincount(gallery.indices, minlength=gallery.num_cols)
    return cls(
      np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
      gallery.row_ids()[order].astype(np.int32),
      gallery.values[order],
      gallery.num_rows,
    )

  def _check_queries(self, queries: SparseRows) -> None:
    if queries.num_cols != self.num_words:
      raise ValueError(
        f"queries have {queries.num_cols} columns; the index has {self.num_words} words"
      )

  def _accumulate(self, queries: SparseRows, q: int, acc: np.ndarray, seen: Any) -> list:
    """Adds query q's `value_q[w] * postings(w)` into `acc` `[G]` float64 over its active words.

    With `seen` (`[G]` bool, all False), marks the touched items there and returns them as a list
    of arrays (each item once); otherwise returns [].
    """
    start, end = queries.indptr[q], queries.indptr[q + 1]
    touched = []
    for word, value in zip(queries.indices[start:end].tolist(), queries.values[start:end].tolist()):
      first, last = self.indptr[word], self.indptr[word + 1]
      if first == last:
        continue
      items = self.item_ids[first:last]  # distinct within one posting list, so += is exact
      acc[items] += np.multiply(self.values[first:last], value, dtype=np.float64)
      if seen is not None:
        new = items[~seen[items]]
        seen[new] = True
        touched.append(new)
    return touched

  def search(self, queries: SparseRows, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's k best gallery items by the module's ranking rule.

    Per query, the cost is the total length of the posting lists of its active words (plus
    O(k)): scores are accumulated (in float64) into a scratch vector only at the items those
    postings hold, which are then read, ranked and reset. The two `[G]` scratch vectors are
    allocated once per call.

    Args:
      queries: `[Q, V]` rows.
      k: results per query, >= 1.

    Returns:
      `(scores [Q, min(k, G)] float64, ids [Q, min(k, G)] int64)`, best first; equal to
      `dense_topk(queries.to_dense() @ gallery.to_dense().T, k)` (exact scores).
    """
    self._check_queries(queries)
    k = min(_check_k(k), self.num_items)
    out_scores = np.zeros((queries.num_rows, k))
    out_ids = np.zeros((queries.num_rows, k), np.int64)
    acc = np.zeros(self.num_items)
    seen = np.zeros(self.num_items, bool)
    for q in range(queries.num_rows if k else 0):
      touched = self._accumulate(queries, q, acc, seen)
      ids = np.concatenate(touched) if touched else np.zeros(0, np.int32)
      scores = acc[ids]
      acc[ids] = 0.0
      seen[ids] = False
      out_scores[q], out_ids[q] = _rank_touched(ids, scores, k, self.num_items)
    return out_scores, out_ids

  def scores(self, queries: SparseRows, dtype: Any = np.float32) -> np.ndarray:
    """Every query's score against every gallery item (for full rankings).

    Accumulated like `search` (float64, over the query's postings), then stored as `dtype`.

    Args:
      queries: `[Q, V]` rows.
      dtype: of the result.

    Returns:
      `[Q, G]` = `queries.to_dense() @ gallery.to_dense().T`.
    """
    self._check_queries(queries)
    out = np.zeros((queries.num_rows, self.num_items), dtype)
    acc = np.zeros(self.num_items)
    for q in range(queries.num_rows):
      self._accumulate(queries, q, acc, None)
      out[q] = acc
      acc[:] = 0.0
    return out
