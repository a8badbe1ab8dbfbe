"""Settings of a Deckard process: grouped, typed, built once at start and passed down.

Sources, later wins: built-in defaults → ``<home>/deckard.toml`` → ``DECKARD_*`` environment
(nested groups with ``__``: ``DECKARD_BROKER__PORT=9000``) → command-line options.
Farm-wide behaviour that administrators change at run time lives in the database config table instead.
"""

from __future__ import annotations

import shutil
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deckard.runtime.paths import DEFAULT_HOME, FarmPaths


class BrokerSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = 8443
    start_timeout: float = 60.0  # seconds a connect waits for the desktop to run
    display_timeout: float = 35.0  # seconds for the agent to bring the display up (a VM's, under TCG: several)
    # what one client, or all of them, may hold in the broker (docs/broker-protocol.md, "Limits")
    max_connections: int = Field(default=4096, ge=1)  # open client connections, all addresses together
    max_connections_per_address: int = Field(default=64, ge=1)  # from one address, not logged in yet
    first_request_timeout: float = Field(default=10.0, gt=0)  # accept → TLS handshake + first request head
    idle_timeout: float = Field(default=15.0, gt=0)  # between requests, until a request has authenticated
    authenticated_idle_timeout: float = Field(default=300.0, gt=0)  # QVD's client lists, then the user picks
    max_request_head: int = Field(default=16 * 1024, ge=1024)  # bytes; larger heads get 431
    max_ws_message: int = Field(default=256 * 1024, ge=1024)  # bytes of a WebSocket text message (binary streams)
    tickets_per_minute: int = Field(default=30, ge=1)  # one-time WebSocket tickets one user may be issued
    max_live_tickets: int = Field(default=5, ge=1)  # issued, not yet used and not expired, per user
    # glibc: big buffers mapped and two arenas, and the freed heap given back after a burst of closed connections
    trim_heap: bool = True
    # the farm's TLS keys (runtime/tls.py): RSA 3072, which QVD's clients accept, or ECDSA P-256
    tls_key: Literal["rsa3072", "ec256"] = "rsa3072"
    # a connect's desktop starts while its user's password is checked (``sessions.head_start``): at most one
    # start per wrong password, stopped again, and none once a failure is counted against the account
    head_start: bool = True


class ApiSettings(BaseModel):
    host: str = "0.0.0.0"
    port: int = 9443
    session_hours: float = 12.0
    # bounded resources (docs/api.md, "Limits"): what one client, or all of them, can hold
    max_body_bytes: int = Field(default=1 << 20, ge=1024)  # JSON bodies; refused (413) before they are read
    max_upload_bytes: int = Field(default=64 << 30, ge=1024)  # one request to PUT /images/{id}/content
    max_connections: int = Field(default=1024, ge=1)  # all clients; beyond it requests get 503
    max_connections_per_address: int = Field(default=128, ge=1)  # per client address; beyond it: closed
    header_timeout_s: float = Field(default=10.0, gt=0)  # a connection must send a request's headers in this
    keep_alive_s: int = Field(default=5, ge=1)  # an idle connection between requests is closed after this
    max_header_bytes: int = Field(default=16 << 10, ge=1024)  # request line + headers
    # directories a supertenant administrator may import image tarballs from (`POST /images/{id}/import`);
    # unset: <home>/import and the image store; [] disables import by path (uploads still work)
    image_import_dirs: list[Path] | None = None
    # GET /metrics also accepts this secret as its bearer token (a Prometheus scraper); empty: administrators only
    metrics_token: str = ""


class NetworkSettings(BaseModel):
    bridge: str = "deckard0"
    range: str = "10.231.0.0/22"  # desktops and node addresses; the first hosts are kept for nodes
    # where the desktops' resolver (dnsmasq on the gateway address) forwards; empty: the node's /etc/resolv.conf
    dns_servers: list[str] = []
    # a farm on several machines: this node's address on the machines' own network (the underlay); set, the
    # desktop bridge joins the farm's VXLAN segment (drivers/overlay.py) and the node registers with it
    overlay_address: str = ""
    overlay_vni: int = Field(default=4242, ge=1, le=16777215)


def default_driver() -> str:
    """Containers, and virtual machines too where QEMU is installed (``make up`` installs it)."""
    return "container,vm" if shutil.which("qemu-system-x86_64") else "container"


