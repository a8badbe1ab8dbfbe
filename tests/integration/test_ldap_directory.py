"""The ``ldap`` password plugin against a real slapd (``tests/slapd.py``): who gets in, who is refused, who is
passed on, and what happens when the directory is slow, down, or presents a certificate nobody trusts.

Real: slapd 2.5 with a small directory (alice, bob, zoe, the AD-like carol, three groups), LDAPS and StartTLS with a
throwaway CA, SIGSTOP for a directory that stops answering.  One slapd serves the module; the tests that freeze,
stop or restart a directory get their own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ldap3 import Connection
from ldap3.utils.log import EXTENDED, OFF, set_library_log_detail_level

from deckard.auth.chain import AuthUnavailable, Credentials, Decision, Verdict
from deckard.auth.ldap import LdapAuthenticator
from deckard.model.errors import BadInput
from slapd import (
    ALICE,
    BASE_DN,
    BOB,
    CAROL,
    CAROL_UPN,
    PEOPLE_DN,
    SERVICE_DN,
    SERVICE_PASSWORD,
    VDI_ADMINS,
    VDI_STAFF,
    VDI_USERS,
    ZOE,
    Slapd,
    free_port,
    slapd_missing_reason,
)

AD_FILTER = "(|(sAMAccountName={login})(userPrincipalName={login}))"
Config = dict[str, Any]


def search_config(url: str, **extra: Any) -> Config:
    """Search-then-bind through the service account."""
    config: Config = {
        "auth.ldap.url": url,
        "auth.ldap.bind_dn": SERVICE_DN,
        "auth.ldap.bind_password": SERVICE_PASSWORD,
        "auth.ldap.base_dn": BASE_DN,
    }
    return config | {f"auth.ldap.{k}": v for k, v in extra.items()}


def direct_config(url: str, **extra: Any) -> Config:
    """Direct bind as uid=<login>,ou=people; groups are searched under the base with that same bind."""
    config: Config = {
        "auth.ldap.url": url,
        "auth.ldap.bind_dn_template": f"uid={{login}},{PEOPLE_DN}",
        "auth.ldap.base_dn": BASE_DN,
    }
    return config | {f"auth.ldap.{k}": v for k, v in extra.items()}


def new_slapd() -> Slapd:
    reason = slapd_missing_reason()
    if reason:
        pytest.skip(reason)
    return Slapd()


@pytest.fixture(scope="module")
def directory() -> Iterator[Slapd]:
    with new_slapd() as server:
        yield server


@pytest.fixture
def spare() -> Iterator[Slapd]:
    """A directory of the test's own, to freeze, stop or restart without disturbing the others."""
    with new_slapd() as server:
        yield server


@pytest.fixture
def plugin() -> Iterator[Callable[[Config], LdapAuthenticator]]:
    """Builds plugins through the registry's factory and closes them after the test."""
    built: list[LdapAuthenticator] = []

    def build(config: Config) -> LdapAuthenticator:
        built.append(LdapAuthenticator.from_config(config))
        return built[-1]

    yield build
    for p in built:
        p.close()


async def login(p: LdapAuthenticator, name: str, password: str, *, want_groups: bool = True) -> Decision:
    creds = Credentials(login=name, tenant="acme", password=password, source="192.0.2.7", want_groups=want_groups)
    return await p.authenticate(creds)


