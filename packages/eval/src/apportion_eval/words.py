"""Word lists written for this package (no licence strings attached): keys and word values.

Keys and values are adjective-noun pairs ("amber-falcon"): they read as English, tokenize
into a few tokens, and practically never occur in the standard-library haystack, so a
needle's value appears in a context exactly where it was put.
"""

from __future__ import annotations

import random

ADJECTIVES = (
    "amber",
    "ancient",
    "brave",
    "bright",
    "brisk",
    "calm",
    "clever",
    "copper",
    "crimson",
    "crystal",
    "dusty",
    "eager",
    "emerald",
    "faded",
    "fierce",
    "frozen",
    "gentle",
    "gilded",
    "golden",
    "hollow",
    "humble",
    "icy",
    "ivory",
    "jolly",
    "lively",
    "lonely",
    "lucky",
    "marble",
    "mellow",
    "misty",
    "noble",
    "olive",
    "pale",
    "polished",
    "proud",
    "quiet",
    "rapid",
    "rosy",
    "rusty",
    "scarlet",
    "shady",
    "silent",
    "silver",
    "sleepy",
    "smoky",
    "snowy",
    "solemn",
    "stormy",
    "sunny",
    "swift",
    "tidy",
    "velvet",
    "vivid",
    "wandering",
    "wild",
    "windy",
    "wise",
    "wooden",
    "young",
    "zesty",
)

NOUNS = (
    "anchor",
    "badger",
    "beacon",
    "bison",
    "bridge",
    "canyon",
    "cedar",
    "comet",
    "condor",
    "coral",
    "cricket",
    "dolphin",
    "falcon",
    "fern",
    "fjord",
    "forest",
    "fox",
    "garden",
    "glacier",
    "harbor",
    "hawk",
    "heron",
    "island",
    "jaguar",
    "kettle",
    "lantern",
    "lark",
    "lemur",
    "lotus",
    "maple",
    "marsh",
    "meadow",
    "meteor",
    "orchard",
    "otter",
    "owl",
    "panther",
    "pebble",
    "pelican",
    "pine",
    "prairie",
    "quarry",
    "raven",
    "reef",
    "river",
    "saddle",
    "salmon",
    "sparrow",
    "summit",
    "thistle",
    "tiger",
    "tulip",
    "valley",
    "violet",
    "walrus",
    "willow",
    "wolf",
    "yak",
    "zebra",
    "zephyr",
)


def compound(rng: random.Random, exclude: set[str] | None = None) -> str:
    """A fresh ``adjective-noun`` pair not in ``exclude`` (3600 possible pairs)."""
    exclude = exclude or set()
    for _ in range(10_000):
        word = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if word not in exclude:
            return word
    raise ValueError("ran out of distinct adjective-noun pairs")


#: Everyday English nouns for the word-list tasks (``cwe``): plain, distinct, lower-case.
EVERYDAY = tuple(
    """
    acorn actor airport album alley anchor angel ankle apron arch arrow artist attic author
    avenue baby bacon badge bakery ball balloon banana band banjo bank barn barrel basket bath
    battery beach bean bear beard bed bee beetle bell belt bench berry bicycle blanket blossom
    boat body bone book boot bottle boulder bowl bracelet branch brick bride brush bucket
    buffalo bulb bus butter button cabin cable cactus cake camel camera camp candle candy canoe
    canvas cape carpet carrot castle cat cattle cave ceiling cellar chain chalk cheese cherry
    chess chicken chimney chin church circus city clock closet cloth clown coach coat cocoa
    coconut collar colony cookie copper corn cottage cotton couch cousin cow crab crayon cream
    crowd crown cup curtain cushion daisy dancer deer desert diamond dinner doctor dog doll
    donkey door dragon drawer dress drum duck dust eagle ear earth elbow engine envelope eye
    fabric face factory fairy farm father feather fence ferry field finger fire flag flame
    flower flute fog foot fork fountain frog fruit furnace garage garlic gate ghost giant gift
    giraffe glass glove goat gold goose grape grass guitar hammer hand harp hat hay helmet hen
    hill hive honey hook horn horse hospital hotel insect iron jacket jam jar jelly jewel juice
    kangaroo key kitchen kite kitten knee knife knot ladder lake lamb lamp leaf lemon letter
    library lily lion lizard lobster lock log lunch magnet mailbox map market mask meadow melon
    mirror mitten monkey moon mop mountain mouse mouth mud muffin museum mushroom nail napkin
    necklace needle nest net night noodle nose notebook nurse oak ocean office onion orange
    oven owl paint palace pancake panda paper parrot pasta path peach peanut pear pencil penguin
    pepper piano pickle picnic pie pig pillow pilot pizza planet plate plum pocket poem pond
    popcorn potato pumpkin puppet puppy puzzle queen rabbit radio raft rain rainbow ribbon rice
    ring road robot rocket roof room rope rose ruler sail salad sandwich saucer scarf school
    scissors seal shadow sheep shelf shell shirt shoe shovel silk sink skate skirt sky sled
    slipper snail snake sock sofa soldier soup spider spoon spring square squirrel stable stamp
    station statue stool storm stove straw street sugar suitcase swan sweater swing table tail
    teacher teapot tent thimble thread throne thumb ticket tiger toast toe tomato tongue tooth
    torch towel tower town toy tractor train tray truck trumpet tunnel turkey turtle umbrella
    uncle valley vase vest village violin wagon wall wallet watch water wave whale wheel whistle
    window wing winter wizard wool worm yard yarn zebra zipper
    """.split()
)

#: Node names for ``graph-tracing``: the 16 words of Park et al.'s 4x4 grid first, then more
#: familiar words, each one token (with its leading space) for SmolLM2's tokenizer.
GRAPH_WORDS = (
    "apple",
    "bird",
    "car",
    "egg",
    "house",
    "milk",
    "plane",
    "opera",
    "box",
    "sand",
    "sun",
    "mango",
    "rock",
    "math",
    "code",
    "phone",
    "tree",
    "fish",
    "lamp",
    "door",
    "cloud",
    "river",
    "moon",
    "star",
    "salt",
    "bread",
    "chair",
    "shoe",
    "ship",
    "king",
    "coin",
    "bell",
    "rain",
    "snow",
    "leaf",
    "stone",
)
