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

import sys

from pipelines.synthetic.transactions import main

if __name__ == '__main__':
  sys.exit(main())
