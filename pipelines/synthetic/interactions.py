"""Synthetic e-commerce interactions (view -> click -> cart -> purchase)
and their items side table.

    python -m pipelines.generate --schema interactions \\
        --output /tmp/interactions.jsonl --rows 20000 --seed 7

writes the interaction records (any format of pipelines.generate) and
`items.csv` beside them (--items_output to put it elsewhere).

The world. Items have a category (12), a price and a hidden quality;
users a hidden conversion propensity. Item popularity and user activity
are Zipf-distributed (weight 1 / rank^a over a random permutation, so ids
say nothing about popularity). A session is one user meeting one item:
a view, then with falling probabilities a click, an add_to_cart and a
purchase, each a record a few seconds to minutes after the previous one.
A quarter of a user's sessions revisit an item of one of their recent
sessions. Every funnel step is likelier for users of higher propensity,
items of higher quality and revisits, so point-in-time user and item
activity counts and conversion rates predict purchases (and the purchase
label of an interaction is learnable) without being trivial.

Records, sorted by event time then id, fields in this order:
  interaction_id (int, 0.. consecutive), user_id (int >= 0),
  item_id (int >= 0), interaction_type (view/click/add_to_cart/purchase),
  value (float, the item's price for add_to_cart and purchase, else 0.0),
  event_time (RFC 3339 UTC, whole seconds, '...Z').
Items: item_id (int), category (string), price (float, two decimals, > 0).

Everything is drawn from generators seeded by --seed (no global random
state, no wall clock), so the same flags always give byte-identical files.
`--broken N` mixes in N records that the parser must dead-letter.
"""

import pipelines.base.quiet  # noqa: F401  pylint: disable=unused-import

import os
from typing import List, NamedTuple, Optional, Sequence, Union

import numpy as np

from pipelines.base.errors import UsageError
from pipelines.synthetic.common import (
    DEFAULT_START, TEXT_FORMATS, Broken, csv_line, not_a_record, open_text,
    output_format, parse_start, truncated, write_csv, write_jsonl)
from transforms.formats import FORMATS

FIELDS = ('interaction_id', 'user_id', 'item_id', 'interaction_type', 'value',
          'event_time')
ITEM_FIELDS = ('item_id', 'category', 'price')
INTERACTION_TYPES = ('view', 'click', 'add_to_cart', 'purchase')
# category: (median price, share of the items)
CATEGORIES = {
    'books': (14.0, 0.12), 'music': (11.0, 0.06), 'electronics': (160.0, 0.10),
    'computers': (520.0, 0.04), 'home': (38.0, 0.12), 'kitchen': (30.0, 0.09),
    'fashion': (45.0, 0.14), 'shoes': (70.0, 0.06), 'beauty': (19.0, 0.08),
    'toys': (24.0, 0.07), 'sports': (55.0, 0.07), 'grocery': (7.0, 0.05),
}
ROWS_PER_USER = 25
ROWS_PER_ITEM = 20
ITEM_ZIPF = 1.0      # popularity of the item of rank r: 1 / r
USER_ZIPF = 0.9      # activity of the user of rank r: 1 / r^0.9
REVISIT_RATE = 0.25  # sessions that return to an item of a recent session
# Hidden traits (normal, mean 0): wide enough that earlier conversion rates
# of a user or an item tell them apart.
PROPENSITY_SD = 1.2  # users
QUALITY_SD = 1.0     # items
# Funnel step logits: intercept + user propensity, item quality and revisit
# weights. With the traits above about 30% of views are clicked, 40% of
# clicks carted and 75% of carts bought: ~10% of views end in a purchase,
# ~6% of the records are purchases.
FUNNEL = {'click': (-0.9, 0.5, 0.4, 0.8),
          'add_to_cart': (-1.0, 0.8, 0.8, 0.8),
          'purchase': (0.2, 1.0, 1.0, 0.6)}
MAX_GAP_SECONDS = 600  # between two steps of a session


class Items(NamedTuple):
  """The catalogue as arrays indexed by item id."""
  category: np.ndarray  # index into CATEGORIES
  price: np.ndarray     # two decimals, > 0
  quality: np.ndarray   # hidden
  popularity: np.ndarray

  def rows(self) -> List[dict]:
    names = list(CATEGORIES)
    return [{'item_id': i, 'category': names[c], 'price': p}
            for i, (c, p) in enumerate(zip(self.category.tolist(),
                                           self.price.tolist()))]


def _zipf_weights(rng, n: int, a: float) -> np.ndarray:
  """Probabilities 1 / rank^a, ranks a random permutation of the ids."""
  rank = rng.permutation(n) + 1
  w = 1.0 / rank.astype(np.float64) ** a
  return w / w.sum()


