"""Synthetic card transactions with learnable fraud, in every input format.

    python -m pipelines.generate --output /tmp/tx.parquet --rows 1000000

(data/sample/README.md has the exact command of the committed sample.)

Users have a home country (and card currency), a few usual merchants, a
typical spend, daytime-heavy habits and varied activity. Fraud comes in
short episodes on a compromised card (bursts, card testing, unusually large
amounts, cloned-card ATM withdrawals at night, and a few stealthy ones),
every transaction of an episode labelled 1. Legitimate travel, large
purchases, quick repeat purchases and night owls keep the task from being
trivial. Records follow schemas/transactions.yaml and are sorted by event
time, then id.

Everything is drawn from generators seeded by --seed (no global random
state, no wall clock), so the same flags always give byte-identical files.
`--broken N` mixes in N records that the parser must dead-letter.
"""

import pipelines.base.quiet  # noqa: F401  pylint: disable=unused-import

import os
from typing import List, Optional, Sequence, Union

import numpy as np

from pipelines.base.errors import UsageError
# insert_broken is part of this module's use (generate, break, insert,
# write), so callers of the generator need no second import.
from pipelines.synthetic.common import (  # pylint: disable=unused-import
    DEFAULT_START, TEXT_FORMATS, Broken, insert_broken, not_a_record,
    output_format, parse_start, truncated, write_csv, write_jsonl)
from schemas.dataset import load_dataset
from transforms.formats import FORMATS

FRAUD_RATE = 0.015
ROWS_PER_USER = 60

# category: (median amount, log-sd, P(pos), P(online), P(atm), usage weight)
CATEGORIES = {
    'grocery': (42.0, 0.55, 0.95, 0.05, 0.0, 0.20),
    'restaurant': (28.0, 0.55, 0.85, 0.15, 0.0, 0.19),
    'fuel': (48.0, 0.35, 1.0, 0.0, 0.0, 0.08),
    'travel': (240.0, 0.8, 0.35, 0.65, 0.0, 0.04),
    'electronics': (150.0, 0.9, 0.5, 0.5, 0.0, 0.05),
    'online_retail': (55.0, 0.8, 0.0, 1.0, 0.0, 0.15),
    'entertainment': (35.0, 0.6, 0.6, 0.4, 0.0, 0.08),
    'health': (45.0, 0.7, 0.9, 0.1, 0.0, 0.06),
    'utilities': (85.0, 0.4, 0.0, 1.0, 0.0, 0.05),
    'cash_withdrawal': (100.0, 0.6, 0.0, 0.0, 1.0, 0.07),
    'gift_cards': (50.0, 0.5, 0.4, 0.6, 0.0, 0.03),
}
CHANNELS = ('pos', 'online', 'atm', 'refund')
# Home country: (share of users, card currency).
HOMES = {'US': (0.34, 'USD'), 'GB': (0.16, 'GBP'), 'DE': (0.12, 'EUR'),
         'FR': (0.10, 'EUR'), 'ES': (0.07, 'EUR'), 'IT': (0.07, 'EUR'),
         'NL': (0.05, 'EUR'), 'CA': (0.06, 'USD'), 'MX': (0.03, 'USD')}
# Legit trips; a few go outside the declared domain (TFDV sees new values).
TRAVEL = {'FR': 12, 'ES': 12, 'IT': 10, 'GB': 8, 'US': 10, 'DE': 6, 'NL': 5,
          'CA': 4, 'MX': 6, 'BR': 3, 'CN': 2, 'VN': 2, 'ID': 2, 'RO': 1,
          'NG': 1, 'RU': 1, 'PT': 6, 'GR': 4, 'JP': 3, 'TH': 3, 'TR': 3,
          'CH': 3, 'AE': 2}
FRAUD_COUNTRIES = {'NG': 15, 'RO': 15, 'RU': 14, 'CN': 12, 'VN': 10,
                   'ID': 10, 'BR': 10, 'MX': 5, 'US': 3, 'GB': 3, 'NL': 3}