class NodeSettings(BaseModel):
    name: str = Field(default_factory=socket.gethostname)
    driver: str = Field(default_factory=default_driver)  # one name or several: container, vm, fake
    vm_accel: str = Field(default="auto", pattern="^(auto|kvm|tcg)$")  # auto: KVM when a real probe shows it works
    heartbeat_s: float = 2.0
    poll_s: float = 0.25  # fallback poll when notifications cannot cross processes (SQLite)
    agent_check_s: float = 5.0
    agent_failures: int = 3  # consecutive failed pings before a running desktop is declared dead
    start_timeout: float = 45.0  # guest start → agent answering
    max_parallel_starts: int = 10
    run_dir: Path | None = None  # own run directory (several nodes on one machine); default <home>/run
    lost_after_s: float = 10.0  # a heartbeat older than this and the node is fenced and declared lost
    # a node's lease: no heartbeat accepted for this long and another node could take over: kill our own guests
    # (node/fencing.py); lost_after_s - self_fence_after_s is the margin the node has to stop them
    self_fence_after_s: float = 6.0
    heartbeat_timeout_s: float = Field(default=2.0, gt=0)  # one heartbeat write (or lease read) gives up after this
    monitor_s: float = 1.0  # cluster monitor period (plus up to 50 % jitter)
    fencing: str = "local"  # local | command
    fence_command: str = ""  # with fencing=command: run as `COMMAND name address pid`, exit 0 = fenced
    fence_timeout_s: float = Field(default=60.0, gt=0)  # one call of a fence agent or hook gives up after this
    fence_retry_s: float = Field(default=5.0, gt=0)  # a failed fence is tried again after this (by one monitor)
    # this node's own fence agent, written to its row at start for the others (model/fence.py; "" keeps the row's,
    # which `deckard node fence` sets): e.g. fence_ipmilan with {"ip": …, "username": …, "lanplus": "1"}
    fence_agent: str = ""
    fence_options: dict[str, str] = {}
    fence_password_file: Path | None = None  # its password (option `password`), read at start: never in argv
    fake_start_delay: float = 0.0  # fake driver: simulated boot time
    # a node without the API in its process serves its Prometheus series here (unauthenticated: keep it local
    # or firewalled); 0: off (the all-in-one farm's API serves them at /metrics)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @model_validator(mode="after")
    def _lease_within_lost_after(self) -> NodeSettings:
        if self.self_fence_after_s >= self.lost_after_s:
            raise ValueError(
                f"node.self_fence_after_s ({self.self_fence_after_s}) must be below node.lost_after_s "
                f"({self.lost_after_s}): a cut-off node must stop its desktops before the others may restart them"
            )
        return self


class StorageSettings(BaseModel):
    """Where a node finds the farm's storage root (``docs/farm.md``, "Shared storage")."""

    # a GlusterFS volume the node mounts as <home>/storage before it starts (`deckard storage gluster mount`
    # does the same by hand): its storage machines, the first asked first; empty: the storage root is a directory
    gluster_servers: list[str] = []
    gluster_volume: str = "deckard"
    # desktops' root layers (unpacked images, writable overlays) under <home>/local on this machine's disk:
    # overlayfs cannot write to a FUSE filesystem such as GlusterFS's client, and unpacking an image onto
    # GlusterFS is 50-70x slower.  None: local when gluster_servers is set, else in the storage root
    local_layers: bool | None = None

    @property
    def layers_local(self) -> bool:
        return bool(self.gluster_servers) if self.local_layers is None else self.local_layers


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DECKARD_", env_nested_delimiter="__", extra="ignore")

    home: Path = DEFAULT_HOME
    database_url: str | None = None
    broker: BrokerSettings = BrokerSettings()
    api: ApiSettings = ApiSettings()
    network: NetworkSettings = NetworkSettings()
    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    log_format: str = "auto"  # auto | json | console

    @property
    def paths(self) -> FarmPaths:
        return FarmPaths(self.home, self.node.run_dir, self.storage.layers_local)

    @property
    def import_dirs(self) -> tuple[Path, ...]:
        """Where image imports by path may read from (the farm owner's choice; empty: import is disabled)."""
        if self.api.image_import_dirs is None:
            return (self.paths.import_dir, self.paths.images)
        return tuple(self.api.image_import_dirs)

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
