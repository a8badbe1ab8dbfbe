"""Where the CLI finds its farm: a small JSON profile with the API URL, a token and the farm CA to trust.

``deckard up`` writes one (with a long-lived API token); ``deckard login`` will write one for a remote farm.
The token is a secret, so the file is created mode 0600 and its directory 0700.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from deckard.model.errors import Unauthenticated

PROFILE_ENV = "DECKARD_PROFILE"


@dataclass(frozen=True)
class Profile:
    url: str
    token: str | None
    ca: Path | None


def default_profile_path() -> Path:
    """``$DECKARD_PROFILE``, else ``~/.config/deckard/profile.json``."""
    env = os.environ.get(PROFILE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".config" / "deckard" / "profile.json"


def save_profile(path: Path | None, profile: Profile) -> Path:
    path = path or default_profile_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = {"url": profile.url, "token": profile.token, "ca": str(profile.ca) if profile.ca else None}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)  # O_CREAT's mode does not apply when the file already existed
    tmp.replace(path)  # atomic: a crash never leaves half a profile
    return path


def load_profile(path: Path | None = None) -> Profile:
    path = path or default_profile_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise Unauthenticated(
            f"no Deckard profile at {path}: run `deckard up` to start a farm on this machine "
            f"(or point --profile / ${PROFILE_ENV} at a profile)",
            code="no_profile",
        ) from None
    except (OSError, ValueError) as e:
        raise Unauthenticated(f"cannot read the Deckard profile {path}: {e}", code="bad_profile") from e
    if not isinstance(data, dict) or not isinstance(data.get("url"), str):
        raise Unauthenticated(f"the Deckard profile {path} has no 'url': run `deckard up` again", code="bad_profile")
    ca = data.get("ca")
    return Profile(url=data["url"], token=data.get("token"), ca=Path(ca) if ca else None)