COUNTRIES = tuple(sorted(set(HOMES) | set(TRAVEL) | set(FRAUD_COUNTRIES)))
# Episode kind: share of fraud episodes.
EPISODES = {'burst': 0.32, 'card_testing': 0.25, 'large': 0.21,
            'atm_night': 0.16, 'stealth': 0.06}
NIGHT_START_SHARE = 0.45     # fraud episodes that start between 00 and 05
TRAVEL_SHARE = 0.15          # users with a trip abroad in four weeks
LARGE_PURCHASE_RATE = 0.004  # legit unusually large purchases
FOLLOW_UP_RATE = 0.03        # legit second purchase minutes after another
REFUND_RATE = 0.01
NEW_MERCHANT_RATE = 0.12     # legit purchases outside the usual merchants
MAX_USUAL = 15               # usual merchants per user, at most


# World: merchants and users ------------------------------------------------
def _check_declaration(dataset):
  """The profiles above must use exactly the declared values."""
  fields = dataset.fields
  if set(fields['merchant_category'].allowed) != set(CATEGORIES):
    raise ValueError('CATEGORIES does not match the declared categories')
  if set(fields['channel'].allowed) != set(CHANNELS):
    raise ValueError('CHANNELS does not match the declared channels')
  currencies = {c for _, c in HOMES.values()}
  if not currencies <= set(fields['currency'].allowed):
    raise ValueError('HOMES uses an undeclared currency')


def _weights(mapping, exclude=()):
  keys = [k for k in mapping if k not in exclude]
  w = np.array([mapping[k] for k in keys], dtype=float)
  return keys, w / w.sum()


class _World:
  """Merchants (country, category) and users (home, habits), as arrays."""

  def __init__(self, rng, users: int):
    cats = list(CATEGORIES)
    self.cats = cats
    self.medians = np.array([CATEGORIES[c][0] for c in cats])
    _, cat_w = _weights({c: CATEGORIES[c][5] for c in cats})
    # Every (country, category) has merchants; the bulk is in home countries.
    cover_country = np.repeat(np.arange(len(COUNTRIES)), len(cats) * 2)
    cover_cat = np.tile(np.repeat(np.arange(len(cats)), 2), len(COUNTRIES))
    homes, home_w = _weights({k: v[0] for k, v in HOMES.items()})
    bulk = int(np.clip(users * 2, 300, 99_999 - len(cover_country)))
    bulk_country = np.array([COUNTRIES.index(h) for h in homes])[
        rng.choice(len(homes), bulk, p=home_w)]
    bulk_cat = rng.choice(len(cats), bulk, p=cat_w)
    order = rng.permutation(len(cover_country) + bulk)  # ids not by country
    self.m_country = np.concatenate([cover_country, bulk_country])[order]
    self.m_cat = np.concatenate([cover_cat, bulk_cat])[order]
    self.by_country = {c: np.flatnonzero(self.m_country == c)
                       for c in range(len(COUNTRIES))}
    self.by_country_cat = {}
    for m in np.lexsort((np.arange(len(order)), self.m_cat, self.m_country)):
      key = (int(self.m_country[m]), int(self.m_cat[m]))
      self.by_country_cat.setdefault(key, []).append(m)
    self._users(rng, users, homes, home_w, cat_w)

  def _users(self, rng, users, homes, home_w, cat_w):
    home = rng.choice(len(homes), users, p=home_w)
    self.u_home = np.array([COUNTRIES.index(h) for h in homes])[home]
    self.u_currency = [HOMES[homes[h]][1] for h in home]
    self.u_activity = rng.lognormal(0.0, 0.8, users)
    self.u_scale = rng.lognormal(0.0, 0.4, users)
    self.u_peak = rng.normal(13.5, 2.5, users)
    self.u_spread = rng.uniform(2.5, 4.5, users)
    self.u_night = np.where(rng.random(users) < 0.15, 0.08, 0.01)
    # Usual merchants: a few from home, Zipf-like preference.
    k = np.minimum(3 + rng.poisson(5, users), MAX_USUAL)
    self.usual = np.zeros((users, MAX_USUAL), dtype=np.int64)
    self.usual_cum = np.ones((users, MAX_USUAL))
    for u in range(users):
      pool = self.by_country[int(self.u_home[u])]
      p = cat_w[self.m_cat[pool]]
      chosen = rng.choice(pool, k[u], replace=False, p=p / p.sum())
      w = rng.uniform(0.5, 1.5, k[u]) / np.arange(1, k[u] + 1) ** 1.1
      self.usual[u, :k[u]] = chosen
      self.usual_cum[u, :k[u]] = np.cumsum(w) / w.sum()
      self.usual_cum[u, k[u] - 1:] = 1.0

  def usual_merchant(self, rng, user):
    """One usual merchant per element of `user` (an array)."""
    r = rng.random(len(user))
    j = (self.usual_cum[user] < r[:, None]).sum(axis=1)
    return self.usual[user, np.minimum(j, MAX_USUAL - 1)]

  def merchant_in(self, rng, country, cats):
    """A random merchant of `country` in one of the category names `cats`."""
    cat = self.cats.index(cats[rng.integers(len(cats))])
    pool = self.by_country_cat[(int(country), cat)]
    return pool[rng.integers(len(pool))]

  def typical(self, user, merchant):
    """Median amount of `user` at `merchant` (arrays)."""
    return self.medians[self.m_cat[merchant]] * self.u_scale[user]


