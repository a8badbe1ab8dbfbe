"""A real OpenLDAP server for tests: a throwaway slapd with a small directory, LDAPS and StartTLS.

Why a real slapd and not a fake: the LDAP plugin's risky parts are what a directory does with what it is sent
(filter and DN escaping, a simple bind that "succeeds" anonymously, size limits, TLS verification, a server that
stops answering), and only the real server tells the truth about them.  slapd 2.5 starts in ~0.04 s, so a module
can afford its own.

``Slapd`` writes its own ``slapd.conf`` (Debian's schemas, one ``mdb`` database under a temporary directory),
loads the directory below with ``slapadd`` before start, and runs ``/usr/sbin/slapd`` in the foreground on free
loopback ports: ``ldap://127.0.0.1:P1/`` (StartTLS available) and ``ldaps://127.0.0.1:P2/``; the LDAPS port also
listens on 127.0.0.2, which the server certificate does not name, to test hostname verification.  It works as
root and as an ordinary user (nothing needs a low port or a system path).  Leaving the ``with`` block kills the
process, even a paused one, and removes every file.

The directory (``dc=example,dc=org``)::

    ou=people     alice, bob, zoe (inetOrgPerson + posixAccount; zoe has a non-ASCII display name;
                  alice and bob share departmentNumber 42, to make a filter that matches two people)
    ou=groups     cn=vdi-users (groupOfNames: alice), cn=vdi-admins (groupOfNames: bob),
                  cn=vdi-staff (posixGroup: memberUid zoe)
    ou=corp       cn=Carol Jones: an Active Directory-like account (sAMAccountName carol,
                  userPrincipalName carol@corp.example, memberOf cn=vdi-users)
    ou=services   cn=deckard: the service account for search-then-bind

Active Directory is imitated, not emulated: slapd has no AD schema, so the harness writes a tiny one
(``sAMAccountName``, ``userPrincipalName``, ``memberOf`` and an auxiliary class, under the private arc
1.3.6.1.4.1.55555) and gives carol static ``memberOf`` values.  slapd cannot bind by a userPrincipalName
(``carol@corp.example`` is not a DN), so AD's direct-bind form (``auth.ldap.bind_dn_template = {login}@corp``) is
not testable here: the AD filters are tested with search-then-bind through the service account.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SLAPD = Path("/usr/sbin/slapd")
SLAPADD = Path("/usr/sbin/slapadd")
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")  # Debian builds the mdb backend as a module

BASE_DN = "dc=example,dc=org"
PEOPLE_DN = f"ou=people,{BASE_DN}"
GROUPS_DN = f"ou=groups,{BASE_DN}"
CORP_DN = f"ou=corp,{BASE_DN}"
ROOT_DN = f"cn=admin,{BASE_DN}"
SERVICE_DN = f"cn=deckard,ou=services,{BASE_DN}"
SERVICE_PASSWORD = "service-secret-7"
VDI_USERS = f"cn=vdi-users,{GROUPS_DN}"
VDI_ADMINS = f"cn=vdi-admins,{GROUPS_DN}"
VDI_STAFF = f"cn=vdi-staff,{GROUPS_DN}"


@dataclass(frozen=True)
class Person:
    login: str
    dn: str
    password: str
    display_name: str
    mail: str
    home: str


ALICE = Person(
    "alice", f"uid=alice,{PEOPLE_DN}", "alice-pw-Wonder1", "Alice Liddell", "alice@example.org", "/home/alice"
)
BOB = Person("bob", f"uid=bob,{PEOPLE_DN}", "bob-pw-Builder2", "Bob Builder", "bob@example.org", "/home/bob")
ZOE = Person("zoe", f"uid=zoe,{PEOPLE_DN}", "zoe-pw-Ørsted3", "Zoë Ångström-Øster", "zoe@example.org", "/home/zoe")
CAROL = Person("carol", f"cn=Carol Jones,{CORP_DN}", "carol-pw-Jones4", "Carol Jones", "carol@corp.example", "")
CAROL_UPN = "carol@corp.example"

AD_SCHEMA = """\
# Just enough of Active Directory's user schema to test its search forms (private OIDs, not Microsoft's).
attributetype ( 1.3.6.1.4.1.55555.1.1 NAME 'sAMAccountName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{256} SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.2 NAME 'userPrincipalName'
    EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{1024} SINGLE-VALUE )
