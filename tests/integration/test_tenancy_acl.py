"""Tenancy, roles and ACLs through the real API: an administrator without an ACL is refused (403
``forbidden_action``) and never sees a gated field; the supertenant sees every tenant while a tenant
administrator is confined; roles inherit and negative grants win; repeated failed logins lock the account."""

from __future__ import annotations

import pytest
import test_api
from test_api import Farm, call

from deckard.client.api import ApiClient
from deckard.model.errors import Conflict, DeckardError, NotFound, PermissionDenied, Unauthenticated
from deckard.model.schemas import Desktop

farm = test_api.farm  # the real API with TLS, shared with test_api.py
PASSWORD = "s3cret-pass"


async def multitenant(root: ApiClient) -> None:
    await call(root.set_config, "tenancy.multi", True)


async def tenant_admin(farm: Farm, root: ApiClient, tenant: str, name: str, roles: list[str]) -> ApiClient:
    """A tenant (created if missing) and an administrator of it with ``roles``, logged in."""
    try:
        await call(root.create_tenant, tenant)
    except Conflict:
        pass
    await call(root.create_admin, name, PASSWORD, tenant=tenant, roles=roles)
    client = farm.client()
    await call(client.login, name, PASSWORD, tenant)
    return client


async def test_a_farm_is_monotenant_until_tenancy_multi_is_set(farm: Farm) -> None:
    root = await farm.admin_client()
    with pytest.raises(Conflict) as e:
        await call(root.create_tenant, "acme")
    assert e.value.code == "monotenant"
    entry = await call(root.get_config, "tenancy.multi")
    assert entry.value is False and entry.source == "default"
    await multitenant(root)
    assert (await call(root.get_config, "tenancy.multi")).source == "global"
    tenant = await call(root.create_tenant, "acme")
    assert tenant.name == "acme"
    names = {t.name for t in await call(root.list_tenants)}
    assert {"*", "default", "acme"} <= names


async def test_the_bootstrap_admin_is_root_in_the_supertenant(farm: Farm) -> None:
    root = await farm.admin_client()
    me = await call(root.whoami)
    assert me.tenant_id is None and "tenant.create" in me.acls
    admin = await call(root.get_admin, "admin")
    assert admin.roles == ["Root"] and admin.tenant_id == 0
    roles = {r.name: r for r in await call(root.list_roles)}
    assert {"Root", "Tenant admin", "Operator", "Read-only"} <= set(roles)
    assert all(roles[n].fixed for n in ("Root", "Operator"))