# Legitimate transactions ---------------------------------------------------
def _amount_cents(rng, world, user, merchant):
  """Lognormal per user and category; ATMs in 20s, gift cards in steps."""
  sds = np.array([CATEGORIES[c][1] for c in world.cats])
  cat = world.m_cat[merchant]
  amount = world.typical(user, merchant) * np.exp(
      sds[cat] * rng.standard_normal(len(user)))
  cents = np.maximum(np.round(amount * 100), 50).astype(np.int64)
  atm = cat == world.cats.index('cash_withdrawal')
  cents[atm] = np.maximum(np.round(cents[atm] / 2000), 1) * 2000
  gift = cat == world.cats.index('gift_cards')
  steps = np.array([1000, 1500, 2000, 2500, 5000, 10000])
  cents[gift] = steps[rng.integers(len(steps), size=int(gift.sum()))]
  return cents


def _channels(rng, world, merchant):
  probs = np.array([CATEGORIES[c][2:5] for c in world.cats])[
      world.m_cat[merchant]]
  r = rng.random(len(merchant))
  return (r[:, None] > np.cumsum(probs, axis=1)).sum(axis=1).clip(0, 2)


def _legit(rng, world, n, days):
  """Arrays (user, seconds, merchant) of n legitimate transactions."""
  period = days * 86400
  n_follow = int(n * FOLLOW_UP_RATE) if n > 1 else 0
  share = world.u_activity / world.u_activity.sum()
  user = np.repeat(np.arange(len(share)), rng.multinomial(n - n_follow, share))
  m = len(user)
  night = rng.random(m) < world.u_night[user]
  hour = np.where(night, rng.integers(0, 6, m),
                  np.round(world.u_peak[user] + world.u_spread[user] *
                           rng.standard_normal(m)).astype(np.int64) % 24)
  t = rng.integers(0, days, m) * 86400 + hour * 3600 + rng.integers(0, 3600, m)
  merchant = world.usual_merchant(rng, user)
  new = np.flatnonzero(rng.random(m) < NEW_MERCHANT_RATE)
  for i in new:
    pool = world.by_country[int(world.u_home[user[i]])]
    merchant[i] = pool[rng.integers(len(pool))]
  # Quick second purchases: same user, minutes later, a usual merchant.
  src = rng.integers(0, max(m, 1), n_follow)
  user = np.concatenate([user, user[src]])
  t = np.concatenate([t, np.minimum(t[src] + rng.integers(20, 900, n_follow),
                                    period - 1)])
  merchant = np.concatenate([merchant, world.usual_merchant(rng, user[m:])])
  _trips(rng, world, user, t, merchant, days)
  return user, t, merchant