def client_connections(port: int) -> int:
    """Established TCP connections to 127.0.0.1:port, from /proc/net/tcp (what the server sees as clients)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[2].endswith(f":{port:04X}") and line.split()[3] == "01")


# -- who gets in ------------------------------------------------------------------------------------------------


async def test_search_then_bind_accepts_alice_with_her_attributes_and_groups(directory: Slapd, plugin: Any) -> None:
    decision = await login(plugin(search_config(directory.url)), "Alice", ALICE.password)
    assert decision.verdict is Verdict.ACCEPT, decision
    identity = decision.identity
    assert identity is not None
    assert (identity.login, identity.tenant, identity.plugin) == ("alice", "acme", "ldap")
    assert (identity.display_name, identity.mail, identity.home) == ("Alice Liddell", ALICE.mail, "/home/alice")
    assert identity.external_id == ALICE.dn
    assert identity.groups == (VDI_USERS,)


@pytest.mark.parametrize("mode", [search_config, direct_config])
async def test_a_desktop_login_searches_no_groups_unless_a_group_is_required(
    directory: Slapd, plugin: Any, mode: Any
) -> None:
    """A user's desktop login needs no groups (only administrators map them to roles): two directory requests,
    not three; a required group still makes it search."""
    decision = await login(plugin(mode(directory.url)), "alice", ALICE.password, want_groups=False)
    assert decision.verdict is Verdict.ACCEPT, decision
    assert decision.identity is not None and decision.identity.groups == ()
    required = plugin(mode(directory.url, required_group=VDI_STAFF))
    assert (await login(required, "alice", ALICE.password, want_groups=False)).code == "not_in_group"
    decision = await login(required, "zoe", ZOE.password, want_groups=False)
    assert decision.identity is not None and decision.identity.groups == (VDI_STAFF,)


async def test_direct_bind_accepts_alice_and_reads_her_entry_with_her_own_bind(directory: Slapd, plugin: Any) -> None:
    decision = await login(plugin(direct_config(directory.url)), "alice", ALICE.password)
    assert decision.verdict is Verdict.ACCEPT, decision
    assert decision.identity is not None
    assert (decision.identity.external_id, decision.identity.mail) == (ALICE.dn, ALICE.mail)
    assert decision.identity.groups == (VDI_USERS,)


async def test_attributes_take_the_first_name_present_and_keep_non_ascii(directory: Slapd, plugin: Any) -> None:
    """zoe's display name is not ASCII; she is in a posixGroup by memberUid, not by DN."""
    decision = await login(plugin(search_config(directory.url)), "zoe", ZOE.password)
    assert decision.identity is not None, decision
    assert decision.identity.display_name == "Zoë Ångström-Øster"
    assert decision.identity.groups == (VDI_STAFF,)
    mapped = search_config(directory.url, attr_display_name="nickName mail cn", attr_mail="title", attr_home="")
    decision = await login(plugin(mapped), "zoe", ZOE.password)
    assert decision.identity is not None, decision
    assert (decision.identity.display_name, decision.identity.mail) == (ZOE.mail, "")
    assert decision.identity.home == "/home/zoe"  # an empty key means the default, homeDirectory


@pytest.mark.parametrize("name", ["carol", CAROL_UPN, "CAROL"])
async def test_active_directory_filters_find_carol_by_account_name_or_principal_name(
    directory: Slapd, plugin: Any, name: str
) -> None:
    """AD's memberOf alone is enough for required_group (the group search is off here)."""
    config = search_config(directory.url, user_filter=AD_FILTER, group_filter="", required_group=VDI_USERS)
    decision = await login(plugin(config), name, CAROL.password)
    assert decision.verdict is Verdict.ACCEPT, decision
    assert decision.identity is not None
    assert (decision.identity.login, decision.identity.external_id) == (name.lower(), CAROL.dn)
    assert decision.identity.groups == (VDI_USERS,)
    assert (await login(plugin(config), name, ALICE.password)).code == "bad_credentials"


# -- who is refused, who is passed on -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [search_config, direct_config])
async def test_a_wrong_password_is_rejected_as_bad_credentials(directory: Slapd, plugin: Any, mode: Any) -> None:
    decision = await login(plugin(mode(directory.url)), "alice", BOB.password)
    assert (decision.verdict, decision.code) == (Verdict.REJECT, "bad_credentials")


@pytest.mark.parametrize("mode", [search_config, direct_config])
async def test_an_empty_password_is_rejected_without_asking_the_directory(plugin: Any, mode: Any) -> None:
    """An empty simple bind is an anonymous bind that "succeeds"; the URL here is dead, so any traffic would fail."""
    decision = await login(plugin(mode(f"ldap://127.0.0.1:{free_port()}")), "alice", "")
    assert (decision.verdict, decision.code) == (Verdict.REJECT, "bad_credentials")


async def test_a_name_the_directory_does_not_have_passes_to_the_next_plugin(directory: Slapd, plugin: Any) -> None:
    decision = await login(plugin(search_config(directory.url)), "mallory", "whatever-1")
    assert decision.verdict is Verdict.PASS


async def test_direct_bind_cannot_tell_an_unknown_name_from_a_wrong_password(directory: Slapd, plugin: Any) -> None:
    decision = await login(plugin(direct_config(directory.url)), "mallory", "whatever-1")
    assert (decision.verdict, decision.code) == (Verdict.REJECT, "bad_credentials")