async def test_supertenant_sees_every_tenant_and_a_tenant_admin_only_its_own(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    a = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    b = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    ua = await call(a.create_user, "alice", "pw-alice")
    ub = await call(b.create_user, "bruno", "pw-bruno")
    assert {u.login for u in await call(root.list_users)} >= {"alice", "bruno"}
    assert [u.login for u in await call(a.list_users)] == ["alice"]
    with pytest.raises(NotFound):
        await call(a.get_user, ub.id)
    with pytest.raises(NotFound):
        await call(a.delete_user, ub.id)
    assert (await call(b.get_user, ub.id)).login == "bruno"
    # tenant.* ACLs are never effective outside the supertenant, and other admins are invisible
    assert not [acl for acl in (await call(a.whoami)).acls if acl.startswith("tenant.")]
    with pytest.raises(PermissionDenied) as e:
        await call(a.create_tenant, "gamma")
    assert e.value.code == "forbidden_action"
    with pytest.raises(NotFound):
        await call(a.get_admin, "bob")
    assert {x.name for x in await call(a.list_admins)} == {"ann"}
    # naming another tenant on a create is a 404, not a way in
    with pytest.raises(NotFound):
        await call(a.create_admin, "eve", PASSWORD, tenant="beta")
    assert ua.tenant_id != ub.tenant_id


async def test_an_admin_without_the_acl_is_refused_with_forbidden_action(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.create_admin, "reader", PASSWORD, tenant="default", roles=["Read-only"])
    reader = farm.client()
    await call(reader.login, "reader", PASSWORD, "default")
    assert isinstance(await call(reader.list_users), list)
    with pytest.raises(PermissionDenied) as e:
        await call(reader.create_user, "mallory", "pw-mallory")
    assert e.value.code == "forbidden_action" and e.value.status == 403
    with pytest.raises(PermissionDenied):
        await call(reader.set_config, "ui.page_size", 20)
    with pytest.raises(PermissionDenied):
        await call(reader.list_audit)
    assert not [u for u in await call(root.list_users) if u.login == "mallory"]


async def test_a_negative_grant_hides_a_gated_field_and_roles_inherit(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.create_user, "carol", "pw-carol")
    await call(root.create_desktop, "carol-1", "carol")
    read_only = await call(root.get_role, "Read-only")
    no_ip = await call(
        root.create_role, "no-ip", grants=[("desktop.see.ip", False)], inherits=[read_only.id], tenant="default"
    )
    assert "desktop.see" in no_ip.acls and "desktop.see.ip" not in no_ip.acls
    await call(root.create_admin, "nip", PASSWORD, tenant="default", roles=["no-ip"])
    nip = farm.client()
    await call(nip.login, "nip", PASSWORD, "default")
    desks = await call(nip.list_desktops)
    assert desks and all("ip" not in d.model_fields_set for d in desks)  # absent, not null
    assert "ip" in (await call(root.list_desktops))[0].model_fields_set
    # filtering on the hidden field is refused too
    with pytest.raises(DeckardError) as e:
        await call(nip.list_page, "desktops", Desktop, {"ip": "10.0.0.1"})
    assert e.value.status in (403, 422)


async def test_role_cycles_and_edits_of_predefined_roles_are_refused(farm: Farm) -> None:
    root = await farm.admin_client()
    one = await call(root.create_role, "one", grants=[("user.see", True)])
    two = await call(root.create_role, "two", inherits=[one.id])
    with pytest.raises(Conflict) as e:
        await call(root.update_role, one.id, inherits=[two.id])
    assert e.value.code == "role_cycle"
    with pytest.raises(Conflict) as e:
        await call(root.update_role, "Root", description="mine now")
    assert e.value.code == "role_fixed"
    with pytest.raises(Conflict):
        await call(root.delete_role, "Operator")
    assert (await call(root.get_role, "two")).acls == ["user.see"]


async def test_an_operator_cannot_hand_out_more_than_it_holds(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.create_role, "admin-maker", grants=[("admin.*", True), ("role.see", True)], tenant="default")
    await call(root.create_admin, "maker", PASSWORD, tenant="default", roles=["admin-maker"])
    maker = farm.client()
    await call(maker.login, "maker", PASSWORD, "default")
    with pytest.raises(PermissionDenied):
        await call(maker.create_admin, "boss", PASSWORD, roles=["Tenant admin"])


async def test_repeated_failed_logins_lock_the_account_and_say_until_when(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.set_config, "auth.lockout.failures", 3)
    client = farm.client()
    for _ in range(2):
        with pytest.raises(Unauthenticated) as e:
            await call(client.login, "admin", "wrong")
        assert e.value.code == "bad_credentials"
    with pytest.raises(DeckardError) as e:
        await call(client.login, "admin", "wrong")
    assert e.value.code == "login_locked" and e.value.status == 429
    assert "locked_until" in e.value.details
    # even the right password is refused while locked
    with pytest.raises(DeckardError) as e:
        await call(client.login, "admin", farm.password)
    assert e.value.code == "login_locked"


async def test_config_layers_default_global_tenant_and_reset(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    a = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    assert (await call(a.get_config, "ui.page_size")).source == "default"
    await call(root.set_config, "ui.page_size", "25")
    seen = await call(a.get_config, "ui.page_size")
    assert seen.value == 25 and seen.source == "global"
    await call(a.set_config, "ui.page_size", 10)
    assert (await call(a.get_config, "ui.page_size")).source == "tenant"
    assert (await call(root.get_config, "ui.page_size")).value == 25
    with pytest.raises(DeckardError) as e:
        await call(a.set_config, "tenancy.multi", False)
    assert e.value.code == "global_config_key"
    with pytest.raises(DeckardError) as e:
        await call(root.set_config, "ui.page_size", "lots")
    assert e.value.code == "bad_config_value"
    out = await call(a.reset_config, "ui.page_size")
    assert out.value == 25 and out.source == "global"
    from deckard.services.config import get_config

    assert await get_config(farm.db, "ui.page_size", None) == 25


async def test_keys_marked_per_osf_take_an_osf_layer_over_the_tenants(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    a = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    b = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    web = await call(a.create_osf, "web")
    await call(b.create_osf, "web")
    await call(a.set_config, "network.egress", "deny tcp any port 25")
    out = await call(a.set_config, "network.egress", "deny any", None, "web")
    assert out.value == "deny any" and out.source == "osf" and out.per_osf
    assert (await call(a.get_config, "network.egress")).value == "deny tcp any port 25"
    assert (await call(root.get_config, "network.egress", None, "web@acme")).source == "osf"
    assert (await call(root.get_config, "network.egress", "beta", "web")).source == "default"  # beta's own web
    from deckard.services.config import get_config

    assert await get_config(farm.db, "network.egress", web.tenant_id, web.id) == "deny any"
    assert await get_config(farm.db, "network.egress", web.tenant_id) == "deny tcp any port 25"
    with pytest.raises(DeckardError) as e:  # a key that is not per OSF
        await call(a.set_config, "ui.page_size", 10, None, "web")
    assert e.value.code == "tenant_config_key"
    with pytest.raises(DeckardError) as e:  # another tenant's OSF does not exist for ann
        await call(a.set_config, "network.egress", "deny any", "beta", "web")
    assert e.value.code in ("tenant_not_found", "osf_not_found")
    out = await call(a.reset_config, "network.egress", None, "web")
    assert out.source == "tenant" and out.value == "deny tcp any port 25"
    await call(a.set_config, "network.egress", "deny any", None, "web")
    await call(a.delete_osf, "web")  # the OSF's layer goes with it
    assert await get_config(farm.db, "network.egress", web.tenant_id, web.id) == "deny tcp any port 25"


async def test_custom_properties_follow_their_object_visibility(farm: Farm) -> None:
    root = await farm.admin_client()
    await multitenant(root)
    a = await tenant_admin(farm, root, "acme", "ann", ["Tenant admin"])
    b = await tenant_admin(farm, root, "beta", "bob", ["Tenant admin"])
    ub = await call(b.create_user, "bruno", "pw-bruno")
    assert await call(b.set_properties, "user", ub.id, {"floor": "3"}) == {"floor": "3"}
    assert await call(root.get_properties, "user", ub.id) == {"floor": "3"}
    with pytest.raises(NotFound):
        await call(a.get_properties, "user", ub.id)
    with pytest.raises(NotFound):
        await call(a.set_properties, "user", ub.id, {"floor": "9"})
    await call(b.delete_property, "user", ub.id, "floor")
    assert await call(b.get_properties, "user", ub.id) == {}