def _trips(rng, world, user, t, merchant, days):
  """Some users travel: purchases abroad at new merchants (legit noise)."""
  users = len(world.u_home)
  share = min(0.5, TRAVEL_SHARE * days / 28)
  travellers = np.flatnonzero(rng.random(users) < share)
  order = np.argsort(user, kind='stable')
  bounds = np.searchsorted(user[order], np.arange(users + 1))
  local = ['restaurant', 'travel', 'entertainment', 'grocery', 'fuel',
           'cash_withdrawal', 'health']
  for u in travellers:
    home = COUNTRIES[world.u_home[u]]
    dests, p = _weights(TRAVEL, exclude=(home,))
    dest = COUNTRIES.index(dests[rng.choice(len(dests), p=p)])
    length = min(days, int(rng.integers(2, 8))) * 86400
    begin = int(rng.integers(0, days * 86400 - length + 1))
    for i in order[bounds[u]:bounds[u + 1]]:
      if begin <= t[i] < begin + length and rng.random() < 0.8:
        merchant[i] = world.merchant_in(rng, dest, local)


def _large_purchases(rng, world, user, merchant, cents):
  """Legit big-ticket purchases at new home merchants (noise for 'large')."""
  picked = np.flatnonzero(rng.random(len(user)) < LARGE_PURCHASE_RATE)
  for i in picked:
    merchant[i] = world.merchant_in(rng, world.u_home[user[i]],
                                    ['electronics', 'travel'])
    cents[i] = int(world.typical(user[i:i + 1], merchant[i:i + 1])[0] *
                   rng.lognormal(np.log(6), 0.5) * 100)


def _refunds(rng, world, merchant, cents, channel):
  """~1% of purchases become (partial) refunds: negative amounts."""
  never = [world.cats.index(c) for c in ('cash_withdrawal', 'utilities',
                                          'gift_cards')]
  ok = ~np.isin(world.m_cat[merchant], never)
  # ~85% of purchases are in refundable categories.
  picked = np.flatnonzero(ok & (rng.random(len(cents)) < REFUND_RATE / 0.85))
  cents[picked] = -np.round(cents[picked] * rng.uniform(
      0.3, 1.0, len(picked))).astype(np.int64).clip(1, None)
  channel[picked] = CHANNELS.index('refund')


