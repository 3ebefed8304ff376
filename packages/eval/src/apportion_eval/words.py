"""Word lists written for this package (no licence strings attached): keys and word values.

Keys and values are adjective-noun pairs ("amber-falcon"): they read as English, tokenize
into a few tokens, and practically never occur in the standard-library haystack, so a
needle's value appears in a context exactly where it was put.
"""

from __future__ import annotations

import random

ADJECTIVES = (
    "amber", "ancient", "brave", "bright", "brisk", "calm", "clever", "copper", "crimson",
    "crystal", "dusty", "eager", "emerald", "faded", "fierce", "frozen", "gentle", "gilded",
    "golden", "hollow", "humble", "icy", "ivory", "jolly", "lively", "lonely", "lucky",
    "marble", "mellow", "misty", "noble", "olive", "pale", "polished", "proud", "quiet",
    "rapid", "rosy", "rusty", "scarlet", "shady", "silent", "silver", "sleepy", "smoky",
    "snowy", "solemn", "stormy", "sunny", "swift", "tidy", "velvet", "vivid", "wandering",
    "wild", "windy", "wise", "wooden", "young", "zesty",
)

NOUNS = (
    "anchor", "badger", "beacon", "bison", "bridge", "canyon", "cedar", "comet", "condor",
    "coral", "cricket", "dolphin", "falcon", "fern", "fjord", "forest", "fox", "garden",
    "glacier", "harbor", "hawk", "heron", "island", "jaguar", "kettle", "lantern", "lark",
    "lemur", "lotus", "maple", "marsh", "meadow", "meteor", "orchard", "otter", "owl",
    "panther", "pebble", "pelican", "pine", "prairie", "quarry", "raven", "reef", "river",
    "saddle", "salmon", "sparrow", "summit", "thistle", "tiger", "tulip", "valley", "violet",
    "walrus", "willow", "wolf", "yak", "zebra", "zephyr",
)


def compound(rng: random.Random, exclude: set[str] | None = None) -> str:
    """A fresh ``adjective-noun`` pair not in ``exclude`` (3600 possible pairs)."""
    exclude = exclude or set()
    for _ in range(10_000):
        word = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if word not in exclude:
            return word
    raise ValueError("ran out of distinct adjective-noun pairs")
