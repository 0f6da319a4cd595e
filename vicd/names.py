"""Container ids and names, as dockerd makes and checks them."""

from __future__ import annotations

import random
import re
import secrets

from vicd.errors import InvalidParameter

NAME_RE = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")

_LEFT = ["admiring", "brave", "clever", "eager", "focused", "gallant", "happy", "jolly",
         "keen", "lucid", "modest", "nifty", "quirky", "sharp", "tender", "vibrant", "zen"]
_RIGHT = ["babbage", "curie", "darwin", "euler", "fermi", "goodall", "hopper", "kepler",
          "lovelace", "meitner", "noether", "pascal", "ritchie", "shannon", "turing", "wozniak"]


def new_id() -> str:
    return secrets.token_hex(32)


def random_name() -> str:
    return f"{random.choice(_LEFT)}_{random.choice(_RIGHT)}"


def check_name(name: str) -> str:
    """A valid name without its leading slash, or InvalidParameter as dockerd words it."""
    if not NAME_RE.match(name):
        raise InvalidParameter(
            f"Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        )
    return name.lstrip("/")