# Fraud episodes ------------------------------------------------------------
def _episode_start(rng, days, night):
  period = days * 86400
  lo = min(2 * 86400, period // 4)
  hi = max(lo + 1, period - 4 * 3600)
  t = int(rng.integers(lo, hi))
  if night:  # move to the same day between 00:00 and 05:00
    t = t - t % 86400 + int(rng.integers(0, 5 * 3600))
  return t


def _attack_country(rng, world, user, p_home):
  home = int(world.u_home[user])
  if rng.random() < p_home:
    return home
  keys, p = _weights(FRAUD_COUNTRIES, exclude=(COUNTRIES[home],))
  return COUNTRIES.index(keys[rng.choice(len(keys), p=p)])


def _episode(rng, world, user, kind, days):
  """(seconds, merchant, cents, channel) tuples of one fraud episode."""
  online, pos, atm = (CHANNELS.index(c) for c in ('online', 'pos', 'atm'))
  scale = float(world.u_scale[user])
  night = kind == 'atm_night' or (kind != 'stealth' and
                                  rng.random() < NIGHT_START_SHARE)
  t = _episode_start(rng, days, night)
  out = []
  if kind == 'burst':   # many purchases within minutes at new merchants
    country = _attack_country(rng, world, user, 0.3)
    for _ in range(int(rng.integers(4, 10))):
      m = world.merchant_in(rng, country, ['electronics', 'online_retail',
                                           'gift_cards', 'entertainment'])
      cents = world.typical(np.array([user]), np.array([m]))[0] * rng.lognormal(
          np.log(2.5), 0.6) * 100
      out.append((t, m, int(cents), online if rng.random() < 0.7 else pos))
      t += int(rng.integers(15, 240))
  elif kind == 'card_testing':  # tiny online amounts, then the real hit
    country = _attack_country(rng, world, user, 0.4)
    m = world.merchant_in(rng, country, ['gift_cards', 'online_retail'])
    for _ in range(int(rng.integers(3, 7))):
      cents = 100 if rng.random() < 0.3 else int(rng.integers(50, 500))
      out.append((t, m, cents, online))
      t += int(rng.integers(10, 120))
    for _ in range(int(rng.integers(1, 3))):
      t += int(rng.integers(60, 900))
      m = world.merchant_in(rng, country, ['gift_cards', 'electronics'])
      out.append((t, m, int(rng.uniform(300, 2500) * 100), online))
  elif kind == 'large':  # one to three unusually large purchases
    country = _attack_country(rng, world, user, 0.5)
    for _ in range(int(rng.integers(1, 4))):
      m = world.merchant_in(rng, country, ['electronics', 'travel',
                                           'online_retail', 'gift_cards'])
      cents = min(150 * scale * rng.lognormal(np.log(8), 0.5), 20000) * 100
      out.append((t, m, int(cents), online if rng.random() < 0.6 else pos))
      t += int(rng.integers(300, 3600))
  elif kind == 'atm_night':  # cloned card: cash abroad at night
    country = _attack_country(rng, world, user, 0.2)
    for _ in range(int(rng.integers(2, 6))):
      m = world.merchant_in(rng, country, ['cash_withdrawal'])
      out.append((t, m, int(rng.integers(10, 41)) * 2000, atm))
      t += int(rng.integers(120, 1800))
  else:  # stealth: looks like the user's own habits (irreducible noise)
    for _ in range(int(rng.integers(1, 3))):
      m = int(world.usual_merchant(rng, np.array([user]))[0])
      cents = int(_amount_cents(rng, world, np.array([user]),
                                np.array([m]))[0])
      channel = int(_channels(rng, world, np.array([m]))[0])
      out.append((t, m, cents, channel))
      t += int(rng.integers(600, 7200))
  period = days * 86400
  return [(min(s, period - 1), m, max(c, 1), ch) for s, m, c, ch in out]


def _fraud(rng, world, n, days):
  """Arrays (user, seconds, merchant, cents, channel) of n fraud rows."""
  users = len(world.u_home)
  p = world.u_activity / world.u_activity.sum()
  # Busy cards are more exposed; each victim once while there are enough.
  victims = rng.choice(users, min(users, max(n, 1)), replace=False, p=p)
  kinds, kind_p = _weights(EPISODES)
  rows, episodes = [], 0
  while len(rows) < n:
    user = int(victims[episodes % len(victims)])
    episodes += 1
    kind = kinds[rng.choice(len(kinds), p=kind_p)]
    rows.extend((user,) + r for r in _episode(rng, world, user, kind, days))
  rows = rows[:n]
  if not rows:
    empty = np.zeros(0, dtype=np.int64)
    return empty, empty, empty, empty, empty
  return tuple(np.array(col, dtype=np.int64) for col in zip(*rows))


# Records -------------------------------------------------------------------
def _check_sizes(rows: int, users: int, days: int):
  if rows < 0:
    raise UsageError(f'--rows must be >= 0, got {rows}')
  if not 1 <= users <= 99_999:
    raise UsageError(f'--users must be in 1..99999 (ids are u00001..u99999), '
                     f'got {users}')
  if days < 1:
    raise UsageError(f'--days must be >= 1, got {days}')
  if rows > 999_999_999:
    raise UsageError('--rows must be < 10^9 (ids are tx + 9 digits)')


def generate_transactions(rows: int = 30000, users: Optional[int] = None,
                          seed: int = 7, start: str = DEFAULT_START,
                          days: int = 28) -> List[dict]:
  """Clean records, sorted by event time then id, fields in declaration
  order; event_time is an RFC 3339 string ('...Z', whole seconds)."""
  dataset = load_dataset()
  _check_declaration(dataset)
  if users is None:
    users = max(1, rows // ROWS_PER_USER)
  _check_sizes(rows, users, days)
  epoch = parse_start(start)
  rng = np.random.default_rng(seed)
  world = _World(rng, users)
  n_fraud = int(round(rows * FRAUD_RATE))
  user, t, merchant = _legit(rng, world, rows - n_fraud, days)
  cents = _amount_cents(rng, world, user, merchant)
  _large_purchases(rng, world, user, merchant, cents)
  channel = _channels(rng, world, merchant)
  _refunds(rng, world, merchant, cents, channel)
  f_user, f_t, f_merchant, f_cents, f_channel = _fraud(rng, world, n_fraud,
                                                       days)
  user = np.concatenate([user, f_user])
  t = np.concatenate([t, f_t])
  merchant = np.concatenate([merchant, f_merchant])
  cents = np.concatenate([cents, f_cents]).clip(-500_000, 2_000_000)
  channel = np.concatenate([channel, f_channel])
  fraud = np.concatenate([np.zeros(len(user) - len(f_user), np.int64),
                          np.ones(len(f_user), np.int64)])
  order = np.lexsort((np.arange(len(t)), user, t))  # ties: stable by user
  return _records(dataset, world, epoch, user[order], t[order],
                  merchant[order], cents[order], channel[order], fraud[order])


def _records(dataset, world, epoch, user, t, merchant, cents, channel, fraud):
  stamps = np.datetime_as_string((epoch + t).astype('datetime64[s]'),
                                 unit='s', timezone='UTC')
  user_ids = [f'u{u + 1:05d}' for u in range(len(world.u_home))]
  merchant_ids = [f'm{m + 1:05d}' for m in range(len(world.m_cat))]
  user_l, merchant_l = user.tolist(), merchant.tolist()
  columns = {
      'transaction_id': [f'tx{i + 1:09d}' for i in range(len(t))],
      'user_id': [user_ids[u] for u in user_l],
      'merchant_id': [merchant_ids[m] for m in merchant_l],
      'merchant_category': [world.cats[c] for c in
                            world.m_cat[merchant].tolist()],
      'amount': (cents / 100).tolist(),
      'currency': [world.u_currency[u] for u in user_l],
      'channel': [CHANNELS[c] for c in channel.tolist()],
      'country': [COUNTRIES[c] for c in world.m_country[merchant].tolist()],
      'event_time': stamps.tolist(),
      'is_fraud': fraud.tolist(),
  }
  names = list(dataset.fields)
  return [dict(zip(names, values))
          for values in zip(*(columns[n] for n in names))]


# Broken records ------------------------------------------------------------
def _truncated(rec, fmt):
  return truncated(rec, fmt, 6)   # a CSV row of 6 columns: too few


def _without(field):
  return lambda rec, fmt: {k: v for k, v in rec.items() if k != field}


def _setting(**changes):
  return lambda rec, fmt: dict(rec, **changes)


def _amount_text(rec, fmt):
  return dict(rec, amount=f'{abs(rec["amount"]):.2f} {rec["currency"]}')


def _naive_time(rec, fmt):
  return dict(rec, event_time=rec['event_time'].rstrip('Z'))


def _refund_positive(rec, fmt):
  return dict(rec, channel='refund', amount=abs(rec['amount']) or 1.0)


def _purchase_negative(rec, fmt):
  return dict(rec, channel='pos', amount=-(abs(rec['amount']) or 1.0))


# (expected error kind, how to break a clean record, formats that carry it)
_ALL = FORMATS
_CATALOGUE = (
    ('malformed', _truncated, TEXT_FORMATS),
    ('malformed', not_a_record, TEXT_FORMATS),
    ('missing_required', _without('merchant_id'), _ALL),
    ('type_error', _amount_text, TEXT_FORMATS),
    ('type_error', _naive_time, ('jsonl', 'csv', 'avro')),
    ('out_of_range', _setting(amount=250000.0), _ALL),
    ('not_allowed', _setting(currency='JPY'), _ALL),
    ('pattern_mismatch', _setting(user_id='U-01234'), _ALL),
    ('rule_violation', _refund_positive, _ALL),
    ('duplicate', None, _ALL),
    ('missing_required', _setting(amount=None), _ALL),
    ('rule_violation', _purchase_negative, _ALL),
)


def broken_kinds(fmt: str) -> List[str]:
  """Expected error kinds, in the order `broken_records` cycles through."""
  return [kind for kind, _, formats in _CATALOGUE if fmt in formats]


def broken_records(clean: List[dict], seed: int, fmt: str,
                   count: Optional[int] = None) -> List[Broken]:
  """`count` broken records (default: one of each kind `fmt` can carry).

  Each breaks a copy of a random clean record (under a fresh id, so only the
  duplicate shares an id) and goes right after it; the duplicate is an
  exact copy placed later in the file than its original.
  """
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
    src = int(src)
    if make is None:
      out.append(Broken(kind, dict(clean[src]),
                        min(n - 1, src + int(rng.integers(1, 200)))))
      continue
    rec = dict(clean[src], transaction_id=f'tx{n + k + 1:09d}')
    out.append(Broken(kind, make(rec, fmt), src))
  return out


# Writers -------------------------------------------------------------------
SYNC_MARKER = b'mlpipe.generate!'  # fixed: fastavro picks a random one


def _typed_rows(records, names, fmt):
  for record in records:
    if isinstance(record, str):
      raise ValueError(f'{fmt} cannot carry malformed text records')
    yield {n: record.get(n) for n in names}


def _write_avro(records, path, names):
  import fastavro
  schema = fastavro.parse_schema(load_dataset().avro_schema())
  with open(path, 'wb') as f:
    fastavro.writer(f, schema, _typed_rows(records, names, 'avro'),
                    codec='deflate', sync_marker=SYNC_MARKER)


def _write_parquet(records, path, names):
  import pyarrow as pa
  import pyarrow.parquet as pq
  dataset = load_dataset()
  schema = dataset.arrow_schema()
  rows = list(_typed_rows(records, names, 'parquet'))
  columns = {}
  for name in names:
    values = [r[name] for r in rows]
    if dataset.fields[name].type == 'timestamp':
      values = [None if v is None else int(np.datetime64(v.rstrip('Z'), 'us')
                                           .astype(np.int64)) for v in values]
    columns[name] = pa.array(values, type=schema.field(name).type)
  pq.write_table(pa.table(columns, schema=schema), path,
                 compression='snappy')


_WRITERS = {'jsonl': write_jsonl, 'csv': write_csv, 'avro': _write_avro,
            'parquet': _write_parquet}


def write_records(records: Sequence[Union[dict, str]], path: str,
                  fmt: Optional[str] = None) -> str:
  """Writes dicts (and raw text lines, JSON lines/CSV only) to `path` in
  `fmt` (default: from the extension). Returns the format written."""
  fmt = output_format(path, fmt)
  names = list(load_dataset().fields)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _WRITERS[fmt](records, path, names)
  return fmt
