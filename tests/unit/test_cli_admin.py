"""The admin CLI against a test double of ``ApiClient``: what it prints (tables, ``--json``), how it reports
errors (``error [code]: message`` on stderr, exit 1; usage errors exit 2), and the client pieces it rides on
(profile file, error envelope → exception)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from deckard.cli import admin, desktops, session
from deckard.client.api import ApiClient
from deckard.client.profile import Profile, load_profile, save_profile
from deckard.model.errors import Conflict, DeckardError, NotFound, PermissionDenied, Unauthenticated, Unavailable
from deckard.model.schemas import Admin, BulkResult, Desktop, Node, Schema, User

runner = CliRunner()


class FakeApi:
    """In-memory stand-in for ApiClient with the same method names, answers (the API's schemas) and errors."""

    def __init__(self) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.desktops: dict[str, dict[str, Any]] = {}
        self.passwords: dict[str, str] = {}
        self.closed = False
        self.polls = 0
        self.looks_to_settle = 2

    def close(self) -> None:
        self.closed = True

    def _user(self, ref: str) -> dict[str, Any]:
        for u in self.users.values():
            if ref in (u["login"], str(u["id"])):
                return u
        raise NotFound(f"no user {ref!r}", code="user_not_found")

    def _desk(self, ref: str | int) -> dict[str, Any]:
        for d in self.desktops.values():
            if str(ref) in (d["name"], str(d["id"])):
                return d
        raise NotFound(f"no desktop {ref!r}", code="desktop_not_found")

    def create_user(self, login: str, password: str | None, description: str = "", tenant: str | None = None) -> User:  # noqa: ARG002
        if login in self.users:
            raise Conflict(f"a user named {login!r} already exists", code="duplicate")
        self.passwords[login] = password or ""
        self.users[login] = {
            "id": len(self.users) + 1,
            "tenant_id": 1,
            "login": login,
            "blocked": False,
            "description": description,
            "created_at": "2024-05-01T10:00:00.123456+00:00",
        }
        return User.model_validate(self.users[login])

    def list_all(self, resource: str, schema: type[Schema], params: list[tuple[str, str]] | None = None) -> list[Any]:
        """The CLI's list commands read every row through here, as through ApiClient.list_all."""
        query = dict(params or [])
        rows = {
            "users": lambda: list(self.users.values()),
            "desktops": lambda: [d for d in self.desktops.values() if query.get("user") in (None, d["user"])],
            "nodes": self.list_nodes,
            "images": self.list_images,
            "osfs": self.list_osfs,
        }[resource]()
        return [schema.model_validate(r) for r in rows]

    def get_user(self, ref: str) -> User:
        return User.model_validate(self._user(ref))

    def update_admin(self, ref: str, *, password: str | None = None, roles: list[str] | None = None) -> Admin:
        if ref != "ops":
            raise NotFound(f"no administrator {ref!r}", code="admin_not_found")
        if password is not None:
            self.passwords["admin:ops"] = password
        self.admin_roles = roles if roles is not None else getattr(self, "admin_roles", [])
        row = {"id": 7, "name": "ops", "tenant_id": 1, "blocked": False, "created_at": "2026-11-30T12:00:00Z"}
        return Admin.model_validate({**row, "roles": self.admin_roles})

    def set_user_password(self, ref: str, password: str) -> User:
        user = self._user(ref)
        self.passwords[user["login"]] = password
        return User.model_validate(user)

    def block_user(self, ref: str) -> User:
        self._user(ref)["blocked"] = True
        return User.model_validate(self._user(ref))

    def delete_user(self, ref: str) -> None:
        del self.users[self._user(ref)["login"]]

    def create_desktop(
        self,
        name: str,
        user: str,
        *,
        osf: str | None = None,
        tag: str = "default",
        description: str = "",  # noqa: ARG002
        network: str | None = None,  # noqa: ARG002
    ) -> Desktop:
        self._user(user)
        n = len(self.desktops) + 1
        self.desktops[name] = {
            "id": n,
            "name": name,
            "user": user,
            "osf": osf or "default",
            "tag": tag,
            "ip": f"10.231.0.{10 + n}",
            "state": "stopped",
            "cmd": None,
            "node": None,
            "blocked": False,
            "user_state": "disconnected",
            "failure_reason": None,
        }
        return Desktop.model_validate(self.desktops[name])

    def get_desktop(self, ref: str | int) -> Desktop:
        desk = self._desk(ref)
        if desk["cmd"] is not None:
            self.polls += 1
            if self.polls >= self.looks_to_settle:  # the node claims and carries the command out after a while
                desk.update(state={"start": "running", "stop": "stopped"}[desk["cmd"]], cmd=None)
        return Desktop.model_validate(desk)

    def start_desktop(self, ref: str) -> Desktop:
        desk = self._desk(ref)
        if desk["blocked"]:
            raise PermissionDenied("the desktop is blocked", code="desktop_blocked")
        desk.update(cmd="start", node="n1")
        return Desktop.model_validate(desk)

    def bulk(
        self, resource: str, action: str, *, ids: list[int] | None = None, filter: dict[str, str] | None = None
    ) -> BulkResult:
        """Desktops only, by ids: asks every one, as the bulk endpoint does."""
        assert resource == "desktops" and ids is not None and filter is None
        for desktop_id in ids:
            self._desk(desktop_id).update(cmd=action)
        return BulkResult(ok=ids, failed={})

    def delete_desktop(self, ref: str) -> None:
        desk = self._desk(ref)
        if desk["state"] != "stopped":
            raise Conflict("the desktop is running or busy: stop it first", code="desktop_running")
        del self.desktops[desk["name"]]

    def list_nodes(self) -> list[dict[str, Any]]:
        return [
            {
                "id": 1,
                "name": "n1",
                "address": "10.231.0.1",
                "state": "running",
                "blocked": False,
                "desktops_running": 0,
                "mem_free_mib": 900,
                "mem_total_mib": 1000,
                "load": 0.5,
                "heartbeat_at": "2024-05-01T10:00:00+00:00",
            }
        ]

    def list_images(self) -> list[dict[str, Any]]:
        return [
            {
                "id": 1,
                "osf": "default",
                "version": "v1",
                "state": "published",
                "tags": ["default", "head"],
                "size": 5,
                "blocked": False,
                "created_at": "2024-05-01T10:00:00+00:00",
            }
        ]

    def list_osfs(self) -> list[dict[str, Any]]:
        return [
            {
                "id": 1,
                "name": "default",
                "memory_mib": 1024,
                "cpus": 1.0,
                "driver": "container",
                "keep_overlay": False,
                "description": "",
            }
        ]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(session, "open_client", lambda _profile: fake)
    monkeypatch.delenv("DECKARD_PASSWORD", raising=False)
    monkeypatch.delenv("DECKARD_ADMIN_PASSWORD", raising=False)
    return fake


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    admin.register(app)
    return app


def test_user_add_takes_the_password_from_the_environment_and_confirms(cli: typer.Typer, api: FakeApi) -> None:
    res = runner.invoke(cli, ["user", "add", "alice", "-d", "first"], env={"DECKARD_PASSWORD": "s3cret"})
    assert res.exit_code == 0, res.output
    assert "user 'alice' created (id 1)" in res.stdout
    assert api.passwords["alice"] == "s3cret" and api.users["alice"]["description"] == "first"
    assert api.closed


def test_user_add_prompts_for_the_password_twice_when_not_given(cli: typer.Typer, api: FakeApi) -> None:
    res = runner.invoke(cli, ["user", "add", "bob"], input="pw1234\npw1234\n")
    assert res.exit_code == 0, res.output
    assert api.passwords["bob"] == "pw1234"
    assert "pw1234" not in res.stdout  # hidden input


def test_user_list_prints_a_table_and_json_prints_every_field(cli: typer.Typer, api: FakeApi) -> None:
    api.create_user("alice", "pw", "first user")
    api.create_user("bob", "pw")
    table = runner.invoke(cli, ["user", "list"])
    assert table.exit_code == 0
    assert "LOGIN" in table.stdout and "alice" in table.stdout and "bob" in table.stdout
    assert "2024-05-01 10:00:00" in table.stdout  # timestamps shortened for people
    as_json = runner.invoke(cli, ["user", "list", "--json"])
    rows = json.loads(as_json.stdout)
    assert [r["login"] for r in rows] == ["alice", "bob"]
    assert rows[0]["created_at"] == "2024-05-01T10:00:00.123456Z"  # full precision for scripts


def test_an_api_error_prints_its_code_in_red_on_stderr_and_exits_1(cli: typer.Typer, api: FakeApi) -> None:
    api.create_user("alice", "pw")
    res = runner.invoke(cli, ["user", "add", "alice", "--password", "pw"])
    assert res.exit_code == 1
    assert res.stdout == ""
    assert "error [duplicate]: a user named 'alice' already exists" in res.stderr
    missing = runner.invoke(cli, ["user", "show", "nobody"])
    assert missing.exit_code == 1 and "error [user_not_found]" in missing.stderr
    assert api.closed  # the client is closed on the error path too


@pytest.mark.usefixtures("api")
def test_a_usage_error_exits_2(cli: typer.Typer) -> None:
    assert runner.invoke(cli, ["desktop", "add", "d1"]).exit_code == 2  # --user is required


def test_admin_passwd_prompts_twice_and_roles_replace_the_old_ones(cli: typer.Typer, api: FakeApi) -> None:
    res = runner.invoke(cli, ["admin", "passwd", "ops"], input="Secret-pw-1\nSecret-pw-1\n")
    assert res.exit_code == 0 and "password of administrator 'ops' changed" in res.stdout
    assert api.passwords["admin:ops"] == "Secret-pw-1"
    res = runner.invoke(cli, ["admin", "roles", "ops", "Operator", "Read-only"])
    assert res.exit_code == 0 and "now has roles Operator, Read-only" in res.stdout
    shown = runner.invoke(cli, ["admin", "roles", "ops", "Operator", "--json"])
    assert json.loads(shown.stdout)["roles"] == ["Operator"]
    assert runner.invoke(cli, ["admin", "roles", "nobody", "x"]).exit_code == 1


def test_user_passwd_block_and_delete(cli: typer.Typer, api: FakeApi) -> None:
    api.create_user("alice", "old")
    assert runner.invoke(cli, ["user", "passwd", "alice"], input="new-pw\nnew-pw\n").exit_code == 0
    assert api.passwords["alice"] == "new-pw"
    blocked = runner.invoke(cli, ["user", "block", "alice", "--json"])
    assert json.loads(blocked.stdout)["blocked"] is True
    deleted = runner.invoke(cli, ["user", "delete", "alice"])
    assert deleted.exit_code == 0 and "user 'alice' deleted" in deleted.stdout
    assert api.users == {}


def test_desktop_add_list_and_show(cli: typer.Typer, api: FakeApi) -> None:
    api.create_user("alice", "pw")
    res = runner.invoke(cli, ["desktop", "add", "alice-1", "--user", "alice", "--tag", "head"])
    assert res.exit_code == 0 and "desktop 'alice-1' created (id 1, ip 10.231.0.11)" in res.stdout
    listed = runner.invoke(cli, ["desktop", "list", "--user", "alice"])
    assert "alice-1" in listed.stdout and "10.231.0.11" in listed.stdout
    assert runner.invoke(cli, ["desktop", "list", "--user", "bob", "--json"]).stdout.strip() == "[]"
    shown = runner.invoke(cli, ["desktop", "show", "1"])
    assert "alice-1" in shown.stdout and "head" in shown.stdout


def test_desktop_start_shows_the_state_after_asking(cli: typer.Typer, api: FakeApi) -> None:
    api.create_user("alice", "pw")
    api.create_desktop("alice-1", "alice")
    res = runner.invoke(cli, ["desktop", "start", "alice-1"])
    assert res.exit_code == 0
    assert res.stdout.strip() == "desktop 'alice-1' (id 1): stopped, start requested, node n1"


def test_desktop_start_wait_follows_the_desktop_until_it_runs(
    cli: typer.Typer, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(desktops, "POLL_S", 0)
    api.create_user("alice", "pw")
    api.create_desktop("alice-1", "alice")
    res = runner.invoke(cli, ["desktop", "start", "alice-1", "--wait", "5", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["state"] == "running"


def _running(api: FakeApi, *names: str) -> None:
    api.create_user("alice", "pw")
    for name in names:
        api.create_desktop(name, "alice")
        api.desktops[name].update(state="running", node="n1")


def test_desktop_stop_wait_follows_every_desktop_of_a_bulk_stop(
    cli: typer.Typer, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several names go through the bulk endpoint; ``--wait`` used to be ignored there (the command returned
    while the desktops were still running, so a following delete failed)."""
    monkeypatch.setattr(desktops, "POLL_S", 0)
    api.looks_to_settle = 5
    _running(api, "a-1", "a-2")
    res = runner.invoke(cli, ["desktop", "stop", "a-1", "a-2", "--wait", "5", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] == [1, 2] and out["failed"] == {}
    assert [(d["name"], d["state"], d["cmd"]) for d in out["desktops"]] == [
        ("a-1", "stopped", None),
        ("a-2", "stopped", None),
    ]
    assert runner.invoke(cli, ["desktop", "delete", "a-1", "a-2"]).exit_code == 0


def test_desktop_wait_that_runs_out_names_the_desktops_not_done_and_exits_1(
    cli: typer.Typer, api: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(desktops, "POLL_S", 0)
    api.looks_to_settle = 10**9
    _running(api, "a-1", "a-2")
    res = runner.invoke(cli, ["desktop", "stop", "a-1", "a-2", "--wait", "0.05"])
    assert res.exit_code == 1
    assert "error [timeout]: still not done after 0.05 s" in res.stderr
    assert "'a-1' (id 1): running, stop requested" in res.stderr and "'a-2' (id 2)" in res.stderr


def test_deleting_a_running_desktop_reports_desktop_running(cli: typer.Typer, api: FakeApi) -> None:
    api.create_user("alice", "pw")
    api.create_desktop("alice-1", "alice")
    api.desktops["alice-1"]["state"] = "running"
    res = runner.invoke(cli, ["desktop", "delete", "alice-1"])
    assert res.exit_code == 1 and "error [desktop_running]" in res.stderr
    assert "alice-1" in api.desktops


@pytest.mark.usefixtures("api")
def test_node_image_and_osf_lists(cli: typer.Typer) -> None:
    nodes = runner.invoke(cli, ["node", "list"])
    assert nodes.exit_code == 0 and "n1" in nodes.stdout and "running" in nodes.stdout
    images = runner.invoke(cli, ["image", "list"])
    assert "default,head" in images.stdout
    osfs = runner.invoke(cli, ["osf", "list", "--json"])
    assert json.loads(osfs.stdout)[0]["memory_mib"] == 1024


@pytest.mark.usefixtures("api")
def test_admin_nouns_join_the_groups_the_farm_commands_already_made() -> None:
    app = typer.Typer()
    image = typer.Typer()
    image.command("build")(lambda: None)
    app.add_typer(image, name="image")
    admin.register(app)
    assert sum(1 for g in app.registered_groups if g.name == "image") == 1
    assert {"build", "list"} <= {c.name for c in image.registered_commands}
    assert runner.invoke(app, ["node", "list"]).exit_code == 0


def test_a_missing_profile_says_to_run_deckard_up(cli: typer.Typer, tmp_path: Path) -> None:
    res = runner.invoke(cli, ["user", "list", "--profile", str(tmp_path / "none.json")])
    assert res.exit_code == 1
    assert "error [no_profile]" in res.stderr and "deckard up" in res.stderr


def test_a_profile_is_saved_private_and_loads_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "cfg" / "profile.json"
    profile = Profile("https://127.0.0.1:9443", "dk_secret", tmp_path / "ca.pem")
    save_profile(path, profile)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_profile(path) == profile
    monkeypatch.setenv("DECKARD_PROFILE", str(path))
    assert load_profile() == profile
    path.write_text("{}")
    with pytest.raises(Unauthenticated) as e:
        load_profile(path)
    assert e.value.code == "bad_profile"


def _client(handler: Any) -> ApiClient:
    return ApiClient("https://farm.test", "dk_t", None, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    "status,cls", [(401, Unauthenticated), (404, NotFound), (409, Conflict), (503, Unavailable), (500, DeckardError)]
)
def test_the_client_rebuilds_the_servers_error_from_the_envelope(status: int, cls: type[DeckardError]) -> None:
    body = {"error": {"code": "some_code", "message": "what to do", "details": {"k": 1}}}
    client = _client(lambda _request: httpx.Response(status, json=body))
    with pytest.raises(cls) as e:
        client.get_desktop("x")
    assert type(e.value) is cls
    assert (e.value.code, e.value.message, e.value.details, e.value.status) == (
        "some_code",
        "what to do",
        {"k": 1},
        status,
    )


def test_the_client_sends_its_token_and_quotes_path_segments() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": 1})

    _client(handler).get_desktop("a/b?c")
    assert seen[0].headers["authorization"] == "Bearer dk_t"
    assert seen[0].url.raw_path == b"/api/v1/desktops/a%2Fb%3Fc"


def test_an_unreachable_api_is_unavailable_api_unreachable() -> None:
    def handler(_request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    with pytest.raises(Unavailable) as e:
        _client(handler).list_users()
    assert e.value.code == "api_unreachable" and "https://farm.test" in e.value.message


class FenceApi(FakeApi):
    """Nodes and their fence agent, masked as the API answers them (model/fence.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.fence: tuple[str, dict[str, str]] = ("", {})

    def _node(self) -> Node:
        from deckard.model.fence import masked_options

        agent, options = self.fence
        return Node(
            id=3,
            name="node2",
            state="lost",
            blocked=False,
            fence_agent=agent,
            fence_options=masked_options(options) if agent else None,
            lost_reason="fencing failed (fence_ipmilan action=off failed (exit 1)); its desktops stay assigned",
        )

    def set_node_fence(self, node: str, agent: str, options: dict[str, str]) -> Node:  # noqa: ARG002
        self.fence = (agent, options)
        return self._node()

    def clear_node_fence(self, node: str) -> Node:  # noqa: ARG002
        self.fence = ("", {})
        return self._node()

    def list_all(self, resource: str, schema: type[Schema], params: Any = None) -> list[Any]:  # noqa: ARG002
        return [self._node()]


def test_node_fence_reads_the_password_from_a_file_or_stdin_and_never_prints_it(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = FenceApi()
    monkeypatch.setattr(session, "open_client", lambda _profile: api)
    pw = tmp_path / "bmc.pw"
    pw.write_text("hunter2\n")
    args = ["node", "fence", "node2", "--agent", "fence_ipmilan", "--option", "ip=10.0.9.2", "--option", "lanplus=1"]
    res = runner.invoke(cli, [*args, "--password-file", str(pw)])
    assert res.exit_code == 0, res.output
    assert api.fence == ("fence_ipmilan", {"ip": "10.0.9.2", "lanplus": "1", "password": "hunter2"})
    assert "fenced by fence_ipmilan ip=10.0.9.2 lanplus=1 password=********" in res.stdout
    assert "hunter2" not in res.output
    res = runner.invoke(cli, [*args, "--password-file", "-"], input="from-stdin\n")
    assert res.exit_code == 0 and api.fence[1]["password"] == "from-stdin" and "from-stdin" not in res.stdout
    listed = runner.invoke(cli, ["node", "list", "--json"])
    assert "fencing failed" in listed.stdout and "from-stdin" not in listed.stdout
    assert runner.invoke(cli, ["node", "fence", "node2", "--clear"]).exit_code == 0 and api.fence == ("", {})
    bad = runner.invoke(cli, ["node", "fence", "node2", "--agent", "fence_x", "--option", "novalue"])
    assert bad.exit_code != 0 and "bad_fence_option" in bad.output
    bad = runner.invoke(cli, ["node", "fence", "node2", "--agent", "fence_x", "--option", "password=oops"])
    assert bad.exit_code != 0 and "--password-file" in bad.output and api.fence == ("", {})