async def test_required_group_admits_members_and_refuses_others_only_after_the_password(
    directory: Slapd, plugin: Any
) -> None:
    """The group DN is compared case-insensitively and without the spaces people type after commas."""
    p = plugin(search_config(directory.url, required_group="CN=VDI-Users, OU=Groups, DC=example, DC=org"))
    assert (await login(p, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    assert (await login(p, "bob", BOB.password)).code == "not_in_group"
    assert (await login(p, "bob", ALICE.password)).code == "bad_credentials"  # no hint about membership
    admins = plugin(direct_config(directory.url, required_group=VDI_ADMINS))
    assert (await login(admins, "bob", BOB.password)).verdict is Verdict.ACCEPT
    assert (await login(admins, "alice", ALICE.password)).code == "not_in_group"


async def test_a_filter_that_matches_two_entries_is_ambiguous_not_a_guess(directory: Slapd, plugin: Any) -> None:
    """alice and bob share departmentNumber 42: the plugin must never pick one (this is what injection would do)."""
    p = plugin(search_config(directory.url, user_filter="(departmentNumber={login})"))
    for password in (ALICE.password, BOB.password):
        decision = await login(p, "42", password)
        assert (decision.verdict, decision.code) == (Verdict.REJECT, "ambiguous_login")


INJECTIONS = [
    "*",
    "al*",
    "alice)(uid=*",
    "*)(|(uid=*",
    "alice)(|(objectClass=*",
    "\\",
    "alice\\",
    "\x00",
    "alice\x00",
    "a,ou=x",
    "alice,ou=people",
    f"uid=alice,{PEOPLE_DN}",
    "alice+cn=x",
    " alice",  # the directory ignores the spaces: alice, under a second login name
    "alice ",
]


@pytest.mark.parametrize("name", INJECTIONS, ids=repr)
async def test_filter_injection_never_widens_the_search(directory: Slapd, plugin: Any, name: str) -> None:
    """With alice's own password: unescaped, ``al*`` or ``alice)(uid=*`` would find her (or everyone)."""
    decision = await login(plugin(search_config(directory.url)), name, ALICE.password)
    assert decision.verdict is Verdict.PASS, decision


@pytest.mark.parametrize("name", INJECTIONS, ids=repr)
async def test_dn_injection_never_binds_as_someone_else(directory: Slapd, plugin: Any, name: str) -> None:
    decision = await login(plugin(direct_config(directory.url)), name, ALICE.password)
    assert decision.verdict is not Verdict.ACCEPT and decision.code in ("", "bad_credentials"), decision


# -- TLS --------------------------------------------------------------------------------------------------------


async def test_ldaps_and_starttls_with_the_right_ca_accept(directory: Slapd, plugin: Any) -> None:
    ldaps = plugin(search_config(directory.ldaps_url, ca_file=directory.ca_file))
    assert (await login(ldaps, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    starttls = plugin(direct_config(directory.url, starttls=True, ca_file=directory.ca_file))
    assert (await login(starttls, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    assert (await login(starttls, "alice", BOB.password)).code == "bad_credentials"


@pytest.mark.parametrize("how", ["ldaps, another CA", "starttls, another CA", "ldaps, a name the cert lacks"])
async def test_an_untrusted_certificate_makes_the_plugin_unavailable(directory: Slapd, plugin: Any, how: str) -> None:
    """A certificate the plugin cannot verify is a configuration problem, not a wrong password: AuthUnavailable."""
    config = {
        "ldaps, another CA": search_config(directory.ldaps_url, ca_file=directory.wrong_ca_file),
        "starttls, another CA": search_config(directory.url, starttls=True, ca_file=directory.wrong_ca_file),
        "ldaps, a name the cert lacks": search_config(directory.ldaps_url_wrong_name, ca_file=directory.ca_file),
    }[how]
    with pytest.raises(AuthUnavailable, match="certificate was not trusted"):
        await login(plugin(config), "alice", ALICE.password)


# -- a directory that is down, slow, or restarted ------------------------------------------------------------------


async def test_failover_skips_a_dead_url_and_a_dead_directory_is_unavailable(directory: Slapd, plugin: Any) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    p = plugin(search_config(f"{dead} {directory.url}"))
    assert (await login(p, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    start = time.monotonic()
    with pytest.raises(AuthUnavailable, match="did not answer"):
        await login(plugin(search_config(f"{dead} ldap://127.0.0.1:{free_port()}")), "alice", ALICE.password)
    assert time.monotonic() - start < 1.0  # refused connections fail at once


async def test_a_frozen_directory_is_unavailable_within_the_timeout_and_blocks_nobody_else(
    directory: Slapd, spare: Slapd, plugin: Any
) -> None:
    """slapd SIGSTOPped: the kernel still accepts connections but nothing answers.  More logins than the plugin
    has threads (20 for 8) all fail within timeout + 1 s; meanwhile another plugin, and the event loop's default
    executor (argon2 runs there), carry on; after SIGCONT the same plugin accepts again."""
    frozen = plugin(search_config(spare.url, timeout_s=0.5))
    healthy = plugin(search_config(directory.url))
    assert (await login(frozen, "alice", ALICE.password)).verdict is Verdict.ACCEPT  # its pool is warm

    async def timed(coro: Any) -> tuple[Any, float]:
        start = time.monotonic()
        try:
            return await coro, time.monotonic() - start
        except AuthUnavailable as exc:
            return exc, time.monotonic() - start

    loop = asyncio.get_running_loop()
    with spare.frozen():
        stuck = [asyncio.ensure_future(timed(login(frozen, "alice", ALICE.password))) for _ in range(20)]
        await asyncio.sleep(0.05)
        for _ in range(10):
            decision, took = await timed(login(healthy, "alice", ALICE.password))
            assert decision.verdict is Verdict.ACCEPT and took < 0.2, (decision, took)
            _, took = await timed(loop.run_in_executor(None, time.sleep, 0))
            assert took < 0.1
        for outcome, took in await asyncio.gather(*stuck):
            assert isinstance(outcome, AuthUnavailable) and "did not answer" in outcome.message, outcome
            assert took < 0.5 + 1.0
    await asyncio.sleep(0.6)  # the threads still waiting on the frozen sockets time out and return
    assert (await login(frozen, "alice", ALICE.password)).verdict is Verdict.ACCEPT


async def test_connections_are_reused_survive_a_restart_and_are_unbound_on_close(spare: Slapd, plugin: Any) -> None:
    p = plugin(search_config(spare.url))
    for _ in range(20):
        assert (await login(p, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    assert client_connections(spare.port) == 2  # one service-account connection, one for user binds
    spare.stop()
    with pytest.raises(AuthUnavailable, match="did not answer"):
        await login(p, "alice", ALICE.password)
    spare.start()
    assert (await login(p, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    spare.stop()
    spare.start()  # a restart between two logins: the pooled connections are dead and nobody has noticed yet
    assert (await login(p, "alice", ALICE.password)).verdict is Verdict.ACCEPT
    p.close()
    assert client_connections(spare.port) == 0
    with pytest.raises(AuthUnavailable):
        await login(p, "alice", ALICE.password)


# -- secrets and configuration --------------------------------------------------------------------------------------


async def test_passwords_never_reach_a_log_a_repr_or_an_error(
    directory: Slapd, plugin: Any, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even with ldap3's own protocol log at its most verbose; and no connection the plugin keeps holds one."""
    caplog.set_level(logging.DEBUG)
    set_library_log_detail_level(EXTENDED)
    secret = "Pa55-in-the-log?"
    seen: list[object] = []
    try:
        good = plugin(search_config(directory.url))
        seen += [good, await login(good, "alice", ALICE.password), await login(good, "alice", secret)]
        seen += [await login(plugin(direct_config(directory.url)), "alice", secret)]
        for config in (
            search_config(directory.ldaps_url, ca_file=directory.wrong_ca_file),
            search_config(directory.url, bind_password="nope"),
        ):
            bad = plugin(config)
            with pytest.raises(AuthUnavailable) as caught:
                await login(bad, "alice", secret)
            seen += [bad, caught.value, caught.value.details, caught.value.to_dict()]
    finally:
        set_library_log_detail_level(OFF)
    out, err = capsys.readouterr()
    pooled = [o for o in gc.get_objects() if isinstance(o, Connection)]  # ldap3's repr prints a set password
    assert pooled
    text = "\n".join([caplog.text, out, err, *map(repr, seen), *map(str, seen), *map(repr, pooled)])
    assert "BIND request" in caplog.text  # ldap3 did log the binds
    for password in (secret, ALICE.password, SERVICE_PASSWORD):
        assert password not in text


def test_a_bad_configuration_is_refused_when_the_plugin_is_built(tmp_path: Path) -> None:
    url = "ldap://127.0.0.1:389"
    for config in [
        {},
        {"auth.ldap.url": "http://dc.example:389", "auth.ldap.base_dn": BASE_DN},
        {"auth.ldap.url": url},  # neither a base to search nor a DN template
        {"auth.ldap.url": url, "auth.ldap.bind_dn_template": "{login}@corp.example"},  # a UPN needs base_dn
        {"auth.ldap.url": url, "auth.ldap.base_dn": BASE_DN, "auth.ldap.user_filter": "(uid=alice)"},
        {"auth.ldap.url": url, "auth.ldap.base_dn": BASE_DN, "auth.ldap.timeout_s": "soon"},
        {"auth.ldap.url": url, "auth.ldap.base_dn": BASE_DN, "auth.ldap.timeout_s": 0},
        {"auth.ldap.url": url, "auth.ldap.base_dn": BASE_DN, "auth.ldap.ca_file": str(tmp_path / "missing.pem")},
    ]:
        with pytest.raises(BadInput):
            LdapAuthenticator.from_config(config)
