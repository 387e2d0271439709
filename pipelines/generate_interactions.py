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

import sys

from pipelines.synthetic.interactions import main

if __name__ == '__main__':
  sys.exit(main())