def _items(rng, n: int) -> Items:
  names = list(CATEGORIES)
  share = np.array([CATEGORIES[c][1] for c in names])
  category = rng.choice(len(names), n, p=share / share.sum())
  median = np.array([CATEGORIES[c][0] for c in names])[category]
  price = np.maximum(np.round(median * rng.lognormal(0.0, 0.5, n), 2), 0.5)
  return Items(category, price, rng.normal(0.0, QUALITY_SD, n),
               _zipf_weights(rng, n, ITEM_ZIPF))


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _revisits(rng, user, start, item):
  """Replaces the item of REVISIT_RATE of each user's sessions (not the
  first) by the item of one of that user's earlier sessions, usually a
  recent one. Returns the revisit flag per session."""
  n = len(user)
  order = np.lexsort((np.arange(n), start, user))
  u = user[order]
  group_start = np.searchsorted(u, u)
  position = np.arange(n) - group_start
  back = np.minimum(rng.geometric(0.5, n), position)  # 1, 2, 3.. back
  revisit = (rng.random(n) < REVISIT_RATE) & (position > 0)
  prev = np.arange(n) - back
  # Sorted positions: an earlier session may itself be a revisit; chains
  # resolve one link per pass (earlier sessions first), at most n passes.
  item_sorted = item[order]
  while True:
    resolved = np.where(revisit, item_sorted[prev], item_sorted)
    if np.array_equal(resolved, item_sorted):
      break
    item_sorted = resolved
  item[order] = item_sorted
  flag = np.zeros(n, dtype=bool)
  flag[order] = revisit
  return flag


def _check_sizes(rows: int, users: int, items: int, days: int):
  if rows < 0:
    raise UsageError(f'--rows must be >= 0, got {rows}')
  if users < 1:
    raise UsageError(f'--users must be >= 1, got {users}')
  if items < 1:
    raise UsageError(f'--items must be >= 1, got {items}')
  if days < 1:
    raise UsageError(f'--days must be >= 1, got {days}')