attributetype ( 1.3.6.1.4.1.55555.1.3 NAME 'memberOf'
    EQUALITY distinguishedNameMatch SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
objectclass ( 1.3.6.1.4.1.55555.2.1 NAME 'deckardAdUser' SUP top AUXILIARY
    MAY ( sAMAccountName $ userPrincipalName $ memberOf ) )
"""


def slapd_missing_reason() -> str | None:
    """Why the slapd tests cannot run here, or None."""
    for tool in (SLAPD, SLAPADD):
        if not os.access(tool, os.X_OK):
            return f"{tool} is not installed (apt-get install slapd ldap-utils)"
    if not (SCHEMA_DIR / "inetorgperson.schema").exists():
        return f"the OpenLDAP schemas are missing from {SCHEMA_DIR}"
    return None


def free_port() -> int:
    """A loopback TCP port nobody listens on (also what a dead directory URL points at)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _ldif_line(name: str, value: str) -> str:
    """One attribute line; values LDIF cannot carry plainly (non-ASCII, leading space or colon) go base64."""
    plain = value.isascii() and value == value.strip() and not value.startswith((":", "<"))
    return f"{name}: {value}" if plain else f"{name}:: {base64.b64encode(value.encode()).decode()}"


def _ldif(entries: list[tuple[str, list[tuple[str, str]]]]) -> str:
    blocks = ["\n".join([_ldif_line("dn", dn)] + [_ldif_line(k, v) for k, v in attrs]) for dn, attrs in entries]
    return "\n\n".join(blocks) + "\n"


def _person(p: Person, uid_number: int, department: str) -> tuple[str, list[tuple[str, str]]]:
    return (
        p.dn,
        [
            ("objectClass", "inetOrgPerson"),
            ("objectClass", "posixAccount"),
            ("uid", p.login),
            ("cn", p.display_name),
            ("sn", p.display_name.split()[-1]),
            ("displayName", p.display_name),
            ("mail", p.mail),
            ("homeDirectory", p.home),
            ("uidNumber", str(uid_number)),
            ("gidNumber", "10000"),
            ("departmentNumber", department),
            ("userPassword", ssha(p.password)),
        ],
    )


def directory_ldif() -> str:
    """The directory every test sees (the module docstring draws it)."""
    ou = [("objectClass", "organizationalUnit")]
    return _ldif(
        [
            (BASE_DN, [("objectClass", "dcObject"), ("objectClass", "organization"), ("dc", "example"), ("o", "Ex")]),
            (PEOPLE_DN, [*ou, ("ou", "people")]),
            (GROUPS_DN, [*ou, ("ou", "groups")]),
            (CORP_DN, [*ou, ("ou", "corp")]),
            (f"ou=services,{BASE_DN}", [*ou, ("ou", "services")]),
            (
                SERVICE_DN,
                [
                    ("objectClass", "applicationProcess"),
                    ("objectClass", "simpleSecurityObject"),
                    ("cn", "deckard"),
                    ("userPassword", ssha(SERVICE_PASSWORD)),
                ],
            ),
            _person(ALICE, 10001, "42"),
            _person(BOB, 10002, "42"),
            _person(ZOE, 10003, "7"),
            (
                CAROL.dn,
                [
                    ("objectClass", "inetOrgPerson"),
                    ("objectClass", "deckardAdUser"),
                    ("cn", "Carol Jones"),
                    ("sn", "Jones"),
                    ("displayName", CAROL.display_name),
                    ("mail", CAROL.mail),
                    ("sAMAccountName", "carol"),
                    ("userPrincipalName", CAROL_UPN),
                    ("memberOf", VDI_USERS),
                    ("userPassword", ssha(CAROL.password)),
                ],
            ),
            (VDI_USERS, [("objectClass", "groupOfNames"), ("cn", "vdi-users"), ("member", ALICE.dn)]),
            (VDI_ADMINS, [("objectClass", "groupOfNames"), ("cn", "vdi-admins"), ("member", BOB.dn)]),
            (
                VDI_STAFF,
                [("objectClass", "posixGroup"), ("cn", "vdi-staff"), ("gidNumber", "10000"), ("memberUid", "zoe")],
            ),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> x509.Certificate:
    """A CA certificate (no issuer) or a server certificate for localhost and 127.0.0.1 signed by ``issuer``."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
    return builder.sign(signing_key, hashes.SHA256())


def write_certificates(directory: Path) -> None:
    """ca.pem, server.pem, server.key (for localhost/127.0.0.1) and other-ca.pem, a CA that signed nothing."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Deckard test CA", ca_key, None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("localhost", server_key, (ca, ca_key))
    other_key = ec.generate_private_key(ec.SECP256R1())
    (directory / "ca.pem").write_bytes(_pem(ca))
    (directory / "server.pem").write_bytes(_pem(server))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (directory / "other-ca.pem").write_bytes(_pem(_certificate("Unrelated CA", other_key, None)))


class Slapd:
    """One slapd on loopback with the directory above; a context manager that always cleans up."""

    base_dn = BASE_DN
    root_dn = ROOT_DN
    root_password = "root-secret-9"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="deckard-slapd-"))
        self.port = free_port()
        self.tls_port = free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.ldaps_url = f"ldaps://127.0.0.1:{self.tls_port}"
        self.ldaps_url_wrong_name = f"ldaps://127.0.0.2:{self.tls_port}"  # same server, a name its cert lacks
        self.ca_file = str(self.dir / "ca.pem")
        self.wrong_ca_file = str(self.dir / "other-ca.pem")
        self.log_file = self.dir / "slapd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Slapd:
        try:
            self.setup()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def setup(self) -> None:
        """Configuration, certificates and the loaded database (slapadd needs the server stopped)."""
        write_certificates(self.dir)
        (self.dir / "ad.schema").write_text(AD_SCHEMA)
        (self.dir / "db").mkdir()
        (self.dir / "slapd.conf").write_text(self._config())
        (self.dir / "directory.ldif").write_text(directory_ldif(), encoding="utf-8")
        subprocess.run(
            [SLAPADD, "-q", "-f", self.dir / "slapd.conf", "-l", self.dir / "directory.ldif"],
            check=True,
            capture_output=True,
        )

    def _config(self) -> str:
        schemas = [SCHEMA_DIR / f"{n}.schema" for n in ("core", "cosine", "inetorgperson", "nis")]
        return "\n".join(
            [
                *(f"include {s}" for s in [*schemas, self.dir / "ad.schema"]),
                f"pidfile {self.dir}/slapd.pid",
                f"argsfile {self.dir}/slapd.args",
                f"modulepath {MODULE_DIR}",
                "moduleload back_mdb",
                f"TLSCACertificateFile {self.dir}/ca.pem",
                f"TLSCertificateFile {self.dir}/server.pem",
                f"TLSCertificateKeyFile {self.dir}/server.key",
                "database mdb",
                "maxsize 67108864",
                f'suffix "{BASE_DN}"',
                f'rootdn "{ROOT_DN}"',
                f"rootpw {self.root_password}",
                f"directory {self.dir}/db",
                "index objectClass,uid,memberUid,member,sAMAccountName,userPrincipalName eq",
                # a password is only ever compared by a bind; people who bound may read the rest
                "access to attrs=userPassword by self write by anonymous auth by * none",
                "access to * by users read by * none",
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> None:
        """Run slapd in the foreground (``-d 0``: no debug output, no fork) and wait until it accepts."""
        urls = f"{self.url}/ {self.ldaps_url}/ {self.ldaps_url_wrong_name}/"
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [SLAPD, "-f", self.dir / "slapd.conf", "-h", urls, "-d", "0"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self._accepts():
            if self.process.poll() is not None or time.monotonic() > deadline:
                log_text = self.log_file.read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"slapd did not start on {urls}:\n{log_text}")
            time.sleep(0.01)

    def _accepts(self) -> bool:
        try:
            for port in (self.port, self.tls_port):
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """The directory goes down: the process ends and its ports refuse connections (``start`` brings it back)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if self.paused:
            process.send_signal(signal.SIGCONT)
            self.paused = False
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- misbehaviour ------------------------------------------------------------------------------------------

    def pause(self) -> None:
        """Freeze slapd (SIGSTOP): the kernel still accepts connections, but nothing answers.

        Returns once every thread of slapd has stopped: ``kill`` only queues the signal, and on a loaded machine a
        thread busy when it came went on answering a request sent just after (a frozen directory that let a
        login through, seen in CI)."""
        assert self.process is not None, "slapd is not running"
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True
        deadline = time.monotonic() + 10
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise RuntimeError("slapd did not stop within 10 s of SIGSTOP")
            time.sleep(0.005)

    def _all_threads_stopped(self) -> bool:
        assert self.process is not None
        states = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """slapd paused for the block, and running again after it whatever happens inside."""
        self.pause()
        try:
            yield
        finally:
            self.resume()
