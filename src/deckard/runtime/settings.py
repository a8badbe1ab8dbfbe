"""Settings of a Deckard process: grouped, typed, built once at start and passed down.

Sources, later wins: built-in defaults → ``<home>/deckard.toml`` → ``DECKARD_*`` environment
(nested groups with ``__``: ``DECKARD_BROKER__PORT=9000``) → command-line options.
Farm-wide behaviour that administrators change at run time lives in the database config table instead.
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deckard.runtime.paths import DEFAULT_HOME, FarmPaths


class BrokerSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = 8443
    start_timeout: float = 60.0  # seconds a connect waits for the desktop to run
    display_timeout: float = 15.0  # seconds for the agent to bring the display up


class ApiSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = 9443
    session_hours: float = 12.0


class NetworkSettings(BaseModel):
    bridge: str = "deckard0"
    range: str = "10.231.0.0/22"  # desktops and node addresses; the first hosts are kept for nodes


class NodeSettings(BaseModel):
    name: str = Field(default_factory=socket.gethostname)
    driver: str = "container"
    heartbeat_s: float = 2.0
    poll_s: float = 0.25  # fallback poll when notifications cannot cross processes (SQLite)
    agent_check_s: float = 5.0
    agent_failures: int = 3  # consecutive failed pings before a running desktop is declared dead
    start_timeout: float = 45.0  # guest start → agent answering
    max_parallel_starts: int = 10
    run_dir: Path | None = None  # own run directory (several nodes on one machine); default <home>/run
    lost_after_s: float = 10.0  # a heartbeat older than this and the node is fenced and declared lost
    self_fence_after_s: float = 6.0  # no heartbeat written for this long: kill our own guests (< lost_after_s)
    monitor_s: float = 1.0  # cluster monitor period (plus up to 50 % jitter)
    fencing: str = "local"  # local | command
    fence_command: str = ""  # with fencing=command: run as `COMMAND name address pid`, exit 0 = fenced
    fake_start_delay: float = 0.0  # fake driver: simulated boot time


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DECKARD_", env_nested_delimiter="__", extra="ignore")

    home: Path = DEFAULT_HOME
    database_url: str | None = None
    broker: BrokerSettings = BrokerSettings()
    api: ApiSettings = ApiSettings()
    network: NetworkSettings = NetworkSettings()
    node: NodeSettings = NodeSettings()
    log_format: str = "auto"  # auto | json | console

    @property
    def paths(self) -> FarmPaths:
        return FarmPaths(self.home, self.node.run_dir)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.paths.sqlite_path}"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(home: Path | None = None, **overrides: Any) -> Settings:
    """Settings for a farm home; ``overrides`` are nested dicts from command-line options (None = unset)."""
    env = Settings()
    home = home or env.home
    file_values: dict[str, Any] = {}
    toml_path = home / "deckard.toml"
    if toml_path.exists():
        file_values = tomllib.loads(toml_path.read_text())
    merged = _deep_merge(file_values, env.model_dump(exclude_unset=True))
    clean = {k: v for k, v in overrides.items() if v is not None}
    merged = _deep_merge(merged, clean)
    merged["home"] = home
    return Settings.model_validate(merged)