def default_users(rows: int) -> int:
  return max(1, rows // ROWS_PER_USER)


def default_items(rows: int) -> int:
  return max(10, rows // ROWS_PER_ITEM)


def generate_interactions(rows: int = 30000, users: Optional[int] = None,
                          items: Optional[int] = None, seed: int = 7,
                          start: str = DEFAULT_START, days: int = 28
                          ) -> tuple:
  """(clean records, items rows): records sorted by event time then id,
  fields in FIELDS order; items rows in id order, fields ITEM_FIELDS."""
  users = default_users(rows) if users is None else users
  items = default_items(rows) if items is None else items
  _check_sizes(rows, users, items, days)
  epoch = parse_start(start)
  rng = np.random.default_rng(seed)
  catalogue = _items(rng, items)
  propensity = rng.normal(0.0, PROPENSITY_SD, users)
  activity = _zipf_weights(rng, users, USER_ZIPF)
  # At least one record per session: `rows` sessions always suffice; the
  # ones past --rows records are dropped (sessions are iid, so this cuts
  # at random, not at the end of the period).
  n = rows
  user = rng.choice(users, n, p=activity)
  session_start = rng.integers(0, days * 86400, n)
  item = rng.choice(items, n, p=catalogue.popularity)
  revisit = _revisits(rng, user, session_start, item)
  depth = np.ones(n, dtype=np.int64)
  going = np.ones(n, dtype=bool)
  for step in ('click', 'add_to_cart', 'purchase'):
    b0, b_user, b_item, b_revisit = FUNNEL[step]
    p = _sigmoid(b0 + b_user * propensity[user] + b_item * catalogue.quality[
        item] + b_revisit * revisit)
    going &= rng.random(n) < p
    depth += going
  gaps = rng.integers(5, MAX_GAP_SECONDS + 1, (n, 3)).cumsum(axis=1)
  # Keep whole sessions in draw order until --rows records; the last one
  # kept loses its tail steps if it does not fit.
  end = np.cumsum(depth)
  kept = int(np.searchsorted(end, rows, side='left')) + 1 if rows else 0
  kept = min(kept, n)
  depth = depth[:kept].copy()
  if kept:
    depth[-1] -= max(0, int(end[kept - 1]) - rows)
  session = np.repeat(np.arange(kept), depth)
  step = np.arange(len(session)) - np.repeat(np.cumsum(depth) - depth, depth)
  offsets = np.concatenate([np.zeros((kept, 1), np.int64), gaps[:kept]],
                           axis=1)
  t = np.minimum(session_start[session] + offsets[session, step],
                 days * 86400 - 1)
  ev_user, ev_item = user[session], item[session]
  order = np.lexsort((step, session, ev_user, t))  # ties: stable, by user
  return (_records(epoch, t[order], ev_user[order], ev_item[order],
                   step[order], catalogue.price),
          catalogue.rows())


def _records(epoch, t, user, item, step, price) -> List[dict]:
  stamps = np.datetime_as_string((epoch + t).astype('datetime64[s]'),
                                 unit='s', timezone='UTC')
  value = np.where(step >= 2, price[item], 0.0)
  columns = (range(len(t)), user.tolist(), item.tolist(),
             [INTERACTION_TYPES[s] for s in step.tolist()], value.tolist(),
             stamps.tolist())
  return [dict(zip(FIELDS, values)) for values in zip(*columns)]


# Broken records ------------------------------------------------------------
def _truncated(rec, fmt):
  return truncated(rec, fmt, 3)   # a CSV row of 3 columns: too few


def _without_item(rec, fmt):
  return {k: v for k, v in rec.items() if k != 'item_id'}


def _unknown_type(rec, fmt):
  return dict(rec, interaction_type='wishlist')


def _negative_value(rec, fmt):
  return dict(rec, interaction_type='purchase',
              value=-(abs(rec['value']) or 9.99))


# (expected error kind, how to break a clean record, formats that carry it).
# The kinds are those of the parser with schemas/interactions.yaml
# declaring interaction_type's allowed values and value's min: 0.
_CATALOGUE = (
    ('malformed', _truncated, TEXT_FORMATS),
    ('malformed', not_a_record, TEXT_FORMATS),
    ('missing_required', _without_item, FORMATS),
    ('not_allowed', _unknown_type, FORMATS),
    ('out_of_range', _negative_value, FORMATS),
)


def broken_kinds(fmt: str) -> List[str]:
  """Expected error kinds, in the order `broken_records` cycles through."""
  return [kind for kind, _, formats in _CATALOGUE if fmt in formats]


def broken_records(clean: List[dict], seed: int, fmt: str,
                   count: Optional[int] = None) -> List[Broken]:
  """`count` broken records (default: one of each kind `fmt` can carry),
  each a broken copy of a random clean record under a fresh id, right
  after it."""
  makers = [(k, m) for k, m, formats in _CATALOGUE if fmt in formats]
  count = len(makers) if count is None else count
  if count and not clean:
    raise UsageError('--broken needs at least one clean row to break')
  rng = np.random.default_rng([seed, 1])  # independent of the clean stream
  n = len(clean)
  sources = np.sort(rng.choice(n, count, replace=count > n)) if count else []
  out = []
  for k, src in enumerate(sources):
    kind, make = makers[k % len(makers)]
    rec = dict(clean[int(src)], interaction_id=n + k)
    out.append(Broken(kind, make(rec, fmt), int(src)))
  return out


# Writers -------------------------------------------------------------------
SYNC_MARKER = b'mlpipe.interact!'  # fixed: fastavro picks a random one
_AVRO_TYPES = {'interaction_id': 'long', 'user_id': 'long', 'item_id': 'long',
               'interaction_type': 'string', 'value': 'double',
               'event_time': 'string'}  # RFC 3339, as the transactions


def avro_schema() -> dict:
  return {'type': 'record', 'name': 'Interactions', 'namespace': 'mlpipe',
          'fields': [{'name': n, 'type': ['null', _AVRO_TYPES[n]],
                      'default': None} for n in FIELDS]}


def _typed_rows(records, fmt):
  for record in records:
    if isinstance(record, str):
      raise ValueError(f'{fmt} cannot carry malformed text records')
    yield {n: record.get(n) for n in FIELDS}


def _write_avro(records, path, names):
  del names
  import fastavro  # pylint: disable=g-import-not-at-top
  schema = fastavro.parse_schema(avro_schema())
  with open(path, 'wb') as f:
    fastavro.writer(f, schema, _typed_rows(records, 'avro'), codec='deflate',
                    sync_marker=SYNC_MARKER)


def _write_parquet(records, path, names):
  del names
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  rows = list(_typed_rows(records, 'parquet'))
  micros = [None if r['event_time'] is None else
            int(np.datetime64(r['event_time'].rstrip('Z'), 'us')
                .astype(np.int64)) for r in rows]
  types = {'interaction_id': pa.int64(), 'user_id': pa.int64(),
           'item_id': pa.int64(), 'interaction_type': pa.string(),
           'value': pa.float64()}
  columns = {n: pa.array([r[n] for r in rows], type=types[n])
             for n in types}
  columns['event_time'] = pa.array(micros, type=pa.timestamp('us', tz='UTC'))
  pq.write_table(pa.table(columns), path, compression='snappy')


# Text formats through the generators' common writers (given our names).
_WRITERS = {'jsonl': write_jsonl, 'csv': write_csv, 'avro': _write_avro,
            'parquet': _write_parquet}


def write_interactions(records: Sequence[Union[dict, str]], path: str,
                       fmt: Optional[str] = None) -> str:
  """Writes records (dicts, and raw text lines for JSON lines/CSV) to
  `path` in `fmt` (default: from the extension). Returns the format."""
  fmt = output_format(path, fmt)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _WRITERS[fmt](records, path, list(FIELDS))
  return fmt


def write_items(items: List[dict], path: str):
  """The items side table as CSV (prices with two decimals)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open_text(path) as f:
    f.write(csv_line(ITEM_FIELDS) + '\n')
    for row in items:
      f.write(csv_line([row['item_id'], row['category'],
                         f'{row["price"]:.2f}']) + '\n')


def default_items_output(output: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(output)), 'items.csv')
