"""Several cachefetch hosts acting as one cache through Redis (see the README's "Fleet")."""
from __future__ import annotations

from .fleet import ADVERTISE_ENV, SECRET_ENV, Fleet, FleetMember, as_fleet
from .link import FleetUnavailable, RedisLink
from .peers import PREFIX

__all__ = ["Fleet", "FleetMember", "RedisLink", "FleetUnavailable", "as_fleet", "PREFIX", "SECRET_ENV",
           "ADVERTISE_ENV"]
